"""The job schema (version 1): what the panel writes and the API takes, parsed and validated.

The one script argument is this JSON (a dict or its string). Unknown keys are ignored; every
known field is checked and a bad one raises JobError naming it (`concepts[1].region.w: ...`).
Nothing here touches a model or a file path: masks arrive as base64 PNG.

Three modes: "blend" (a layout pass, then the concepts blended in), "regional" (every concept
in its region inside one sampling pass) and "conductor" (each concept's branch beside the base
branch, its decoder attention outputs injected into the base rows in its region). An option only one mode uses (MODE_OF_OPTION) is
ignored by the other mode, left out of its infotext, and named as that mode's in errors.

Image concepts (PnP-MIX): a concept may carry a reference picture of its subject
(`"reference": {"png": ...}`, optionally `"reference_mask"`); the job may carry a kept background
(`"background": {"png": ...}`). Pictures are checked here as far as their header (base64, an image,
its size); the host encodes them in prepare. Image concepts work in blend and conductor mode only.

Face concepts (InstantID): a concept may carry face photos (`"faces": [{"png": ...}]`, at most
MAX_FACES, embeddings averaged) with `face_weight` (IP-Adapter scale) and `face_control`
(IdentityNet scale); blend and conductor mode. With both at 0 the photos only serve the identity
score, in any mode.
"""

from __future__ import annotations

import json
import numbers
import sys
from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import PlanError

SCHEMA_VERSION = 1
MODES = ("blend", "regional", "conductor")
# options read by one mode only; any other top-level option is read by both
MODE_OF_OPTION = {"layout_replay": "blend", "self_attn_replay_until": "blend",
                  "isolation": "regional", "isolation_until": "regional", "reinit": "regional",
                  "enhance": "regional",
                  "mask_refine": "conductor", "mask_refine_from": "conductor", "mask_refine_until": "conductor",
                  "mask_refine_every": "conductor", "mask_refine_k": "conductor", "reference": "conductor",
                  "align_until": "conductor", "align_step": "conductor"}
# options of image concepts and the kept background: read by blend and conductor mode
IMAGE_OPTIONS = ("background", "keep_background", "appearance_alpha", "dilution_beta", "dilution_expand")
IMAGE_MODES = ("blend", "conductor")
MAX_PICTURE_SIDE = 8192   # px, as masks
DEFAULT_START = 0.3   # blend; regional and conductor when a region is automatic (found at start_at)
MAX_REFINE_K = 32     # conductor: k-means segments at most (the paper's k is at most 2 x 8 concepts + 1)
MAX_CONCEPTS = 8
MAX_GROW_PX = 128   # auto_grow: found masks grow or shrink at most this many image pixels
MAX_MASK_PNG_BYTES = 16 * 2 ** 20
MAX_FACES = 4       # face photos per concept (their embeddings are averaged)


class JobError(PlanError):
    """A malformed job (API payload, pasted infotext or panel state)."""


@dataclass
class LoraRef:
    name: str
    weight: float = 1.0


@dataclass
class Region:
    type: str                       # "rect" | "mask" | "auto"
    x: float = 0.0                  # rect: fractions of the image
    y: float = 0.0
    w: float = 1.0
    h: float = 1.0
    png: str = ""                   # mask: base64 PNG, white = inside
    found: str = ""                 # auto: the mask found for the image (infotext), base64 PNG
    boxed: bool = False             # auto: the subject is searched inside x, y, w, h


