"""The job in an image's generation parameters (`Multi-Concept: {...}`) and back.

The value is the job schema itself, minus defaults, with masks shrunk to a small thresholded
PNG (and a hash of the original), so PNG Info -> Send to txt2img restores the panel.
"""

from __future__ import annotations

import copy
import json

from .errors import MultiConceptError
from .job import DEFAULT_START, MODE_OF_OPTION, Job, parse_job
from .regions import compact_mask

KEY = "Multi-Concept"
_DEFAULTS = Job()


def job_to_infotext(job: Job) -> str:
    data = job.to_dict()
    for key in ("mode", "start_at", "layout_replay", "self_attn_replay_until", "feather", "save_layout",
                "refine_regions", "auto_grow", "hires_loras", "isolation", "isolation_until", "reinit",
                "enhance"):
        if data[key] == getattr(_DEFAULTS, key) or MODE_OF_OPTION.get(key, job.mode) != job.mode:
            del data[key]   # a default, or an option the job's mode does not read
    if job.mode == "blend" and job.start_at == DEFAULT_START:
        del data["start_at"]   # what blend reads when it is left out (the same text as before modes)
    del data["enabled"]   # present in the infotext = it was on
    for i, concept in enumerate(data["concepts"]):
        for key in ("prompt", "negative_prompt", "class_word"):
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


class ImageInfotext:
    """The value the WebUI calls with each image's `index` when it writes the infotext: the job,
    with automatic regions carrying the masks found for that very image (pasting it brings them
    back drawn). `state` holds `job`, `error` and `found` (image index -> concept -> PNG).

    None leaves the key out: after a failed job (a mask that is not a PNG would fail again here,
    and the WebUI would log an infotext error on top of the job's own message)."""

    def __init__(self, state):
        self.state = state

    def __call__(self, index=None, **kwargs) -> str | None:
        if self.state.error is not None or self.state.job is None:
            return None
        job = self.state.job
        found = self.state.found.get(index or 0)
        if found:
            job = copy.deepcopy(job)
            for concept_index, png in found.items():
                job.concepts[concept_index].region.found = png
        try:
            return job_to_infotext(job)
        except MultiConceptError as exc:   # never cost the user the image for its caption
            print(f"[Multi-Concept] not written to the infotext: {exc}")
            return None


def infotext_to_job(value: str) -> Job:
    """Parse a pasted infotext value; raises JobError when it is not a Multi-Concept job."""
    return parse_job(value)
