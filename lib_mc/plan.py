"""A validated description of one multi-concept job.

Hosts build a Plan from their own inputs; everything wrong with those inputs surfaces here as a
PlanError naming the field, before any model is touched. The base prompt's conditioning is not
stored: it arrives with every denoiser call (hosts may schedule prompts per step).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

import torch

from .errors import PlanError
from .lora.bind import LoraUse
from .lora.network import Network
from .masks import RegionWeights, check_mask

Conditioning = dict[str, torch.Tensor]


@dataclass
class Concept:
    name: str
    cond: Conditioning                 # its prompt; keys override the host's conditioning rows
    uncond: Conditioning | None        # its negative prompt; None = the host's negative
    loras: list[LoraUse]
    mask: torch.Tensor | None          # (H, W) float in [0, 1], validated; None: found automatically
    z: float | None = None             # higher sits in front; default: later concepts in front
    auto_tokens: list[int] | None = None  # automatic region: base-prompt context positions of its class word
    auto_tokens_per_image: list[list[int]] | None = None   # ... per image, when the batch's prompts differ
    auto_group: int = -1               # automatic concepts with the same group share those tokens
    auto_hint: str = ""                # which part of a shared word's area: "left", "right", "largest"
    auto_box: tuple[float, float, float, float] | None = None   # the subject is inside (x, y, w, h), fractions
    auto_word: str = ""                # its class word as written (Grounding DINO's prompt)
    class_tokens: list[int] | None = None   # base-prompt positions of its class word (regional re-initialisation)
    own_class_tokens: list[int] | None = None   # ... in its own prompt (regional concept enhancement)
    # image concept (blend, conductor): its appearance comes from a reference picture
    reference: torch.Tensor | None = None        # (1, 4, h, w) the picture's VAE latent at the generation's latent size
    reference_mask: torch.Tensor | None = None   # (H, W) the subject in the reference; None: the whole picture
    # face concept (blend, conductor): its identity from face photos through InstantID (methods/faces)
    face: Any = None                             # a FaceIdentity; None: not a face concept


@dataclass
class Options:
    start_at: float = 0.3              # fraction of steps after which blending starts
    layout_replay: bool = True         # base rows take the layout row's cross-attention
    self_attn_replay_until: float = 0.4  # ... and low-res self-attention until this fraction
    feather: float = 0.0               # mask feather, image pixels
    max_rows_per_call: int | None = None  # split concept rows into further UNet calls above this
    auto_from: float = 0.3             # automatic regions: stage-1 attention counts from this fraction of steps
    refine_every: int = 0              # automatic regions: re-segment every this many stage-2 steps (0 = never)
    refine_until: float = 0.7          # ... from the start step until this fraction of steps
    refine_clusters: int = 0           # k-means segments (0: concepts + 2)
    auto_grow: float = 0.0             # found masks grow (> 0) or shrink by this many image pixels
    # regional mode only
    isolation: bool = True             # self-attention: a concept's queries skip other concepts' keys
    isolation_until: float = 1.0       # ... during this fraction of steps
    reinit: bool = False               # re-initialise each drawn concept's noise from a probe at the first step
    enhance: bool = False              # gradient guidance on the concepts' attention during the first steps
    # conductor mode only
    mask_refine: bool = True           # every concept's mask re-segmented from decoder self-attention (k-means)
    mask_refine_from: float = 0.25     # ... from this fraction of the steps
    mask_refine_until: float = 0.4     # ... until this one
    mask_refine_every: float = 0.025   # ... every this fraction of the steps (the paper: 5 of 200)
    mask_refine_k: int = 0             # k-means segments; 0: every k from N + 1 to 2N + 1 (the paper)
    align_until: float = 0.3           # with a reference picture: layout alignment during this fraction of steps
    align_step: float = 0.0            # ... gradient step size; 0: the paper's (10 SD1.5, 40 SDXL)
    # image concepts and a kept background (blend, conductor; PnP-MIX)
    appearance_alpha: float = 0.15     # V = V_concept + alpha * (V_concept - V_reference)
    dilution_beta: float = 0.8         # the reference row outside the subject's grown box: beta * background
    dilution_expand: float = 0.1       # the subject's box grows by this fraction of the image side on each side
    keep_background: bool = True       # outside every region the prediction is the kept background


@dataclass
class Plan:
    concepts: list[Concept]
    image_size: tuple[int, int]
    options: Options
    regions: RegionWeights = field(repr=False)   # automatic concepts: full image until found
    image_regions: list[RegionWeights] | None = field(default=None, repr=False)   # per image, once found
    found_masks: torch.Tensor | None = field(default=None, repr=False)   # (B, n_auto, h, w) latent cells
    # how the automatic masks were found, for the save_layout outputs: (label, (B, n_auto, h, w)) in
    # order (attention maps, attention masks, SAM, cleaned/grown, each refinement), and face boxes
    mask_steps: list[tuple[str, torch.Tensor]] = field(default_factory=list, repr=False)
    face_boxes: list | None = field(default=None, repr=False)   # per image: (k, 4) boxes in attention cells
    # conductor mode: every concept's own mask per image (B, n, h, w) once refined (drawn ones too)
    concept_masks: torch.Tensor | None = field(default=None, repr=False)
    # a kept background (1 or B, 4, h, w): its VAE latent (txt2img: a picture; img2img: the init latent)
    background: torch.Tensor | None = field(default=None, repr=False)
    # face concepts: InstantID's models (methods/faces/identity.py InstantID) and where each face goes
    instantid: Any = field(default=None, repr=False)
    face_kps: dict | None = field(default=None, repr=False)   # concept -> per image (5, 2) keypoints, image fractions

    @property
    def face_concepts(self) -> list[int]:
        """Concepts whose face photos act through InstantID (not only scored)."""
        return [i for i, c in enumerate(self.concepts) if c.face is not None and c.face.acts]

    @property
    def image_concepts(self) -> list[int]:
        return [i for i, c in enumerate(self.concepts) if c.reference is not None]

    def set_background(self, latent: torch.Tensor | None) -> None:
        """The kept background's latent (None: none); checked against the generation's latent size."""
        self.background = None if latent is None else _latent(latent, "background", self.regions.latent_hw, batch=True)

    @property
    def auto_concepts(self) -> list[int]:
        return [i for i, c in enumerate(self.concepts) if c.auto_tokens is not None]

    def back_to_front(self) -> list[int]:
        """By z when given, else list order (later in front); stable for ties."""
        return sorted(range(len(self.concepts)),
                      key=lambda i: (self.concepts[i].z if self.concepts[i].z is not None else i, i))

    def resolve_auto(self, found: torch.Tensor) -> None:
        """found: (B, n_auto, h, w) masks of the automatic concepts, one set per image."""
        auto = self.auto_concepts
        if found.shape[1] != len(auto):
            raise PlanError("auto masks", f"{found.shape[1]} masks for {len(auto)} automatic concepts")
        self.found_masks = found
        per_image = []
        for b in range(found.shape[0]):
            masks = [c.mask for c in self.concepts]
            for slot, index in enumerate(auto):
                masks[index] = found[b, slot]
            per_image.append(RegionWeights(masks, self.image_size, back_to_front=self.back_to_front(),
                                           feather_px=self.options.feather))
        self.image_regions = per_image
        self.regions = per_image[0]

    def set_concept_masks(self, masks: torch.Tensor) -> None:
        """masks: (B, n, h, w) every concept's own mask per image (coverages, before the
        front-to-back compositing); the automatic concepts' found masks follow them."""
        if masks.dim() != 4 or masks.shape[1] != len(self.concepts):
            raise PlanError("concept masks", f"shape {tuple(masks.shape)} is not (images, {len(self.concepts)}, h, w)")
        self.concept_masks = masks
        self.image_regions = [RegionWeights(list(masks[b]), self.image_size, back_to_front=self.back_to_front(),
                                            feather_px=self.options.feather) for b in range(masks.shape[0])]
        self.regions = self.image_regions[0]
        auto = self.auto_concepts
        if auto:
            size = tuple(self.found_masks.shape[-2:]) if self.found_masks is not None else tuple(masks.shape[-2:])
            self.found_masks = torch.nn.functional.interpolate(masks[:, auto].float(), size=size, mode="nearest")

    def weights_for(self, x: torch.Tensor, images: list[int]) -> torch.Tensor:
        """Blend weights (n + 1, rows or 1, 1, h, w) for the rows of x, row r being of image images[r]."""
        if self.image_regions is None:
            return self.regions.latent_on(x)
        last = len(self.image_regions) - 1
        stacked = torch.stack([self.image_regions[min(b, last)].latent for b in images], 1)
        return stacked.to(x.device, x.dtype)[:, :, None]

    def at_size(self, image_size: tuple[int, int]) -> "Plan":
        """This plan at another image size, for a single pass that blends every concept from the
        first step (the hires fix's second pass): the same concepts and regions, automatic ones
        as found for each image (refined ones as refined), feather scaled, no layout replay or refinement."""
        hw = (int(image_size[0]), int(image_size[1]))
        scale = hw[0] / self.image_size[0]
        options = replace(self.options, start_at=0.0, layout_replay=False, refine_every=0, reinit=False, enhance=False,
                          mask_refine=False, align_until=0.0, feather=self.options.feather * scale)
        masks = [c.mask if c.mask is not None else torch.ones(hw) for c in self.concepts]
        # reference pictures and the background are latents of the first size: not used at another
        concepts = [replace(c, reference=None, reference_mask=None) for c in self.concepts]
        plan = Plan(concepts, hw, options,
                    regions=RegionWeights(masks, hw, back_to_front=self.back_to_front(), feather_px=options.feather),
                    instantid=self.instantid, face_kps=self.face_kps)   # keypoints are fractions: any size
        if self.concept_masks is not None:
            plan.set_concept_masks(self.concept_masks)   # refined (conductor): every concept's, per image
        elif self.found_masks is not None:
            plan.resolve_auto(self.found_masks)
        return plan

    def start_step(self, total_steps: int) -> int:
        return _fraction_to_step(self.options.start_at, total_steps)

    def auto_from_step(self, total_steps: int) -> int:
        return _fraction_to_step(self.options.auto_from, total_steps)

    def refine_until_step(self, total_steps: int) -> int:
        return _fraction_to_step(self.options.refine_until, total_steps)

    def self_replay_until_step(self, total_steps: int) -> int:
        if not self.options.layout_replay:
            return 0
        return _fraction_to_step(self.options.self_attn_replay_until, total_steps)


