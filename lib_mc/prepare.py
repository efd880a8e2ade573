"""Job (what the user asked) + host services -> engine Plan (what the engine runs).

Host-independent: a host adapter supplies `HostServices` (its LoRA list, its text encoder,
its extra-network tag parser) and gets back a validated Plan, or a JobError naming the
problem, before anything in the model is touched.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import re
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from .errors import LoraMismatchError, PlanError
from .job import IMAGE_MODES, Job, JobError
from .lora.bind import LoraUse
from .lora.network import Network, load_network
from .conds import pad_context
from .prepare_faces import FacePreparer
from .plan import Conditioning, Plan, build_plan
from .prompt_variants import concept_variant
from .auto.masks import HINTS
from .auto.tokens import assign_occurrences
from .regions import region_mask

REFINE_EVERY = 2   # steps between re-segmentations when `refine_regions` is on (Concept Conductor's cadence order)
_TAG = re.compile(r"<(\w+):([^>]+)>")   # A1111's extra-network syntax: <lora:name:te[:unet]>


def parse_lora_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """`photo of <lora:alice:0.8> alice` -> ("photo of  alice", [("alice", 0.8)])."""
    found: list[tuple[str, float]] = []

    def take(match: re.Match) -> str:
        kind, args = match.group(1), match.group(2).split(":")
        if kind not in ("lora", "lyco"):
            return match.group(0)
        try:
            weight = float(args[1]) if len(args) > 1 and args[1] else 1.0
        except ValueError as exc:
            raise JobError("prompt", f"<{kind}:{match.group(2)}> has a weight that is not a number") from exc
        if not math.isfinite(weight):   # float() takes nan and inf
            raise JobError("prompt", f"<{kind}:{match.group(2)}> has a weight that is not a finite number")
        found.append((args[0], weight))
        return ""
    return _TAG.sub(take, prompt), found


@dataclass
class LoraFile:
    name: str                 # as the host's LoRA list shows it
    path: str
    arch: str | None = None   # "sd1", "sdxl", ... when the host knows it


class HostServices(Protocol):
    model_arch: str           # "sd1" | "sd2" | "sdxl"

    def find_lora(self, name: str) -> LoraFile | None: ...
    def lora_names(self) -> list[str]: ...
    def encode(self, prompt: str, loras: list[tuple[LoraFile, float]]) -> Conditioning: ...
    def parse_tags(self, prompt: str) -> tuple[str, list[tuple[str, float]]]: ...
    def word_positions(self, prompt: str, word: str) -> list[list[int]]: ...   # context positions per occurrence
    # image concepts and a kept background: a picture (base64) -> its VAE latent (1, 4, h, w) at the
    # generation's latent size, cropped to cover image_hw (H, W) as the conductor reference is
    def encode_picture(self, png: str, image_hw: tuple[int, int]) -> torch.Tensor: ...
    # face concepts: antelopev2's FaceAnalysis (lib_mc/faces), and InstantID's (IP-Adapter, IdentityNet
    # or None) for this UNet; both raise ModelFileError naming the files and folders when missing
    def face_analysis(self): ...
    def instantid(self, unet, need_control: bool): ...


@dataclass
class Prepared:
    plan: Plan
    warnings: list[str] = field(default_factory=list)
    skipped_loras: list[str] = field(default_factory=list)


def _unknown_lora(name: str, where: str, services: HostServices) -> JobError:
    close = difflib.get_close_matches(name, services.lora_names(), n=3)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else \
        "; check the name in the Lora tab (file name or alias), or refresh the list"
    return JobError(where, f"unknown LoRA {name!r}{hint}")


def prepare(job: Job, *, base_prompt: str, base_negative: str, image_hw: tuple[int, int], unet,
            services: HostServices, networks_cache: dict[str, Network] | None = None,
            warn: Callable[[str], None] = print, base_prompts: list[str] | None = None,
            pictures_cache: dict | None = None) -> Prepared:
    """Resolve LoRAs, encode concept prompts, build masks and the Plan. Raises JobError/PlanError.
    base_prompts: the main prompt of every image of the batch when they differ (wildcards,
    Dynamic Prompts, Prompt Matrix); base_prompt is image 0's. pictures_cache: the job's encoded
    pictures (reference pictures, the background) by content and size, kept by the host across
    the batches of a job so each picture is encoded once."""
    from .lora.bind import bind_loras
    prepared_concepts, warnings, skipped = [], [], []
    prompts = list(base_prompts) if base_prompts and len(set(base_prompts)) > 1 else [base_prompt]
    auto_tokens = _auto_tokens(job, prompts, services)
    class_tokens = _class_tokens(job, prompts[0], services, warnings) if job.mode == "regional" and job.reinit else {}
    cache = networks_cache if networks_cache is not None else {}
    if job.mode == "conductor" and job.reference:
        _check_reference(job.reference)
    pictures = _Pictures(services, image_hw, pictures_cache if pictures_cache is not None else {})
    faces = FacePreparer(job, services, unet, pictures.cache)
    for i, spec in enumerate(job.concepts):
        where = f"concepts[{i}]"
        texts = _branch_prompts(job, i, prompts, warnings)   # the main prompt(s), or the concept's variants
        try:
            prompt, tagged = services.parse_tags(spec.prompt or texts[0])
        except JobError as exc:   # the parser knows no concept: name the prompt it read
            raise JobError(f"{where}.prompt" if spec.prompt else exc.field, exc.problem) from exc
        negative = spec.negative_prompt or base_negative
        requested = [(ref.name, ref.weight, f"{where}.loras[{j}]") for j, ref in enumerate(spec.loras)]
        requested += [(name, weight, f"{where}.prompt <lora:{name}>") for name, weight in tagged]
        uses, te_loras = [], []
        for name, weight, field_name in requested:
            lora = services.find_lora(name)
            if lora is None:
                raise _unknown_lora(name, field_name, services)
            if lora.arch and lora.arch != services.model_arch:
                message = (f"LoRA {lora.name!r} ({where}) is for {lora.arch.upper()} but the model is "
                           f"{services.model_arch.upper()}: skipped")
                warnings.append(message)
                skipped.append(lora.name)
                continue
            if lora.path not in cache:
                cache[lora.path] = load_network(lora.path, lora.name)
            use = LoraUse(cache[lora.path], weight)
            try:   # shapes are checked here, so a misfit is skipped by name, not half-applied
                bind_loras(unet, [use], warn=lambda m: warnings.append(f"{m.removeprefix('[Multi-Concept] ')} ({where})"))
            except LoraMismatchError as exc:
                warnings.append(f"{exc} ({where}): skipped")
                skipped.append(lora.name)
                continue
            uses.append(use)
            te_loras.append((lora, weight))
        if spec.prompt or len(set(texts)) == 1:
            cond = services.encode(prompt, te_loras)
        else:   # the main prompt (or its variant) of each image
            cond = _per_image(services, [services.parse_tags(text)[0] for text in texts], te_loras)
        uncond = services.encode(negative, te_loras) if spec.negative_prompt else None
        region = dict(auto_tokens=auto_tokens[i][0], auto_group=auto_tokens[i][1], auto_hint=_hint(spec.name),
                      auto_box=_box(spec.region), auto_tokens_per_image=auto_tokens[i][2],
                      auto_word=spec.class_word.strip()) \
            if i in auto_tokens else \
            dict(mask=region_mask(spec.region, image_hw, f"{where}.region"))
        own_tokens = None
        if job.mode == "regional" and job.enhance:
            own_tokens = _own_class_tokens(spec, prompt, services, warnings, ENHANCE_UNGUIDED)
        elif spec.reference and not spec.reference_mask:   # the subject is found in the reference by this word
            own_tokens = _own_class_tokens(spec, prompt, services, warnings, SUBJECT_UNFOUND)
        image = dict(reference=pictures.latent(spec.reference, f"{where}.reference"),
                     reference_mask=_reference_mask(spec.reference_mask, image_hw, f"{where}.reference_mask")) \
            if spec.reference else {}
        prepared_concepts.append(dict(name=spec.name, cond=cond, uncond=uncond, loras=uses, z=spec.z,
                                      class_tokens=class_tokens.get(i), own_class_tokens=own_tokens, **region,
                                      **image, face=faces.identity(i)))
    # txt2img's kept background (img2img: the host sets the init image's latent)
    background = pictures.latent(job.background, "background") if job.background and job.mode in IMAGE_MODES \
        else None
    for message in warnings:
        warn(f"[Multi-Concept] {message}")
    try:
        plan = build_plan(prepared_concepts, image_hw, background=background, instantid=faces.models, start_at=job.start_fraction(bool(auto_tokens)),
                          layout_replay=job.layout_replay, self_attn_replay_until=job.self_attn_replay_until,
                          feather=job.feather, refine_every=REFINE_EVERY if job.refine_regions else 0,
                          auto_grow=job.auto_grow, isolation=job.isolation, isolation_until=job.isolation_until,
                          reinit=job.reinit, enhance=job.enhance, mask_refine=job.mask_refine,
                          mask_refine_from=job.mask_refine_from, mask_refine_until=job.mask_refine_until,
                          mask_refine_every=job.mask_refine_every, mask_refine_k=job.mask_refine_k,
                          align_until=job.align_until, align_step=job.align_step,
                          appearance_alpha=job.appearance_alpha, dilution_beta=job.dilution_beta,
                          dilution_expand=job.dilution_expand, keep_background=job.keep_background)
    except PlanError as exc:
        if isinstance(exc, JobError):
            raise
        # the plan's mask and box of a concept are the job's region
        raise JobError(re.sub(r"\.(mask|auto_box)$", ".region", exc.field), exc.problem) from exc
    return Prepared(plan, warnings, skipped)


class _Pictures:
    """Pictures encoded by the host's VAE, by content hash and generation size: the same picture
    (two concepts, a concept and the background, every batch of a job) is encoded once."""

    def __init__(self, services: HostServices, image_hw: tuple[int, int], cache: dict):
        self.services, self.image_hw, self.cache = services, (int(image_hw[0]), int(image_hw[1])), cache

    def latent(self, png: str, field: str) -> torch.Tensor:
        key = (hashlib.sha256(png.encode("ascii", "replace")).hexdigest(), self.image_hw)
        if key not in self.cache:
            encode = getattr(self.services, "encode_picture", None)
            if encode is None:
                raise JobError(field, "image concepts and a kept background are not available on this host "
                                      "(it has no picture encoder)")
            from .regions import decode_png
            decode_png(png, field)   # a picture that does not decode is named before the host reads it
            self.cache[key] = encode(png, self.image_hw)
        return self.cache[key]


def _reference_mask(png: str, image_hw: tuple[int, int], field: str) -> torch.Tensor | None:
    """The subject's mask in the reference picture -> (H, W) float in [0, 1] at the generation's
    size, scaled to cover it and centre-cropped as the reference is (lib_mc/reference.py), so it
    lies on the subject in the encoded reference. White (or painted, with alpha) = the subject."""
    if not png:
        return None
    from .job import Region
    from .regions import png_mask
    mask = png_mask(Region("mask", png=png), field)
    h, w = int(image_hw[0]), int(image_hw[1])
    scale = max(w / mask.shape[1], h / mask.shape[0])
    size = (max(h, round(mask.shape[0] * scale)), max(w, round(mask.shape[1] * scale)))
    mask = torch.nn.functional.interpolate(mask[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    top, left = (size[0] - h) // 2, (size[1] - w) // 2
    mask = mask[top:top + h, left:left + w].clamp(0, 1).contiguous()
    if not bool((mask >= 0.5).any()):
        raise JobError(field, "is empty: paint the subject white (the rest black or transparent)")
    return mask


def _branch_prompts(job: Job, i: int, prompts: list[str], warnings: list[str]) -> list[str]:
    """Each image's prompt for concept i's branch: the main prompt, or, for a concept with identity
    words and no prompt of its own, the main prompt with the class words replaced by them (a
    prompt without its class word keeps the main prompt, with a warning)."""
    spec = job.concepts[i]
    if spec.prompt or not spec.token:
        return prompts
    if not spec.class_word:
        warnings.append(f"concept {spec.name!r} has identity words ({spec.token!r}) but no class word: its branch "
                        "takes the main prompt (give it the word of the main prompt that names it)")
        return prompts
    texts = []
    for image, prompt in enumerate(prompts):
        variant = concept_variant(prompt, job.concepts, i)
        if variant is None:
            where = "the main prompt" if len(prompts) == 1 else f"the main prompt of image {image + 1}"
            warnings.append(f"concept {spec.name!r}: its class word {spec.class_word!r} is not in {where}, so its "
                            f"identity words are not put in: its branch takes the main prompt")
        texts.append(prompt if variant is None else variant)
    return texts


def _check_reference(png: str) -> None:
    """The reference picture decodes (the host adapter reads it again where it encodes it)."""
    from .regions import decode_png
    try:
        decode_png(png, "reference")
    except JobError as exc:
        raise JobError("reference", exc.problem.replace("masks may be", "a reference picture may be")
                       + " (a conductor-mode option)") from exc


def _auto_tokens(job: Job, prompts: list[str], services: HostServices
                 ) -> dict[int, tuple[list[int], int, list[list[int]] | None]]:
    """Concept index -> (context positions of its class word in the main prompt, group id, the
    positions in each image's prompt when the batch's prompts differ); concepts given the same
    occurrence share a group and are split in space."""
    auto = [i for i, c in enumerate(job.concepts) if c.region.type == "auto"]
    if not auto:
        return {}
    if not hasattr(services, "word_positions"):
        raise JobError(f"concepts[{auto[0]}].region", "automatic regions are not available on this host")
    words = []
    for i in auto:
        word = job.concepts[i].class_word.strip()
        if not word:
            raise JobError(f"concepts[{i}].class_word", "is empty: an automatic region finds the subject "
                                                        "by the word of the main prompt that names it, e.g. woman")
        words.append(word)
    picked_per_image, groups_per_image = [], []
    for image, prompt in enumerate(prompts):
        occurrences = {}
        for i, word in zip(auto, words):
            if word not in occurrences:
                occurrences[word] = services.word_positions(prompt, word)
                if not occurrences[word]:
                    where = "the main prompt" if len(prompts) == 1 else f"the main prompt of image {image + 1} ({prompt!r})"
                    raise JobError(f"concepts[{i}].class_word", f"{word!r} is not in {where}; automatic regions "
                                                                "need it there (as written, e.g. 'woman' not 'women')")
        picked = assign_occurrences(words, occurrences)
        groups: dict[tuple[int, ...], int] = {}
        picked_per_image.append(picked)
        groups_per_image.append([groups.setdefault(tuple(tokens), len(groups)) for tokens in picked])
    if any(g != groups_per_image[0] for g in groups_per_image):
        raise JobError(f"concepts[{auto[0]}].class_word", "the batch's prompts name the class words a different "
                                                          "number of times; automatic regions need the same words in every image's prompt")
    per_image = len(prompts) > 1
    return {i: (picked_per_image[0][slot], groups_per_image[0][slot],
                [p[slot] for p in picked_per_image] if per_image else None) for slot, i in enumerate(auto)}


def _class_tokens(job: Job, prompt: str, services: HostServices, warnings: list[str]) -> dict[int, list[int]]:
    """Concept index -> positions of its class word in the main prompt, for the drawn concepts
    that latent re-initialisation moves (a concept without one keeps its noise, with a warning)."""
    found = {}
    for i, spec in enumerate(job.concepts):
        if spec.region.type == "auto":
            continue   # its region is found later in the pass
        word = spec.class_word.strip()
        positions = services.word_positions(prompt, word) if word and hasattr(services, "word_positions") else []
        if positions:
            found[i] = positions[0]
        else:
            warnings.append(f"re-initialisation: concept {spec.name!r} keeps its noise (give it a class word "
                            "that is in the main prompt to move it)")
    return found


ENHANCE_UNGUIDED = ("concept enhancement: concept {name!r} is not guided (give it a class word that is "
                    "in its own prompt)")
SUBJECT_UNFOUND = ("image concept {name!r}: without a reference mask its subject is found by its class word, "
                   "which is not in its own prompt: the whole reference picture counts as the subject "
                   "(give it a class word, or a reference mask)")


def _own_class_tokens(spec, prompt: str, services: HostServices, warnings: list[str], missing: str) -> list[int] | None:
    """Positions of the concept's class word in its own prompt, whose attention concept
    enhancement guides or that finds an image concept's subject in its reference (a concept
    without one: the `missing` warning)."""
    word = spec.class_word.strip()
    positions = services.word_positions(prompt, word) if word and hasattr(services, "word_positions") else []
    if not positions:
        warnings.append(missing.format(name=spec.name))
        return None
    return positions[0]


def _per_image(services: HostServices, prompts: list[str], loras) -> Conditioning:
    """One conditioning row per image; prompts of fewer 75-token chunks are padded with their last
    token vector, as A1111 stacks a batch's prompts of different lengths."""
    encoded: dict[str, Conditioning] = {}
    for text in prompts:
        if text not in encoded:
            encoded[text] = services.encode(text, loras)
    rows = [encoded[text] for text in prompts]
    stacked = {}
    for key in rows[0]:
        tensors = [row[key] for row in rows]
        if tensors[0].dim() == 3:
            length = max(t.shape[1] for t in tensors)
            tensors = [pad_context(t, length) for t in tensors]
        stacked[key] = torch.cat(tensors)
    return stacked


def _box(region) -> tuple[float, float, float, float] | None:
    """The box an automatic region is searched in; a box that is the whole image is no box."""
    box = (region.x, region.y, region.w, region.h)
    whole = all(abs(v - d) < 1e-3 for v, d in zip(box, (0, 0, 1, 1)))
    return box if region.boxed and not whole else None


def _hint(name: str) -> str:
    """"left man", "the largest dog": which part of a shared class word's area the concept takes."""
    words = re.findall(r"[a-z]+", (name or "").lower())
    return next((w for w in words if w in HINTS), "")