@dataclass
class ConceptSpec:
    name: str
    loras: list[LoraRef] = field(default_factory=list)
    prompt: str = ""                # "" = the base prompt
    negative_prompt: str = ""       # "" = the base negative prompt
    class_word: str = ""
    token: str = ""                 # its identity words ("alice woman"): the main prompt's class words
                                    # become these in its branch when it has no prompt of its own
    region: Region = field(default_factory=lambda: Region("rect"))
    z: float | None = None
    reference: str = ""             # an image concept: base64 PNG of its subject; "" = none
    reference_mask: str = ""        # ... white = the subject in it; "" = found in the reference
    # a face concept (blend, conductor): its identity comes from face photos through InstantID
    faces: list[str] = field(default_factory=list)   # base64 pictures of the person's face
    face_weight: float = 0.8        # InstantID's IP-Adapter scale (identity tokens in its cross-attention)
    face_control: float = 0.8       # IdentityNet's conditioning scale (face keypoints); both 0: score only


@dataclass
class Job:
    enabled: bool = False
    mode: str = "blend"
    start_at: float | None = None       # None: the mode's default (start_fraction)
    layout_replay: bool = True
    self_attn_replay_until: float = 0.4
    feather: float = 0.0
    save_layout: bool = False
    refine_regions: bool = False      # automatic regions follow the subjects during sampling
    auto_grow: float = 0.0            # automatic regions: grow (> 0) or shrink found masks, image pixels
    hires_loras: bool = True          # hires fix: each concept's LoRAs act in its (upscaled) region
    isolation: bool = True            # regional: region i's self-attention queries skip other concepts' keys
    isolation_until: float = 1.0      # regional: fraction of the steps during which isolation acts
    reinit: bool = False              # regional: each region's initial latent re-drawn at the first step
    enhance: bool = False             # regional: gradient guidance on the class words' attention, first half
    mask_refine: bool = True          # conductor: masks re-segmented from decoder self-attention (k-means)
    mask_refine_from: float = 0.25    # ... from this fraction of the steps
    mask_refine_until: float = 0.4    # ... until this one
    mask_refine_every: float = 0.025  # ... every this fraction of the steps (the paper: 5 of 200)
    mask_refine_k: int = 0            # ... k-means segments; 0: every k from N + 1 to 2N + 1 (the paper)
    reference: str = ""               # conductor: base64 PNG of a picture whose layout is kept; "" = none
    align_until: float = 0.3          # ... alignment to it during this fraction of the steps
    align_step: float = 0.0           # ... its gradient step size; 0: the paper's (10 SD1.5, 40 SDXL)
    background: str = ""              # base64 PNG kept outside the concepts' regions (txt2img); "" = none
    keep_background: bool = True      # outside the regions the image comes from the background, when there is one
    appearance_alpha: float = 0.15    # image concepts: V = V_concept + alpha * (V_concept - V_reference)
    dilution_beta: float = 0.8        # ... reference latent outside the subject's grown box: beta x the background's
    dilution_expand: float = 0.1      # ... the box grown by this fraction of the image side on each side
    concepts: list[ConceptSpec] = field(default_factory=list)

    def start_fraction(self, has_auto: bool) -> float:
        """The fraction of the steps from which the concepts act: start_at when given, else the
        mode's default. Regional and conductor mode with drawn regions start at once (as Regional
        Prompter does); automatic regions are found at start_at, so they need steps before it,
        except in conductor mode with a reference picture (found in it while it is inverted)."""
        if self.start_at is not None:
            return self.start_at
        if self.mode == "conductor" and self.reference:
            return 0.0
        return DEFAULT_START if self.mode == "blend" or has_auto else 0.0

    def to_dict(self) -> dict:
        return {
            "version": SCHEMA_VERSION, "enabled": self.enabled, "mode": self.mode,
            "start_at": self.start_at, "layout_replay": self.layout_replay,
            "self_attn_replay_until": self.self_attn_replay_until, "feather": self.feather,
            "save_layout": self.save_layout, "refine_regions": self.refine_regions, "auto_grow": self.auto_grow,
            "hires_loras": self.hires_loras, "isolation": self.isolation, "isolation_until": self.isolation_until,
            "reinit": self.reinit, "enhance": self.enhance, "mask_refine": self.mask_refine,
            "mask_refine_from": self.mask_refine_from, "mask_refine_until": self.mask_refine_until,
            "mask_refine_every": self.mask_refine_every, "mask_refine_k": self.mask_refine_k,
            "reference": self.reference, "align_until": self.align_until, "align_step": self.align_step,
            "background": {"png": self.background} if self.background else None,
            "keep_background": self.keep_background, "appearance_alpha": self.appearance_alpha,
            "dilution_beta": self.dilution_beta, "dilution_expand": self.dilution_expand,
            "concepts": [_concept_dict(c) for c in self.concepts],
        }


