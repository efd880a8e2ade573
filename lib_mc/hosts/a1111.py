"""AUTOMATIC1111 v1.10 adapter. Imported only inside A1111 (it imports `modules`).

Flow per job:
- `process`: parse the job argument; put it in the infotext. Problems are stored, not raised:
  A1111 swallows exceptions raised in script hooks, so they are raised later from the sampler
  call, which stops the job with the WebUI's error display (API: an error response).
- `process_batch` (main-prompt LoRAs are active): resolve LoRAs, encode concept prompts with
  their text-encoder LoRAs, build masks and the engine Plan.
- `process_before_every_sampling` (first pass only, not hires): wrap this batch's
  `sampler.sample` so that it samples twice: stage 1 plain and recorded, then `p.rng` is
  recreated and stage 2 runs with the engine. Every patch is undone in `finally`.
- `postprocess`: with `save_layout`, add the stage-1 images and a mask overlay.
"""

from __future__ import annotations

import copy
import re
import sys
from dataclasses import dataclass, field

import torch

from modules import devices, prompt_parser, rng, shared
from modules import extra_networks as host_extra_networks

from ..auto.tokens import find_word
from ..engine import MultiConceptSession
from ..errors import EngineError, MultiConceptError
from ..infotext import KEY as INFOTEXT_KEY, job_to_infotext
from ..job import Job, JobError, parse_job
from ..lora.network import Network
from ..patcher import PatchSet
from ..prepare import LoraFile, Prepared, prepare
from ..regions import encode_png
from . import a1111_sam
from .a1111_xyz import XYZ_ATTR
from .cfg_calls import CondRows, unpack_cond
from .layout_images import layout_outputs



@dataclass
class JobState:
    job: Job | None = None
    error: Exception | None = None
    prepared: Prepared | None = None
    networks: dict[str, Network] = field(default_factory=dict)
    layouts: list[tuple[torch.Tensor, object]] = field(default_factory=list)   # (stage-1 latents, plan)
    found: dict[int, dict[int, str]] = field(default_factory=dict)   # image index -> concept -> found mask PNG


class ImageInfotext:
    """The job for one image's infotext (A1111 calls it with the image's `index`): automatic
    regions carry the masks found for that very image, so pasting it brings them back drawn."""

    def __init__(self, state: JobState):
        self.state = state

    def __call__(self, index=None, **kwargs) -> str:
        job = self.state.job
        found = self.state.found.get(index or 0)
        if found:
            job = copy.deepcopy(job)
            for concept_index, png in found.items():
                job.concepts[concept_index].region.found = png
        return job_to_infotext(job)


def _state(p) -> JobState | None:
    return getattr(p, "_multi_concept", None)


def _lora_module():
    module = sys.modules.get("networks")
    if module is None or not hasattr(module, "available_networks"):
        raise JobError("loras", "the WebUI's built-in Lora extension is not loaded")
    return module


def lora_names() -> list[str]:
    return list(_lora_module().available_networks)


def refresh_lora_names() -> list[str]:
    networks = _lora_module()
    networks.list_available_networks()
    return list(networks.available_networks)


