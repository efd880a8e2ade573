"""Panel controls <-> job JSON, as pure functions (no gradio), so they are tested directly.

The panel's visible controls are a flat list of values: the TOP fields, then CONCEPT_FIELDS for
each of MAX_UI_CONCEPTS rows. `compose` turns them into the job JSON (the script's one
argument); `decompose` does the reverse for pasted infotext or a loaded job.
"""

from __future__ import annotations

import base64
import io
import json

from ..job import Job, JobError, parse_job
from ..regions import PRESETS, decode_png

MAX_UI_CONCEPTS = 6
TOP_FIELDS = ("enabled", "mode", "start_at", "layout_replay", "self_attn_replay_until", "feather",
              "save_layout", "count")
CONCEPT_FIELDS = ("name", "loras", "prompt", "negative_prompt", "class_word", "region", "x", "y", "w", "h",
                  "mask")
REGION_CHOICES = list(PRESETS) + ["rectangle", "mask", "auto"]
DEFAULT_PRESETS = ["left half", "right half", "middle third", "full", "full", "full"]


def default_values() -> list:
    job = Job()
    top = [False, job.mode, job.start_at, job.layout_replay, job.self_attn_replay_until, job.feather,
           job.save_layout, 2]
    rows = []
    for i in range(MAX_UI_CONCEPTS):
        rows += [f"concept {i + 1}", "", "", "", "", DEFAULT_PRESETS[i], 0.0, 0.0, 1.0, 1.0, None]
    return top + rows


def format_loras(loras) -> str:
    return ", ".join(f"{ref.name}:{ref.weight:g}" for ref in loras)


def parse_loras(text: str) -> list[dict]:
    """`alice_v1:0.8, outfit` -> [{"name": "alice_v1", "weight": 0.8}, {"name": "outfit", "weight": 1}]"""
    refs = []
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        name, _, weight = item.rpartition(":")
        try:
            refs.append({"name": name.strip(), "weight": float(weight)} if name else {"name": item, "weight": 1.0})
        except ValueError:
            refs.append({"name": item, "weight": 1.0})
    return refs


def add_lora(text: str, name: str, weight: float = 0.8) -> str:
    if not name:
        return text
    names = [ref["name"] for ref in parse_loras(text)]
    if name in names:
        return text
    return (text.strip().rstrip(",") + ", " if text and text.strip() else "") + f"{name}:{weight:g}"


def _image_to_png(image) -> str:
    if image is None:
        return ""
    if isinstance(image, dict):   # gradio sketch/editor values
        image = image.get("mask") or image.get("image") or image.get("composite")
    if isinstance(image, str):
        return image.split(",", 1)[-1]
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _region(kind: str, x, y, w, h, mask) -> dict:
    if kind in PRESETS:
        px, py, pw, ph = PRESETS[kind][0]
        return {"type": "rect", "x": px, "y": py, "w": pw, "h": ph}
    if kind == "rectangle":
        return {"type": "rect", "x": x, "y": y, "w": w, "h": h}
    if kind == "mask":
        return {"type": "mask", "png": _image_to_png(mask)}
    return {"type": "auto"}


def compose(*values) -> str:
    """Control values -> job JSON text (what the script receives)."""
    top = dict(zip(TOP_FIELDS, values[:len(TOP_FIELDS)]))
    count = max(1, min(MAX_UI_CONCEPTS, int(top.pop("count") or 1)))
    concepts = []
    for i in range(count):
        start = len(TOP_FIELDS) + i * len(CONCEPT_FIELDS)
        row = dict(zip(CONCEPT_FIELDS, values[start:start + len(CONCEPT_FIELDS)]))
        concepts.append({
            "name": row["name"] or f"concept {i + 1}", "loras": parse_loras(row["loras"]),
            "prompt": row["prompt"] or "", "negative_prompt": row["negative_prompt"] or "",
            "class_word": row["class_word"] or "",
            "region": _region(row["region"], row["x"], row["y"], row["w"], row["h"], row["mask"]),
        })
    return json.dumps({"version": 1, **top, "concepts": concepts})


def _preset_of(region) -> str:
    for name, rects in PRESETS.items():
        if all(abs(a - b) < 1e-3 for a, b in zip(rects[0], (region.x, region.y, region.w, region.h))):
            return name
    return "rectangle"


def decompose(text: str) -> list | None:
    """Job JSON (pasted infotext, a saved job) -> control values; None if it is not a job."""
    try:
        job = parse_job(text)
    except JobError:
        return None
    if not job.concepts:
        return None
    values = [job.enabled, job.mode, job.start_at, job.layout_replay, job.self_attn_replay_until, job.feather,
              job.save_layout, min(len(job.concepts), MAX_UI_CONCEPTS)]
    defaults = default_values()
    for i in range(MAX_UI_CONCEPTS):
        if i >= len(job.concepts):
            start = len(TOP_FIELDS) + i * len(CONCEPT_FIELDS)
            values += defaults[start:start + len(CONCEPT_FIELDS)]
            continue
        c = job.concepts[i]
        r = c.region
        kind = {"rect": _preset_of(r), "mask": "mask", "auto": "auto"}[r.type]
        mask = decode_png(r.png, f"concepts[{i}].region.png").convert("L") if r.type == "mask" else None
        values += [c.name, format_loras(c.loras), c.prompt, c.negative_prompt, c.class_word, kind,
                   r.x, r.y, r.w, r.h, mask]
    return values
