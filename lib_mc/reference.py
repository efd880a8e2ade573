"""A picture of the job (conductor mode's reference, an image concept's reference, the kept
background) as pixels the host's VAE encodes."""

from __future__ import annotations

import numpy as np
import torch

from .regions import decode_png


def reference_pixels(png: str, image_hw: tuple[int, int], field: str = "reference") -> torch.Tensor:
    """Base64 PNG -> (1, 3, H, W) in [-1, 1] at the generation's size: RGB (transparent parts on
    white, as a collage shows), scaled to cover the size and centre-cropped, as img2img's *Crop
    and resize* does, so the layout is not stretched. `field` names the picture in the error
    when it cannot be decoded."""
    from PIL import Image
    image = decode_png(png, field)
    if image.mode in ("RGBA", "LA", "P") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    image = image.convert("RGB")
    h, w = image_hw
    scale = max(w / image.width, h / image.height)
    size = (max(w, round(image.width * scale)), max(h, round(image.height * scale)))
    image = image.resize(size, Image.LANCZOS)
    left, top = (size[0] - w) // 2, (size[1] - h) // 2
    image = image.crop((left, top, left + w, top + h))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
    return pixels.permute(2, 0, 1)[None].contiguous()
