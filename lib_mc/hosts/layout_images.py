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


def overlay(image: Image.Image, weights: torch.Tensor, names: list[str], colours: list[int] | None = None) -> Image.Image:
    """Concept weights (n + 1, h, w; row 0 = background) tinted over the image, with a legend.
    colours[i]: concept i's colour number (default i), so a concept keeps its colour everywhere."""
    colours = colours if colours is not None else list(range(len(names)))
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    h, w = base.shape[:2]
    up = torch.nn.functional.interpolate(weights[None].float(), size=(h, w), mode="nearest")[0].numpy()
    tint = np.zeros_like(base)
    for i in range(1, up.shape[0]):
        tint += up[i][..., None] * np.array(COLOURS[colours[i - 1] % len(COLOURS)], dtype=np.float32)
    alpha = (1 - up[0])[..., None] * 0.45
    out = Image.fromarray((base * (1 - alpha) + tint * alpha).clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    for i, name in enumerate(names):
        draw.rectangle((6, 6 + 16 * i, 18, 18 + 16 * i), fill=COLOURS[colours[i] % len(COLOURS)])
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


SHEET_COLUMNS = 3
SHEET_MAX_WIDTH = 1536
LABEL_HEIGHT = 18


def _auto_weights(masks: torch.Tensor) -> torch.Tensor:
    """(n, h, w) masks or maps of the automatic concepts -> overlay weights (n + 1, h, w) whose
    concept rows sum to at most 1 (attention maps overlap)."""
    masks = masks.float()
    masks = masks / masks.sum(0, keepdim=True).clamp_min(1)
    return torch.cat([(1 - masks.sum(0, keepdim=True)).clamp(0, 1), masks])


def _draw_boxes(image: Image.Image, boxes, grid_hw: tuple[int, int]) -> None:
    """Face boxes given in cells of the attention grid, drawn in image pixels."""
    sy, sx = image.height / grid_hw[0], image.width / grid_hw[1]
    draw = ImageDraw.Draw(image)
    for box in boxes:
        x0, y0, x1, y1 = (float(v) for v in box[:4])
        draw.rectangle((x0 * sx, y0 * sy, x1 * sx, y1 * sy), outline=(255, 255, 0), width=2)


def mask_steps_sheet(image: Image.Image, steps: list[tuple[str, torch.Tensor]], names: list[str],
                     boxes=None, colours: list[int] | None = None) -> Image.Image:
    """One labelled panel per step of finding the automatic masks (image b's masks in each step),
    face boxes on the attention-masks panel; panels left to right, top to bottom."""
    panels = []
    for label, masks in steps:
        panel = overlay(image, _auto_weights(masks), names, colours)
        if boxes is not None and len(boxes) and label == "attention masks":
            _draw_boxes(panel, boxes, tuple(masks.shape[-2:]))
            label += f", {len(boxes)} face{'s' if len(boxes) != 1 else ''}"
        panels.append((label, panel))
    columns = min(SHEET_COLUMNS, len(panels))
    scale = min(1.0, SHEET_MAX_WIDTH / (columns * image.width))
    pw, ph = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    rows = -(-len(panels) // columns)
    sheet = Image.new("RGB", (columns * pw, rows * (ph + LABEL_HEIGHT)), (0, 0, 0))
    draw = ImageDraw.Draw(sheet)
    for k, (label, panel) in enumerate(panels):
        x, y = (k % columns) * pw, (k // columns) * (ph + LABEL_HEIGHT)
        draw.text((x + 4, y + 3), f"{k + 1}. {label}", fill=(255, 255, 255))
        sheet.paste(panel.resize((pw, ph), Image.NEAREST), (x, y + LABEL_HEIGHT))
    return sheet


def layout_outputs(sd_model, layouts: list[tuple[torch.Tensor, object]], names: list[str]) -> list[Image.Image]:
    """Per batch (stage-1 latents, its plan): each layout image, then its regions over it (the
    ones found for that very image when regions were automatic) and, for automatic regions, a
    sheet with every step of finding them (attention maps, attention masks and faces, SAM,
    clean-up, each refinement)."""
    images = []
    for batch, plan in layouts:
        decoded = decode(sd_model, batch)
        for i, image in enumerate(to_images(decoded)):
            images.append(image)
            if plan is None:
                continue
            per_image = plan.image_regions
            regions = per_image[min(i, len(per_image) - 1)] if per_image else plan.regions
            images.append(overlay(image, regions.latent, names))
            if plan.mask_steps:
                auto_names = [names[c] for c in plan.auto_concepts]
                steps = [(label, masks[min(i, len(masks) - 1)]) for label, masks in plan.mask_steps]
                faces = plan.face_boxes
                boxes = faces[min(i, len(faces) - 1)] if faces else None
                images.append(mask_steps_sheet(image, steps, auto_names, boxes, colours=plan.auto_concepts))
    return images
