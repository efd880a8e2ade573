"""The job in an image's generation parameters (`Multi-Concept: {...}`) and back.

The value is the job schema itself, minus defaults, with masks shrunk to a small thresholded
PNG (and a hash of the original), so PNG Info -> Send to txt2img restores the panel. A
reference picture (conductor mode) travels as a small JPEG copy (REFERENCE_SIDE px) with a hash
of the original: pasted back, its layout, not its detail, guides the next run. Image concepts' reference pictures
(IMAGE_SIDE px JPEG), their masks (as region masks) and the kept background (REFERENCE_SIDE px)
travel the same way, as `{"png": <small copy>, "sha": <hash of the original>}`: pasted back, the
job runs with the small copies. Face photos likewise (FACE_SIDE px).
"""

from __future__ import annotations

import base64
import copy
import hashlib
import io
import json

from .errors import MultiConceptError
from .job import DEFAULT_START, IMAGE_MODES, IMAGE_OPTIONS, MODE_OF_OPTION, Job, parse_job
from .prompt_variants import concept_variant
from .regions import compact_mask, decode_png

KEY = "Multi-Concept"
_DEFAULTS = Job().to_dict()
OPTIONS = ("mode", "start_at", "layout_replay", "self_attn_replay_until", "feather", "save_layout", "refine_regions",
           "auto_grow", "hires_loras", "isolation", "isolation_until", "reinit", "enhance", "mask_refine",
           "mask_refine_from", "mask_refine_until", "mask_refine_every", "mask_refine_k", "reference", "align_until",
           "align_step") + IMAGE_OPTIONS
REFERENCE_SIDE = 96   # px: a photo's copy is a few kB as JPEG (PNG would be ten times that)
IMAGE_SIDE = 128      # px: an image concept's reference keeps more than a layout: its subject's look
FACE_SIDE = 192       # px: a face photo's copy keeps a face the detector still finds
FACE_DEFAULT = 0.8    # face_weight and face_control left out at their default


def job_to_infotext(job: Job) -> str:
    data = job.to_dict()
    for key in OPTIONS:
        if data[key] == _DEFAULTS[key] or MODE_OF_OPTION.get(key, job.mode) != job.mode or (
                key in IMAGE_OPTIONS and job.mode not in IMAGE_MODES):
            del data[key]   # a default, or an option the job's mode does not read
    if job.mode == "blend" and job.start_at == DEFAULT_START:
        del data["start_at"]   # what blend reads when it is left out (the same text as before modes)
    del data["enabled"]   # present in the infotext = it was on
    if "reference" in data:
        data["reference"], data["reference_sha"] = compact_picture(data["reference"], "reference")
    if "background" in data:
        small, sha = compact_picture(data["background"]["png"], "background")
        data["background"] = {"png": small, "sha": sha}
    for i, concept in enumerate(data["concepts"]):
        if "reference" in concept:
            small, sha = compact_picture(concept["reference"]["png"], f"concepts[{i}].reference", IMAGE_SIDE)
            concept["reference"] = {"png": small, "sha": sha}
        if "reference_mask" in concept:
            small, sha = compact_mask(concept["reference_mask"]["png"], f"concepts[{i}].reference_mask")
            concept["reference_mask"] = {"png": small, "sha": sha}
        if "faces" in concept:
            concept["faces"] = [dict(zip(("png", "sha"), compact_picture(face["png"], f"concepts[{i}].faces[{k}]",
                                                                         FACE_SIDE)))
                                for k, face in enumerate(concept["faces"])]
            for key in ("face_weight", "face_control"):
                if concept[key] == FACE_DEFAULT:
                    del concept[key]
        for key in ("prompt", "negative_prompt", "class_word", "token"):
            if not concept[key]:
                del concept[key]
        if not concept["loras"]:
            del concept["loras"]
        region = concept["region"]
        if "w" in region:   # a rect, or the box an automatic region searched in
            for key in ("x", "y", "w", "h"):
                region[key] = round(region[key], 4)
        elif region["type"] == "mask":
            region["png"], region["sha"] = compact_mask(region["png"], f"concepts[{i}].region.png")
        elif region.get("found"):
            region["found"], _ = compact_mask(region["found"], f"concepts[{i}].region.found")
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False)


def compact_picture(png: str, field: str, max_side: int = REFERENCE_SIDE) -> tuple[str, str]:
    """A small JPEG copy of a picture for the infotext (base64), and a short hash of the original."""
    digest = hashlib.sha256(png.encode("ascii", "replace")).hexdigest()[:12]
    image = decode_png(png, field).convert("RGB")
    image.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return base64.b64encode(buffer.getvalue()).decode("ascii"), digest


def with_variants(data: dict, job: Job, prompt: str | None) -> dict:
    """Each concept whose branch takes a prompt variant shows it (`"variant"`, for the reader;
    pasting ignores it: it follows from the prompt, the class words and the token)."""
    if prompt is None:
        return data
    for index, concept in enumerate(data["concepts"]):
        variant = concept_variant(prompt, job.concepts, index)
        if variant is not None:
            concept["variant"] = variant
    return data


class ImageInfotext:
    """The value the WebUI calls with each image's `index` when it writes the infotext: the job,
    with automatic regions carrying the masks found for that very image (pasting it brings them
    back drawn). `state` holds `job`, `error` and `found` (image index -> concept -> PNG).

    None leaves the key out: after a failed job (a mask that is not a PNG would fail again here,
    and the WebUI would log an infotext error on top of the job's own message)."""

    def __init__(self, state):
        self.state = state

    def __call__(self, index=None, p=None, **kwargs) -> str | None:
        if self.state.error is not None or self.state.job is None:
            return None
        job = self.state.job
        found = self.state.found.get(index or 0)
        if found:
            job = copy.deepcopy(job)
            for concept_index, png in found.items():
                job.concepts[concept_index].region.found = png
        prompts = getattr(p, "all_prompts", None) or []   # the WebUI passes its `p`: this image's prompt
        prompt = prompts[index or 0] if len(prompts) > (index or 0) else None
        try:
            text = job_to_infotext(job)
            if prompt is not None and any(c.token and not c.prompt for c in job.concepts):
                text = json.dumps(with_variants(json.loads(text), job, prompt), separators=(",", ":"),
                                  ensure_ascii=False)
            return text
        except MultiConceptError as exc:   # never cost the user the image for its caption
            print(f"[Multi-Concept] not written to the infotext: {exc}")
            return None


def infotext_to_job(value: str) -> Job:
    """Parse a pasted infotext value; raises JobError when it is not a Multi-Concept job."""
    return parse_job(value)