def _concept_dict(c: ConceptSpec) -> dict:
    region = {"type": c.region.type}
    if c.region.type == "rect" or c.region.boxed:
        region.update(x=c.region.x, y=c.region.y, w=c.region.w, h=c.region.h)
    if c.region.type == "mask":
        region["png"] = c.region.png
    elif c.region.found:
        region["found"] = c.region.found
    out = {"name": c.name, "loras": [{"name": l.name, "weight": l.weight} for l in c.loras],
           "prompt": c.prompt, "negative_prompt": c.negative_prompt, "class_word": c.class_word,
           "token": c.token, "region": region}
    if c.z is not None:
        out["z"] = c.z
    if c.reference:
        out["reference"] = {"png": c.reference}
    if c.reference_mask:
        out["reference_mask"] = {"png": c.reference_mask}
    if c.faces:
        out["faces"] = [{"png": png} for png in c.faces]
        out["face_weight"], out["face_control"] = c.face_weight, c.face_control
    return out


# ---- field checks ---------------------------------------------------------------------------

def _bool(data: Mapping, key: str, default: bool, path: str) -> bool:
    value = data.get(key, default)
    if not isinstance(value, bool):
        raise JobError(path + key, f"must be true or false, got {value!r}")
    return value


def _num(data: Mapping, key: str, default, path: str, low=None, high=None, low_open=False):
    value = data.get(key, default)
    if value is None and default is None:
        return None
    # abs() <= max, not isfinite(): an integer past float range (JSON allows 1 followed by 400 zeros) overflows it
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not abs(value) <= sys.float_info.max:
        raise JobError(path + key, f"must be a number, got {value!r}")
    value = float(value)
    if low is not None and (value < low or (low_open and value == low)):
        raise JobError(path + key, f"must be {'>' if low_open else '>='} {low:g}, got {value:g}")
    if high is not None and value > high:
        raise JobError(path + key, f"must be <= {high:g}, got {value:g}")
    return value


def _whole(data: Mapping, key: str, default: int, path: str, low: int, high: int) -> int:
    """A whole number; 3.0 (a slider's value) reads as 3."""
    value = _num(data, key, default, path, low, high)
    if value != int(value):
        raise JobError(path + key, f"must be a whole number, got {value:g}")
    return int(value)


def _picture(data: Mapping, key: str, path: str) -> str:
    """A base64 PNG (or data URL), "" for none; its pixels are checked where it is decoded."""
    value = data.get(key, "")
    if not isinstance(value, str):
        raise JobError(path + key, f"must be a base64 PNG (or \"\" for none), got {type(value).__name__}")
    value = value.strip()
    if len(value) > MAX_MASK_PNG_BYTES * 4 // 3 + 64:
        raise JobError(path + key, f"is larger than {MAX_MASK_PNG_BYTES // 2 ** 20} MB")
    return value


def _image(data: Mapping, key: str, path: str) -> str:
    """A picture as `{"png": "<base64>"}` (or the base64 / data URL itself); "" (or null) for none.
    Its header is read: not base64, not a picture or too large a picture is named here."""
    value = data.get(key)
    if isinstance(value, Mapping):
        value = value.get("png", "")
        where = path + key + ".png"
    else:
        where = path + key
    if value is None:
        return ""
    if not isinstance(value, str):
        raise JobError(where, 'must be {"png": "<base64 PNG>"} (or null for none), got '
                              f"{type(value).__name__}")
    value = value.strip()
    if not value:
        return ""
    if len(value) > MAX_MASK_PNG_BYTES * 4 // 3 + 64:
        raise JobError(where, f"is larger than {MAX_MASK_PNG_BYTES // 2 ** 20} MB")
    _check_header(value, where)
    return value


