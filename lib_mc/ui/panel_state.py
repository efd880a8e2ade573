"""Panel controls <-> job JSON, as pure functions (no gradio), so they are tested directly.

The panel's visible controls are a flat list of values: the TOP fields, then CONCEPT_FIELDS for
each of MAX_UI_CONCEPTS rows. `compose` turns them into the job JSON (the script's one
argument); `decompose` does the reverse for pasted infotext or a loaded job.

The region canvas (javascript/) speaks through the top field "canvas": JSON
`{"regions": [region or null per concept], "z": [front-to-back rank per concept]}`. A concept whose
region control says "drawn" takes its region from there; `apply_canvas` turns what was drawn into
the region controls (a drawn rectangle becomes a preset or "rectangle" with numbers).

A face concept's photos are MAX_FACES picture slots per concept (`face_1` ...): the job takes the
filled ones in slot order, with `face_weight` and `face_control` beside them; a pasted job fills
the slots from the front.
"""

from __future__ import annotations

import base64
import io
import json

from ..job import MAX_FACES, ConceptSpec, Job, JobError, Region, parse_job
from ..regions import PRESETS

MAX_UI_CONCEPTS = 6
TOP_FIELDS = ("enabled", "mode", "start_at", "layout_replay", "self_attn_replay_until", "feather",
              "save_layout", "refine_regions", "auto_grow", "hires_loras", "isolation", "isolation_until", "reinit",
              "enhance", "mask_refine", "mask_refine_from", "mask_refine_until", "mask_refine_every", "mask_refine_k",
              "reference", "align_until", "align_step", "background", "keep_background", "appearance_alpha",
              "dilution_beta", "dilution_expand", "count", "canvas")
JOB_OPTIONS = TOP_FIELDS[:TOP_FIELDS.index("count")]   # the controls that are the job's own top-level keys
NUMBER_FIELDS = ("self_attn_replay_until", "feather", "auto_grow", "isolation_until", "mask_refine_from",
                 "mask_refine_until", "mask_refine_every", "align_until", "align_step", "appearance_alpha",
                 "dilution_beta", "dilution_expand")
FACE_FIELDS = tuple(f"face_{k + 1}" for k in range(MAX_FACES))   # a face concept's photo slots
CONCEPT_FIELDS = ("name", "loras", "prompt", "negative_prompt", "class_word", "token", "region", "x", "y", "w", "h",
                  "mask", "reference", "reference_mask") + FACE_FIELDS + ("face_weight", "face_control")
FACE_DEFAULTS = (ConceptSpec("").face_weight, ConceptSpec("").face_control)   # the job's: 0.8, 0.8
PICTURE_FIELDS = ("reference", "background")   # top-level uploads: pictures (None when empty)
REFERENCE_MAX_SIDE = 1024   # px: the panel's reference picture is kept at most this large (it is resized
                            # to the image size when it is used; the job travels with every panel edit)
DRAWN = "drawn"   # region control value: the region comes from the canvas
AUTO_BOX = "auto in rectangle"   # found by its class word inside the rectangle (x, y, w, h)
REGION_CHOICES = list(PRESETS) + ["rectangle", DRAWN, "mask", "auto", AUTO_BOX]
BOX_KINDS = ("rectangle", AUTO_BOX)    # region kinds whose x, y, w, h the user types
AUTO_KINDS = ("auto", AUTO_BOX)        # found by the class word
DEFAULT_PRESETS = ["left half", "right half", "middle third", "full", "full", "full"]


def default_values() -> list:
    job = Job()
    top = [False] + [getattr(job, key) for key in JOB_OPTIONS[1:]] + [2, ""]
    top[TOP_FIELDS.index("start_at")] = start_text(job.start_at)
    for key in PICTURE_FIELDS:
        top[TOP_FIELDS.index(key)] = None   # the picture uploads start empty
    rows = []
    for i in range(MAX_UI_CONCEPTS):
        rows += [f"concept {i + 1}", "", "", "", "", "", DEFAULT_PRESETS[i], 0.0, 0.0, 1.0, 1.0, None, None, None]
        rows += [None] * MAX_FACES + list(FACE_DEFAULTS)   # no photos; the job's weights
    return top + rows


