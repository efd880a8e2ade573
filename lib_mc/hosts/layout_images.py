"""The `save_layout` outputs: the stage-1 (layout pass) images and the regions drawn over them."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

COLOURS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60)]


def to_images(decoded: torch.Tensor) -> list[Image.Image]:
    """VAE output in [-1, 1], (B, 3, H, W) -> PIL images."""
    array = ((decoded.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in array]


def overlay(image: Image.Image, weights: torch.Tensor, names: list[str]) -> Image.Image:
    """Concept weights (n + 1, h, w; row 0 = background) tinted over the image, with a legend."""
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    h, w = base.shape[:2]
    up = torch.nn.functional.interpolate(weights[None].float(), size=(h, w), mode="nearest")[0].numpy()
    tint = np.zeros_like(base)
    for i in range(1, up.shape[0]):
        tint += up[i][..., None] * np.array(COLOURS[(i - 1) % len(COLOURS)], dtype=np.float32)
    alpha = (1 - up[0])[..., None] * 0.45
    out = Image.fromarray((base * (1 - alpha) + tint * alpha).clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    for i, name in enumerate(names):
        draw.rectangle((6, 6 + 16 * i, 18, 18 + 16 * i), fill=COLOURS[i % len(COLOURS)])
        draw.text((24, 6 + 16 * i), name, fill=(255, 255, 255))
    return out


def decode(sd_model, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> images in [-1, 1]. A1111's VAE wants its own device and dtype; Forge's
    `first_stage_model` is None and its `decode_first_stage` loads and casts by itself."""
    vae = getattr(sd_model, "first_stage_model", None)
    if vae is not None:
        weight = next(vae.parameters())
        latents = latents.to(weight.device, weight.dtype)
    with torch.no_grad():
        return sd_model.decode_first_stage(latents)


def layout_outputs(sd_model, layouts: list[tuple[torch.Tensor, object]], names: list[str]) -> list[Image.Image]:
    """Per batch (stage-1 latents, its plan): each layout image, then its regions over it (the
    ones found for that very image when regions were automatic) and, for automatic regions
    that SAM or refinement changed, the attention masks they started from."""
    images = []
    for batch, plan in layouts:
        decoded = decode(sd_model, batch)
        for i, image in enumerate(to_images(decoded)):
            images.append(image)
            if plan is not None:
                per_image = plan.image_regions
                regions = per_image[min(i, len(per_image) - 1)] if per_image else plan.regions
                images.append(overlay(image, regions.latent, names))
                first = plan.attention_masks
                if first is not None and not torch.equal(first, plan.found_masks):
                    masks = first[min(i, len(first) - 1)].float()
                    weights = torch.cat([(1 - masks.sum(0, keepdim=True)).clamp(0, 1), masks])
                    images.append(overlay(image, weights, [f"{names[c]} (attention)" for c in plan.auto_concepts]))
    return images