def _check_header(png: str, where: str) -> None:
    """Base64 of a picture no larger than MAX_PICTURE_SIDE a side (only its header is decoded)."""
    import base64
    import binascii
    import io
    from PIL import Image, UnidentifiedImageError
    data = "".join((png.split(",", 1)[-1] if png.startswith("data:") else png).split())   # wrapped lines too
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise JobError(where, "is not base64 (send the picture's bytes base64-encoded, or a data URL)") from None
    try:
        with Image.open(io.BytesIO(raw)) as image:
            size = image.size
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, ValueError):
        raise JobError(where, "is not a picture PIL can read (PNG, JPEG or WebP)") from None
    if max(size) > MAX_PICTURE_SIDE:
        raise JobError(where, f"is {size[0]}x{size[1]}; pictures may be at most {MAX_PICTURE_SIDE} pixels a side")


def _option(data: Mapping, key: str, read, *args):
    """A top-level option; when only one mode reads it, its errors say which."""
    try:
        return read(data, key, *args)
    except JobError as exc:
        if key not in MODE_OF_OPTION:
            raise
        raise JobError(exc.field, f"{exc.problem} (a {MODE_OF_OPTION[key]}-mode option)") from None


def _str(data: Mapping, key: str, default: str, path: str) -> str:
    value = data.get(key, default)
    if value is None:
        return default
    if not isinstance(value, str):
        raise JobError(path + key, f"must be text, got {type(value).__name__}")
    return value


def _region(data: Any, path: str) -> Region:
    if data is None:
        return Region("rect")
    if not isinstance(data, Mapping):
        raise JobError(path.rstrip("."), "must be an object with a 'type'")
    kind = data.get("type")
    if kind == "rect":
        return _rect(data, path, Region("rect"))
    if kind == "mask":
        png = data.get("png")
        if isinstance(png, str) and not png.strip():
            raise JobError(path + "png", "is empty: draw this concept's region on the canvas, pick a preset "
                                         "or upload a mask")
        if not isinstance(png, str):
            raise JobError(path + "png", "must be a base64 PNG (white = inside)")
        if len(png) > MAX_MASK_PNG_BYTES * 4 // 3 + 64:
            raise JobError(path + "png", f"is larger than {MAX_MASK_PNG_BYTES // 2 ** 20} MB")
        return Region("mask", png=png)
    if kind == "auto":   # "found": what an earlier run found here (pasted infotext); never required
        found = data.get("found")
        region = Region("auto", found=found if isinstance(found, str) and 0 < len(found) <= MAX_MASK_PNG_BYTES else "")
        if any(key in data for key in ("x", "y", "w", "h")):   # a box to search in
            region.boxed = True
            _rect(data, path, region)
        return region
    raise JobError(path + "type", f"must be 'rect', 'mask' or 'auto', got {kind!r}")


def _rect(data: Mapping, path: str, region: Region) -> Region:
    region.x, region.y, region.w, region.h = (_num(data, k, d, path, 0.0, 1.0) for k, d in
                                              (("x", 0.0), ("y", 0.0), ("w", 1.0), ("h", 1.0)))
    if region.w == 0 or region.h == 0:
        raise JobError(path + ("w" if region.w == 0 else "h"), "must be > 0: the region is empty")
    if region.x + region.w > 1.0001 or region.y + region.h > 1.0001:
        raise JobError(path.rstrip("."), "reaches outside the image (x + w and y + h must be <= 1)")
    return region


