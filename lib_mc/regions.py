"""Job regions -> masks at image size; presets the panel offers; compact masks for infotext."""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re

import torch

from .job import JobError, Region

# name -> one rect per concept slot, as (x, y, w, h) fractions
PRESETS: dict[str, list[tuple[float, float, float, float]]] = {
    "full": [(0, 0, 1, 1)],
    "left half": [(0, 0, 0.5, 1)],
    "right half": [(0.5, 0, 0.5, 1)],
    "left third": [(0, 0, 1 / 3, 1)],
    "middle third": [(1 / 3, 0, 1 / 3, 1)],
    "right third": [(2 / 3, 0, 1 / 3, 1)],
    "top half": [(0, 0, 1, 0.5)],
    "bottom half": [(0, 0.5, 1, 0.5)],
    "centre": [(0.25, 0.25, 0.5, 0.5)],
}


def preset_region(name: str) -> Region:
    if name not in PRESETS:
        raise JobError("region preset", f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    x, y, w, h = PRESETS[name][0]
    return Region("rect", x, y, w, h)


def rect_mask(region: Region, image_hw: tuple[int, int]) -> torch.Tensor:
    h, w = image_hw
    mask = torch.zeros(h, w)
    top, left = round(region.y * h), round(region.x * w)
    bottom, right = round((region.y + region.h) * h), round((region.x + region.w) * w)
    mask[top:max(bottom, top + 1), left:max(right, left + 1)] = 1
    return mask


def decode_png(data: str, field: str):
    """Base64 (or data URL) PNG -> PIL image. Raises JobError naming the field."""
    from PIL import Image
    if data.startswith("data:"):
        data = data.split(",", 1)[-1]
    try:
        raw = base64.b64decode(data, validate=False)
        image = Image.open(io.BytesIO(raw))
        if max(image.size) <= 8192:   # the size is in the header: never decode a mask too large to use
            image.load()
    except (binascii.Error, ValueError, OSError, Image.DecompressionBombError) as exc:
        reason = re.sub(r"\s*<[^>]*>", "", str(exc)) or type(exc).__name__   # no object reprs in a user message
        raise JobError(field, f"cannot be decoded as a PNG image ({reason})") from exc
    if max(image.size) > 8192:
        raise JobError(field, f"is {image.size[0]}x{image.size[1]}; masks may be at most 8192 pixels a side")
    return image


def png_mask(region: Region, field: str) -> torch.Tensor:
    """White = inside. An alpha channel, when present, is what was painted."""
    import numpy as np
    image = decode_png(region.png, field)
    if image.mode in ("RGBA", "LA") or "transparency" in image.info:
        gray = image.convert("RGBA").getchannel("A")
    else:
        gray = image.convert("L")
    return torch.from_numpy(np.asarray(gray, dtype=np.float32) / 255.0)


def region_mask(region: Region, image_hw: tuple[int, int], field: str) -> torch.Tensor:
    if region.type == "rect":
        return rect_mask(region, image_hw)
    if region.type == "mask":
        return png_mask(region, field)
    raise JobError(field, "is automatic ('auto'): it is found in the layout pass, it has no mask before it")


def encode_png(mask: torch.Tensor) -> str:
    """(H, W) mask in [0, 1] -> base64 8-bit grayscale PNG."""
    import numpy as np
    from PIL import Image
    array = (mask.clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array, mode="L").save(buffer, format="PNG", optimize=True)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def compact_mask(png: str, field: str, max_side: int = 128) -> tuple[str, str]:
    """A small thresholded copy of a mask for infotext, and a short hash of the original."""
    digest = hashlib.sha256(png.encode("ascii")).hexdigest()[:12]
    mask = png_mask(Region("mask", png=png), field)
    h, w = mask.shape
    scale = min(1.0, max_side / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = torch.nn.functional.interpolate(mask[None, None], size=(size[1], size[0]), mode="area")[0, 0]
    return encode_png((small >= 0.5).float()), digest