class A1111Services:
    """What `prepare` needs from the host: its LoRA list, text encoder and tag parser."""

    def __init__(self, p):
        self.p = p
        self.networks = _lora_module()
        model = p.sd_model
        self.model_arch = "sdxl" if getattr(model, "is_sdxl", False) else (
            "sd2" if getattr(model, "is_sd2", False) else "sd1")

    def lora_names(self) -> list[str]:
        return list(self.networks.available_network_aliases)

    def find_lora(self, name: str) -> LoraFile | None:
        nets = self.networks
        on_disk = nets.available_network_aliases.get(name) or nets.available_networks.get(name)
        if on_disk is None:
            nets.list_available_networks()   # a file added since start-up
            on_disk = nets.available_network_aliases.get(name) or nets.available_networks.get(name)
        if on_disk is None:
            return None
        version = getattr(getattr(on_disk, "sd_version", None), "name", "Unknown")
        arch = {"SD1": "sd1", "SD2": "sd2", "SDXL": "sdxl"}.get(version)
        return LoraFile(name, on_disk.filename, arch)

    def parse_tags(self, prompt: str):
        clean, found = host_extra_networks.parse_prompt(prompt)
        loras = []
        for kind in ("lora", "lyco"):
            for params in found.get(kind, []):
                items = params.items
                try:
                    weight = float(items[1]) if len(items) > 1 else 1.0
                except ValueError as exc:
                    raise JobError("prompt", f"<{kind}:{':'.join(items)}>: weight is not a number") from exc
                loras.append((items[0], weight))
        for kind in found:
            if kind not in ("lora", "lyco"):
                print(f"[Multi-Concept] <{kind}:...> in a concept prompt is ignored; only LoRA tags apply there")
        return clean, loras

    def word_positions(self, prompt: str, word: str) -> list[list[int]]:
        """Where the word's tokens sit in the prompt's conditioning: A1111 encodes a prompt as
        chunks of 77 tokens (start, 75, end), concatenated; SDXL's encoders share positions."""
        model = self.p.sd_model
        text_model = model.conditioner.embedders[0] if hasattr(model, "conditioner") else model.cond_stage_model
        chunks, _ = text_model.tokenize_line(prompt)
        ids = [token for chunk in chunks for token in chunk.tokens]
        return find_word(ids, text_model.tokenize([word])[0])

    def encode(self, prompt: str, loras: list[tuple[LoraFile, float]]) -> dict:
        """The concept prompt's conditioning, with its LoRAs' text-encoder part active on top of
        the main prompt's (their UNet part at 0: the engine applies that per row)."""
        nets = self.networks
        main = [(n.name, n.te_multiplier, n.unet_multiplier, getattr(n, "dyn_dim", None))
                for n in nets.loaded_networks]
        if loras:
            extra = [(lora.name, weight, 0.0, None) for lora, weight in loras]
            nets.load_networks(*[list(col) for col in zip(*(main + extra))])
        try:
            texts = prompt_parser.SdConditioning([prompt], width=self.p.width, height=self.p.height)
            with devices.autocast(), torch.no_grad():
                cond = self.p.sd_model.get_learned_conditioning(texts)
        finally:
            if loras:
                if main:
                    nets.load_networks(*[list(col) for col in zip(*main)])
                else:
                    nets.load_networks([], [], [], [])
        if isinstance(cond, dict):
            return {key: value.detach() for key, value in cond.items()}
        return {"c_crossattn": cond.detach()}


# ---- hooks ------------------------------------------------------------------------------------

def process(p, job_arg) -> None:
    p._multi_concept = None
    try:
        job = parse_job(job_arg)
        for key, value in (getattr(p, XYZ_ATTR, None) or {}).items():
            setattr(job, key, value)
        if not job.enabled:
            return
        if job.enabled and not job.concepts:
            raise JobError("concepts", "is empty: add at least one concept or disable Multi-Concept")
        if re.search(r"\bAND\b", p.prompt or ""):
            raise JobError("prompt", "AND (composable prompts) cannot be combined with Multi-Concept")
        p._multi_concept = JobState(job)
        p.extra_generation_params[INFOTEXT_KEY] = ImageInfotext(p._multi_concept)
    except MultiConceptError as exc:
        p._multi_concept = JobState(error=exc)
        print(f"[Multi-Concept] {exc}")


def process_batch(p, **kwargs) -> None:
    state = _state(p)
    if state is None or state.error is not None:
        return
    try:
        state.prepared = prepare(
            state.job, base_prompt=p.prompts[0], base_negative=p.negative_prompts[0],
            image_hw=(p.height, p.width), unet=p.sd_model.model.diffusion_model,
            services=A1111Services(p), networks_cache=state.networks)
        if state.prepared.warnings:
            p.extra_generation_params["Multi-Concept warnings"] = "; ".join(state.prepared.warnings)
    except MultiConceptError as exc:
        state.error = exc
        print(f"[Multi-Concept] {exc}")