def _loras(data: Any, path: str) -> list[LoraRef]:
    if data is None:
        return []
    if not isinstance(data, list):
        raise JobError(path.rstrip("."), "must be a list of {name, weight}")
    refs = []
    for i, item in enumerate(data):
        where = f"{path[:-1]}[{i}]."
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, Mapping):
            raise JobError(where.rstrip("."), "must be {name, weight}")
        name = _str(item, "name", "", where).strip()
        if not name:
            raise JobError(where + "name", "is missing")
        refs.append(LoraRef(name, _num(item, "weight", 1.0, where)))
    return refs


def _faces(data: Mapping, path: str) -> list[str]:
    """Face photos: a list of pictures ({"png": ...} or base64), never paths."""
    value = data.get("faces")
    if value is None:
        return []
    if not isinstance(value, list):
        raise JobError(path + "faces", 'must be a list of pictures ([{"png": "<base64>"}, ...])')
    if len(value) > MAX_FACES:
        raise JobError(path + "faces", f"at most {MAX_FACES} photos, got {len(value)}")
    photos = [_image({f"faces[{k}]": item}, f"faces[{k}]", path) for k, item in enumerate(value)]
    for k, photo in enumerate(photos):
        if not photo:
            raise JobError(f"{path}faces[{k}]", "is empty: upload a face photo or remove the entry")
    return photos


def _concept(data: Any, i: int) -> ConceptSpec:
    path = f"concepts[{i}]."
    if not isinstance(data, Mapping):
        raise JobError(path.rstrip("."), "must be an object")
    reference, reference_mask = _image(data, "reference", path), _image(data, "reference_mask", path)
    if reference_mask and not reference:
        raise JobError(path + "reference_mask", "is given without a reference picture (concepts[].reference): "
                                                "the mask marks the subject in that picture")
    return ConceptSpec(
        name=_str(data, "name", "", path).strip() or f"concept {i + 1}",
        loras=_loras(data.get("loras"), path + "loras."),
        prompt=_str(data, "prompt", "", path),
        negative_prompt=_str(data, "negative_prompt", "", path),
        class_word=_str(data, "class_word", "", path).strip(),
        token=" ".join(_str(data, "token", "", path).split()),
        region=_region(data.get("region"), path + "region."),
        z=_num(data, "z", None, path),
        reference=reference,
        reference_mask=reference_mask,
        faces=_faces(data, path),
        face_weight=_num(data, "face_weight", 0.8, path, 0.0, 2.0),
        face_control=_num(data, "face_control", 0.8, path, 0.0, 2.0),
    )