def shown_fields(kind: str, token: str = "") -> dict[str, bool]:
    """Which of a concept's region-dependent fields its region kind needs on screen: the numbers
    for a typed rectangle, the upload for a mask, the class word for automatic regions and for
    identity words (their prompt variant replaces the class words)."""
    return {"box": kind in BOX_KINDS, "mask": kind == "mask",
            "class_word": kind in AUTO_KINDS or bool((token or "").strip())}


def start_text(start_at: float | None) -> str:
    """start_at as its text box shows it: empty for the mode's default."""
    if start_at is None:
        return ""
    return f"{start_at:g}" if float(f"{start_at:g}") == start_at else repr(start_at)


def start_value(text):
    """The start box -> the job's start_at: None when empty (the mode's default), the number
    typed, or the text itself when it is no number, for the job to name (`start_at: must be a number`)."""
    if text is None or isinstance(text, (int, float)) and not isinstance(text, bool):
        return None if text is None else float(text)
    text = str(text).strip()
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        return text


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


def reference_png(image) -> str:
    """A picture upload (a reference, an image concept's picture or its mask, the background) ->
    base64 PNG for the job ("" for none), at most REFERENCE_MAX_SIDE a side."""
    if image is None or isinstance(image, str):
        return (image or "").split(",", 1)[-1]
    if not hasattr(image, "save"):   # a numpy array
        from PIL import Image
        image = Image.fromarray(image)
    if max(image.size) > REFERENCE_MAX_SIDE:
        image = image.copy()
        image.thumbnail((REFERENCE_MAX_SIDE, REFERENCE_MAX_SIDE))
    return _image_to_png(image)


def reference_image(png: str):
    """The job's reference (base64) -> a PIL image for the upload; None when there is none or it
    does not decode (the job names it when it runs)."""
    if not png:
        return None
    from ..regions import decode_png
    try:
        image = decode_png(png, "reference")
        image.load()
        return image
    except (JobError, OSError):
        return None


def parse_canvas(text) -> tuple[list, list]:
    """The canvas field -> (regions, z); anything malformed reads as nothing drawn."""
    try:
        data = json.loads(text) if text else {}
    except (TypeError, ValueError):
        return [], []
    if not isinstance(data, dict):
        return [], []
    regions = data.get("regions") if isinstance(data.get("regions"), list) else []
    z = data.get("z") if isinstance(data.get("z"), list) else []
    if not all(r is None or (isinstance(r, dict) and r.get("type") in ("rect", "mask", "auto")) for r in regions):
        return [], []   # not from our editor: ignore it whole rather than guess
    z = [v if isinstance(v, (int, float)) and not isinstance(v, bool) else None for v in z]
    return regions, z


def edited_concepts(text) -> set[int] | None:
    """The concepts the canvas's last edit changed ("edited"); None: all of them."""
    try:
        edited = json.loads(text).get("edited")
    except (TypeError, ValueError, AttributeError):
        return None
    if not isinstance(edited, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in edited):
        return None
    return set(edited)


def canvas_text(regions: list, z: list) -> str:
    return json.dumps({"regions": regions, "z": z})


def _region(kind: str, x, y, w, h, mask, drawn=None) -> dict:
    if kind == DRAWN:
        if drawn and drawn.get("type") == "auto":   # the editor handing back a box: drawn = that rectangle
            return {"type": "rect", **{k: drawn.get(k, d) for k, d in (("x", 0), ("y", 0), ("w", 1), ("h", 1))}}
        return dict(drawn) if drawn else {"type": "mask", "png": ""}
    if kind in PRESETS:
        px, py, pw, ph = PRESETS[kind][0]
        return {"type": "rect", "x": px, "y": py, "w": pw, "h": ph}
    if kind == "rectangle":
        return {"type": "rect", "x": x, "y": y, "w": w, "h": h}
    if kind == "mask":
        return {"type": "mask", "png": _image_to_png(mask)}
    if kind == AUTO_BOX:
        return {"type": "auto", "x": x, "y": y, "w": w, "h": h}
    return {"type": "auto"}