def _fraction_to_step(fraction: float, total_steps: int) -> int:
    return min(total_steps, max(0, int(round(fraction * total_steps))))


def _number(value: Any, name: str, low: float | None = None, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise PlanError(name, f"must be a number, got {value!r}")
    value = float(value)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"[{low:g}, {high:g}]" if high is not None else f">= {low:g}"
        raise PlanError(name, f"must be in {bounds}, got {value:g}")
    return value


def _conditioning(value: Any, name: str, optional: bool = False) -> Conditioning | None:
    if value is None and optional:
        return None
    if isinstance(value, torch.Tensor):
        value = {"c_crossattn": value}
    if not isinstance(value, Mapping) or not value:
        raise PlanError(name, "must be a non-empty mapping of conditioning tensors")
    for key, tensor in value.items():
        if not isinstance(tensor, torch.Tensor) or tensor.dim() == 0:
            raise PlanError(f"{name}.{key}", "must be a batched tensor")
    return dict(value)


def _loras(value: Any, name: str) -> list[LoraUse]:
    if value is None:
        return []
    if not isinstance(value, Sequence) or isinstance(value, (str, bytes)):
        raise PlanError(name, "must be a list")
    uses = []
    for i, item in enumerate(value):
        if isinstance(item, LoraUse):
            network, weight = item.network, item.weight
        elif isinstance(item, Sequence) and len(item) == 2:
            network, weight = item
        else:
            raise PlanError(f"{name}[{i}]", "must be a LoraUse or a (network, weight) pair")
        if not isinstance(network, Network):
            raise PlanError(f"{name}[{i}]", f"is not a loaded LoRA ({type(network).__name__})")
        uses.append(LoraUse(network, _number(weight, f"{name}[{i}].weight")))
    return uses


def _concept(item: Any, i: int) -> Concept:
    name = f"concepts[{i}]"
    if isinstance(item, Concept):
        item = vars(item)
    if not isinstance(item, Mapping):
        raise PlanError(name, "must be a Concept or a mapping")
    auto = item.get("auto_tokens")
    if auto is not None and (not isinstance(auto, Sequence) or not auto or
                             not all(isinstance(t, int) and t >= 0 for t in auto)):
        raise PlanError(f"{name}.auto_tokens", f"must be a non-empty list of token positions, got {auto!r}")
    per_image = item.get("auto_tokens_per_image")
    if per_image is not None and (auto is None or not isinstance(per_image, Sequence) or not per_image or not all(
            isinstance(g, Sequence) and g and all(isinstance(t, int) and t >= 0 for t in g) for g in per_image)):
        raise PlanError(f"{name}.auto_tokens_per_image", "must be a non-empty list of token positions per image "
                                                         f"(with auto_tokens), got {per_image!r}")
    if auto is None and ("mask" not in item or item["mask"] is None):
        raise PlanError(f"{name}.mask", "is missing")
    z = item.get("z")
    return Concept(
        name=str(item.get("name") or f"concept {i + 1}"),
        cond=_conditioning(item.get("cond"), f"{name}.cond"),
        uncond=_conditioning(item.get("uncond"), f"{name}.uncond", optional=True),
        loras=_loras(item.get("loras"), f"{name}.loras"),
        mask=None if auto is not None else check_mask(item["mask"], f"{name}.mask"),
        z=None if z is None else _number(z, f"{name}.z"),
        auto_tokens=None if auto is None else list(auto),
        auto_tokens_per_image=None if per_image is None else [list(g) for g in per_image],
        auto_group=int(item.get("auto_group", i)),
        auto_hint=str(item.get("auto_hint") or ""),
        auto_box=_box(item.get("auto_box"), f"{name}.auto_box"),
        auto_word=str(item.get("auto_word") or ""),
        class_tokens=_positions(item.get("class_tokens"), f"{name}.class_tokens"),
        own_class_tokens=_positions(item.get("own_class_tokens"), f"{name}.own_class_tokens"),
        reference=item.get("reference"),   # checked against the latent size in build_plan
        face=item.get("face"),
        reference_mask=None if item.get("reference_mask") is None else check_mask(item["reference_mask"],
                                                                                  f"{name}.reference_mask"),
    )


def _latent(value: Any, name: str, latent_hw: tuple[int, int], batch: bool = False) -> torch.Tensor:
    """A VAE latent (1, 4, h, w) (batch: (B, 4, h, w)) at the generation's latent size."""
    if not isinstance(value, torch.Tensor) or value.dim() != 4 or not value.dtype.is_floating_point:
        raise PlanError(name, f"must be a float latent tensor (1, 4, h, w), got {_described(value)}")
    if (value.shape[0] != 1 and not batch) or value.shape[0] < 1 or tuple(value.shape[-2:]) != tuple(latent_hw):
        raise PlanError(name, f"latent {tuple(value.shape)} does not match the generation's latent "
                              f"({'B' if batch else 1}, C, {latent_hw[0]}, {latent_hw[1]})")
    if not torch.isfinite(value).all():
        raise PlanError(name, "contains NaN or infinity")
    return value.detach()


def _described(value: Any) -> str:
    return f"shape {tuple(value.shape)} {value.dtype}" if isinstance(value, torch.Tensor) else type(value).__name__


def _positions(value: Any, name: str) -> list[int] | None:
    if value is None:
        return None
    if not isinstance(value, Sequence) or not value or not all(isinstance(t, int) and t >= 0 for t in value):
        raise PlanError(name, f"must be a non-empty list of token positions, got {value!r}")
    return list(value)


def _box(value: Any, name: str) -> tuple[float, float, float, float] | None:
    if value is None:
        return None
    if not isinstance(value, Sequence) or len(value) != 4:
        raise PlanError(name, f"must be (x, y, w, h) fractions of the image, got {value!r}")
    x, y, w, h = (_number(v, name, 0.0, 1.0) for v in value)
    if w <= 0 or h <= 0 or x + w > 1.0001 or y + h > 1.0001:
        raise PlanError(name, f"must be a non-empty box inside the image, got {tuple(value)}")
    return x, y, w, h


def build_plan(concepts: Sequence[Any], image_size: Sequence[int], background: torch.Tensor | None = None,
               instantid: Any = None, **options: Any) -> Plan:
    """Validate everything for one job. Raises PlanError naming the field."""
    if not isinstance(image_size, Sequence) or len(image_size) != 2 or not all(
            isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0 for v in image_size):
        raise PlanError("image_size", f"must be (height, width) in positive pixels, got {image_size!r}")
    unknown = set(options) - set(Options.__dataclass_fields__)
    if unknown:
        raise PlanError(sorted(unknown)[0], "is not an engine option")
    opts = Options(**options)
    opts.start_at = _number(opts.start_at, "start_at", 0.0, 1.0)
    opts.self_attn_replay_until = _number(opts.self_attn_replay_until, "self_attn_replay_until", 0.0, 1.0)
    opts.feather = _number(opts.feather, "feather", 0.0)
    opts.auto_from = _number(opts.auto_from, "auto_from", 0.0, 1.0)
    opts.refine_until = _number(opts.refine_until, "refine_until", 0.0, 1.0)
    opts.auto_grow = _number(opts.auto_grow, "auto_grow")
    opts.isolation_until = _number(opts.isolation_until, "isolation_until (regional mode)", 0.0, 1.0)
    for name in ("mask_refine_from", "mask_refine_until", "mask_refine_every", "align_until"):
        setattr(opts, name, _number(getattr(opts, name), f"{name} (conductor mode)", 0.0, 1.0))
    opts.align_step = _number(opts.align_step, "align_step (conductor mode)", 0.0)
    opts.appearance_alpha = _number(opts.appearance_alpha, "appearance_alpha", 0.0, 10.0)
    opts.dilution_beta = _number(opts.dilution_beta, "dilution_beta", 0.0, 1.0)
    opts.dilution_expand = _number(opts.dilution_expand, "dilution_expand", 0.0, 1.0)
    if not isinstance(opts.keep_background, bool):
        raise PlanError("keep_background", f"must be true or false, got {opts.keep_background!r}")
    if not isinstance(opts.mask_refine, bool):
        raise PlanError("mask_refine (conductor mode)", f"must be true or false, got {opts.mask_refine!r}")
    if isinstance(opts.mask_refine_k, bool) or not isinstance(opts.mask_refine_k, int) or opts.mask_refine_k < 0:
        raise PlanError("mask_refine_k (conductor mode)", f"must be a whole number >= 0, got {opts.mask_refine_k!r}")
    for name in ("isolation", "reinit", "enhance"):
        if not isinstance(getattr(opts, name), bool):
            raise PlanError(f"{name} (regional mode)", f"must be true or false, got {getattr(opts, name)!r}")
    for name in ("refine_every", "refine_clusters"):
        value = getattr(opts, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise PlanError(name, f"must be a whole number >= 0, got {value!r}")
    if not isinstance(opts.layout_replay, bool):
        raise PlanError("layout_replay", f"must be true or false, got {opts.layout_replay!r}")
    if opts.max_rows_per_call is not None and (
            not isinstance(opts.max_rows_per_call, int) or opts.max_rows_per_call < 1):
        raise PlanError("max_rows_per_call", f"must be a positive integer, got {opts.max_rows_per_call!r}")
    if isinstance(concepts, (str, bytes, Mapping)) or not isinstance(concepts, Sequence):
        raise PlanError("concepts", "must be a list")
    if not concepts:
        raise PlanError("concepts", "is empty: add at least one concept or disable Multi-Concept")
    parsed = [_concept(item, i) for i, item in enumerate(concepts)]
    hw = (int(image_size[0]), int(image_size[1]))
    plan = Plan(parsed, hw, opts, regions=None, instantid=instantid)
    if plan.face_concepts and instantid is None:
        raise PlanError("instantid", "face concepts need InstantID's models")
    # until the layout pass finds them, automatic regions cover the image (never blended so)
    masks = [c.mask if c.mask is not None else torch.ones(hw) for c in parsed]
    plan.regions = RegionWeights(masks, hw, back_to_front=plan.back_to_front(), feather_px=opts.feather)
    for i, concept in enumerate(parsed):
        if concept.reference is not None:
            concept.reference = _latent(concept.reference, f"concepts[{i}].reference", plan.regions.latent_hw)
    plan.set_background(background)
    return plan