def process_before_every_sampling(p, **kwargs) -> None:
    state = _state(p)
    if state is None or getattr(p, "is_hr_pass", False) or getattr(p, "sampler", None) is None:
        return
    sampler = p.sampler
    original = sampler.sample

    def two_stage_sample(p_, x, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        sampler.__dict__.pop("sample", None)   # one shot: the hires pass gets the plain sampler
        if state.error is not None:
            raise state.error
        if state.prepared is None:
            raise EngineError("the job was not prepared for this batch (process_batch did not run)")
        return _two_stage(p_, sampler, original, state, x, conditioning, unconditional_conditioning,
                          steps, image_conditioning)
    sampler.sample = two_stage_sample


def _two_stage(p, sampler, original, state: JobState, x, c, uc, steps, image_conditioning):
    session = MultiConceptSession(p.sd_model.model.diffusion_model, state.prepared.plan,
                                  context_key="crossattn" if getattr(p.sd_model, "is_sdxl", False) else "c_crossattn")
    cfg = sampler.model_wrap_cfg
    inner = cfg.inner_model
    rows = CondRows()
    stage1_calls = []

    def cfg_forward(original_forward):
        def forward(x_, sigma, *args, **kwargs):
            rows.begin(x_.shape[0])
            return original_forward(x_, sigma, *args, **kwargs)
        return forward

    def inner_forward(original_forward):
        def forward(x_in, sigma_in, **kwargs):
            plain, pack = unpack_cond(kwargs.pop("cond"))
            n_cond = rows.take(x_in.shape[0])
            total = stage1_calls[0] if stage1_calls else max(1, int(getattr(cfg, "total_steps", 0) or p.steps))
            return session.denoise(lambda xx, ss, cc: original_forward(xx, ss, cond=pack(cc), **kwargs),
                                   x_in, sigma_in, plain, n_cond=n_cond, step=cfg.step, total_steps=total)
        return forward

    routing = PatchSet()
    routing.add(cfg, "forward", cfg_forward)
    routing.add(inner, "forward", inner_forward)
    initial = x.clone()
    with routing:
        with session.stage1():
            first = original(p, x, c, uc, steps=steps, image_conditioning=image_conditioning)
        if shared.state.interrupted or shared.state.skipped:
            return first
        stage1_calls.append(rows.calls)
        state.layouts.append((first.detach().to(devices.cpu), state.prepared.plan))
        old = p.rng
        p.rng = rng.ImageRNG(old.shape, old.seeds, subseeds=old.subseeds, subseed_strength=old.subseed_strength,
                             seed_resize_from_h=old.seed_resize_from_h, seed_resize_from_w=old.seed_resize_from_w)
        again = p.rng.next()
        if not torch.equal(again.to(initial.device), initial):
            raise EngineError("recreating the WebUI's noise generator did not reproduce the initial noise")
        if session.recorder is not None:   # automatic regions: attention (+ faces), then SAM when there is one
            plan = state.prepared.plan
            notes: list[str] = []
            images = a1111_sam.layout_images(p, first)
            groups = [plan.concepts[i].auto_group for i in plan.auto_concepts]
            shared_word = len(set(groups)) < len(groups)
            faces = a1111_sam.detect_faces(images, plan.regions.latent_hw, notes) if shared_word else None
            found = session.find_regions(faces=faces)
            refined = a1111_sam.refine(images, found, notes)
            if refined is not None:
                plan.resolve_auto(refined)
            if notes:
                state.prepared.warnings.extend(n for n in notes if n not in state.prepared.warnings)
                p.extra_generation_params["Multi-Concept warnings"] = "; ".join(state.prepared.warnings)
        with session.stage2():
            result = original(p, again, c, uc, steps=steps, image_conditioning=image_conditioning)
        _remember_found(p, state)
        return result


def _remember_found(p, state: JobState) -> None:
    plan = state.prepared.plan
    if plan.found_masks is None:
        return
    auto = plan.auto_concepts
    for b in range(plan.found_masks.shape[0]):
        index = getattr(p, "iteration", 0) * p.batch_size + b
        state.found[index] = {concept: encode_png(plan.found_masks[b, slot]) for slot, concept in enumerate(auto)}


def postprocess(p, processed) -> None:
    state = _state(p)
    if state is None or state.job is None or not state.job.save_layout or not state.layouts:
        return
    try:
        images = layout_outputs(p.sd_model, state.layouts, [c.name for c in state.job.concepts])
    except Exception as exc:  # an extra output must never cost the user the image
        print(f"[Multi-Concept] could not make the layout images: {exc}")
        return
    processed.images.extend(images)
    processed.infotexts.extend([processed.infotexts[0] if processed.infotexts else ""] * len(images))