def compose(*values) -> str:
    """Control values -> job JSON text (what the script receives)."""
    top = dict(zip(TOP_FIELDS, values[:len(TOP_FIELDS)]))
    count = max(1, min(MAX_UI_CONCEPTS, int(top.pop("count") or 1)))
    drawn, z = parse_canvas(top.pop("canvas"))
    for key in NUMBER_FIELDS:
        top[key] = _as_float(top[key])
    if isinstance(top["mask_refine_k"], float) and top["mask_refine_k"].is_integer():
        top["mask_refine_k"] = int(top["mask_refine_k"])   # a number box sends 3.0
    top["reference"] = reference_png(top["reference"])
    background = reference_png(top.pop("background"))
    if background:
        top["background"] = {"png": background}
    top["start_at"] = start_value(top["start_at"])
    if top["start_at"] is None:
        del top["start_at"]   # an empty box: the mode's default
    z = z[:count] if len(z) >= count and None not in z[:count] else []
    if z == sorted(z) and len(set(z)) == len(z):
        z = []   # list order already is the front-to-back order: keep the JSON plain
    concepts = []
    for i in range(count):
        start = len(TOP_FIELDS) + i * len(CONCEPT_FIELDS)
        row = dict(zip(CONCEPT_FIELDS, values[start:start + len(CONCEPT_FIELDS)]))
        concept = {
            "name": row["name"] or f"concept {i + 1}", "loras": parse_loras(row["loras"]),
            "prompt": row["prompt"] or "", "negative_prompt": row["negative_prompt"] or "",
            "class_word": row["class_word"] or "", "token": row["token"] or "",
            "region": _region(row["region"], row["x"], row["y"], row["w"], row["h"], row["mask"],
                              drawn[i] if i < len(drawn) else None),
        }
        if z:
            concept["z"] = z[i]
        for key in ("reference", "reference_mask"):   # an image concept's picture and its subject's mask
            picture = reference_png(row[key])
            if picture:
                concept[key] = {"png": picture}
        faces = [reference_png(row[key]) for key in FACE_FIELDS]
        faces = [picture for picture in faces if picture]
        if faces:   # a face concept: its photos and weights (without photos the weights mean nothing)
            concept["faces"] = [{"png": picture} for picture in faces]
            for key, default in zip(("face_weight", "face_control"), FACE_DEFAULTS):
                concept[key] = default if row[key] is None else _as_float(row[key])
        concepts.append(concept)
    return json.dumps({"version": 1, **top, "concepts": concepts})