def parse_job(raw: Any) -> Job:
    """A Job from the script argument: dict, JSON text, or empty (= disabled)."""
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return Job()
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except (ValueError, RecursionError) as exc:   # JSONDecodeError, too many digits, too deep
            raise JobError("multi-concept", f"argument is not valid JSON: {exc}") from exc
    if not isinstance(raw, Mapping):
        raise JobError("multi-concept", f"argument must be a JSON object, got {type(raw).__name__}")
    version = raw.get("version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise JobError("version", f"this extension reads schema version {SCHEMA_VERSION}, got {version!r}")
    mode = raw.get("mode", "blend")
    if mode not in MODES:
        raise JobError("mode", f"must be one of {', '.join(MODES)}, got {mode!r}")
    concepts = raw.get("concepts", [])
    if not isinstance(concepts, list):
        raise JobError("concepts", "must be a list")
    if len(concepts) > MAX_CONCEPTS:
        raise JobError("concepts", f"at most {MAX_CONCEPTS} concepts, got {len(concepts)}")
    job = Job(
        enabled=_bool(raw, "enabled", True, ""),
        mode=mode,
        start_at=_num(raw, "start_at", None, "", 0.0, 1.0),
        layout_replay=_option(raw, "layout_replay", _bool, True, ""),
        self_attn_replay_until=_option(raw, "self_attn_replay_until", _num, 0.4, "", 0.0, 1.0),
        feather=_num(raw, "feather", 0.0, "", 0.0, 256.0),
        save_layout=_bool(raw, "save_layout", False, ""),
        refine_regions=_bool(raw, "refine_regions", False, ""),
        auto_grow=_num(raw, "auto_grow", 0.0, "", -MAX_GROW_PX, MAX_GROW_PX),
        hires_loras=_bool(raw, "hires_loras", True, ""),
        isolation=_option(raw, "isolation", _bool, True, ""),
        isolation_until=_option(raw, "isolation_until", _num, 1.0, "", 0.0, 1.0),
        reinit=_option(raw, "reinit", _bool, False, ""),
        enhance=_option(raw, "enhance", _bool, False, ""),
        mask_refine=_option(raw, "mask_refine", _bool, True, ""),
        mask_refine_from=_option(raw, "mask_refine_from", _num, 0.25, "", 0.0, 1.0),
        mask_refine_until=_option(raw, "mask_refine_until", _num, 0.4, "", 0.0, 1.0),
        mask_refine_every=_option(raw, "mask_refine_every", _num, 0.025, "", 0.0, 1.0, True),
        mask_refine_k=_option(raw, "mask_refine_k", _whole, 0, "", 0, MAX_REFINE_K),
        reference=_option(raw, "reference", _picture, ""),
        align_until=_option(raw, "align_until", _num, 0.3, "", 0.0, 1.0),
        align_step=_option(raw, "align_step", _num, 0.0, "", 0.0),
        background=_image(raw, "background", ""),
        keep_background=_bool(raw, "keep_background", True, ""),
        appearance_alpha=_num(raw, "appearance_alpha", 0.15, "", 0.0, 2.0),
        dilution_beta=_num(raw, "dilution_beta", 0.8, "", 0.0, 1.0),
        dilution_expand=_num(raw, "dilution_expand", 0.1, "", 0.0, 1.0),
        concepts=[_concept(c, i) for i, c in enumerate(concepts)],
    )
    if job.enabled and not job.concepts:
        raise JobError("concepts", "is empty: add at least one concept or disable Multi-Concept")
    if job.mask_refine_until < job.mask_refine_from:
        raise JobError("mask_refine_until", f"must be >= mask_refine_from ({job.mask_refine_from:g}), got "
                                            f"{job.mask_refine_until:g} (a conductor-mode option)")
    check_start(job)
    check_image_concepts(job)
    return job


def check_image_concepts(job: Job) -> None:
    """Image concepts take their appearance in the concept's own rows and the kept background is
    mixed in under the masks (blend, conductor); regional mode has neither."""
    if job.mode in IMAGE_MODES:
        return
    if job.background:
        raise JobError("background", f"a kept background needs blend or conductor mode, not {job.mode} "
                                     "(set mode to blend or conductor, or remove the background picture)")
    for i, concept in enumerate(job.concepts):
        if concept.reference:
            raise JobError(f"concepts[{i}].reference", f"image concepts need blend or conductor mode, not {job.mode} "
                                                       "(set mode to blend or conductor, or remove the reference picture)")
        if concept.faces and (concept.face_weight or concept.face_control):
            raise JobError(f"concepts[{i}].faces", f"face concepts need blend or conductor mode, not {job.mode}: "
                                                   "InstantID acts on a concept's own rows (set mode to blend or "
                                                   "conductor, or set face_weight and face_control to 0 to only "
                                                   "score the face)")


def check_start(job: Job) -> None:
    """Regional and conductor mode find automatic regions at start_at, from the steps before it:
    they need some (conductor with a reference picture finds them in the reference instead)."""
    found_in_pass = job.mode == "regional" or (job.mode == "conductor" and not job.reference)
    if found_in_pass and job.start_at == 0 and any(c.region.type == "auto" for c in job.concepts):
        without = " without a reference picture" if job.mode == "conductor" else ""
        raise JobError("start_at", f"automatic regions in {job.mode} mode{without} are found at start_at: "
                                   "it must be > 0 (leave it out for the default, 0.3)")