def _as_float(value):
    """A slider's value as the job's float (sliders send 6 or 6.0 alike: one spelling in the JSON);
    anything else goes to the job as it is, for the job to name."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value


def _same_region(a: dict, b: dict) -> bool:
    if a.get("type") != b.get("type"):
        return False
    if a["type"] == "rect" or (a["type"] == "auto" and ("w" in a or "w" in b)):
        unset = {"x": 0.0, "y": 0.0, "w": 1.0, "h": 1.0}
        value = lambda r, k: float(r[k]) if r.get(k) is not None else unset[k]   # noqa: E731
        return all(abs(value(a, k) - value(b, k)) < 1e-3 for k in "xywh")
    return a.get("png") == b.get("png")


def apply_canvas(*values) -> list:
    """Control values with the canvas field just written by the editor -> new control values.

    Only the concepts the edit changed are touched: the canvas may still show another concept's
    region from before a change of its controls that is on its way to the canvas. A region that
    the canvas reports unchanged keeps its control (an uploaded mask stays an upload); a drawn
    rectangle becomes its preset or "rectangle"; anything else is "drawn".
    """
    values = list(values)
    regions, _ = parse_canvas(values[TOP_FIELDS.index("canvas")])
    edited = edited_concepts(values[TOP_FIELDS.index("canvas")])
    count = max(1, min(MAX_UI_CONCEPTS, int(values[TOP_FIELDS.index("count")] or 1)))
    for i in range(min(count, len(regions))):
        if edited is not None and i not in edited:
            continue
        start = len(TOP_FIELDS) + i * len(CONCEPT_FIELDS)
        at = {field: start + CONCEPT_FIELDS.index(field) for field in ("region", "x", "y", "w", "h", "mask")}
        current = values[at["region"]]
        if current == "auto" and regions[i] is None:
            continue   # found after the layout pass: nothing to draw yet
        if current == AUTO_BOX and regions[i] is None:
            values[at["region"]] = "auto"   # its rectangle was erased: search the whole image
            continue
        if current not in (DRAWN, "auto") and regions[i] is not None and _same_region(
                regions[i], _region(current, *(values[at[k]] for k in ("x", "y", "w", "h", "mask")))):
            continue
        region = regions[i]
        if region is not None and region["type"] == "auto":
            continue   # the editor handing back a job's own automatic region: nothing drawn
        if region is not None and region["type"] == "rect":
            r = Region("rect", *(float(region.get(k, d)) for k, d in (("x", 0), ("y", 0), ("w", 1), ("h", 1))))
            values[at["region"]] = AUTO_BOX if current == AUTO_BOX else _preset_of(r)
            values[at["x"]], values[at["y"]], values[at["w"]], values[at["h"]] = r.x, r.y, r.w, r.h
        else:
            values[at["region"]] = DRAWN
    return values


def _preset_of(region) -> str:
    for name, rects in PRESETS.items():
        if all(abs(a - b) < 1e-3 for a, b in zip(rects[0], (region.x, region.y, region.w, region.h))):
            return name
    return "rectangle"


def _region_json(region: Region) -> dict | None:
    if region.type == "rect":
        return {"type": "rect", "x": region.x, "y": region.y, "w": region.w, "h": region.h}
    if region.type == "mask":
        return {"type": "mask", "png": region.png}
    if region.boxed:
        return {"type": "auto", "x": region.x, "y": region.y, "w": region.w, "h": region.h}
    return None


def decompose(text: str) -> list | None:
    """Job JSON (pasted infotext, a saved job) -> control values; None if it is not a job."""
    try:
        job = parse_job(text)
    except JobError:
        return None
    if not job.concepts:
        return None
    shown = job.concepts[:MAX_UI_CONCEPTS]
    # what the canvas shows; a rect keeps its preset; an automatic region found in the pasted
    # image's run comes back drawn, to be corrected and re-run with the same seed
    drawn = [{"type": "mask", "png": c.region.found} if c.region.type == "auto" and c.region.found
             else _region_json(c.region) for c in shown]
    z = [c.z for c in shown] if any(c.z is not None for c in shown) else []
    if None in z:   # partly given: an unranked concept ranks by its list index, as in the plan
        z = [c.z if c.z is not None else i for i, c in enumerate(shown)]
    values = [getattr(job, key) for key in JOB_OPTIONS] + [len(shown), canvas_text(drawn, z)]
    values[TOP_FIELDS.index("start_at")] = start_text(job.start_at)
    values[TOP_FIELDS.index("reference")] = reference_image(job.reference)
    values[TOP_FIELDS.index("background")] = reference_image(job.background)
    defaults = default_values()
    for i in range(MAX_UI_CONCEPTS):
        if i >= len(job.concepts):
            start = len(TOP_FIELDS) + i * len(CONCEPT_FIELDS)
            values += defaults[start:start + len(CONCEPT_FIELDS)]
            continue
        c = job.concepts[i]
        r = c.region
        kind = {"rect": _preset_of(r), "mask": DRAWN,
                "auto": DRAWN if r.found else (AUTO_BOX if r.boxed else "auto")}[r.type]
        values += [c.name, format_loras(c.loras), c.prompt, c.negative_prompt, c.class_word, c.token, kind,
                   r.x, r.y, r.w, r.h, None, reference_image(c.reference), reference_image(c.reference_mask)]
        faces = [image for image in map(reference_image, c.faces[:MAX_FACES]) if image is not None]
        values += faces + [None] * (MAX_FACES - len(faces)) + [c.face_weight, c.face_control]
    return values
