"""A1111 side of SAM refinement: the setting that picks a checkpoint in models/sam, the layout
images it runs on, and the once-per-session notice when no checkpoint is there."""

from __future__ import annotations

import os

import numpy as np
import torch

from modules import devices, paths, shared

from ..auto import sam
from .layout_images import to_images

SETTING = "multi_concept_sam_model"
MODELS = sam.SamModels()
_told: set[str] = set()


def sam_folder() -> str:
    return os.path.join(paths.models_path, "sam")


def choices() -> list[str]:
    folder = sam_folder()
    files = sorted(f for f in os.listdir(folder) if f.endswith((".pth", ".pt"))) if os.path.isdir(folder) else []
    return ["auto", "none"] + files


def register_settings() -> None:
    import gradio as gr
    from modules import script_callbacks

    def add():
        shared.opts.add_option(SETTING, shared.OptionInfo(
            "auto", "SAM checkpoint for automatic regions (models/sam; auto = the smallest found, "
                    "none = attention masks only)", gr.Dropdown, lambda: {"choices": choices()},
            section=("multi_concept", "Multi-Concept")))
        shared.opts.add_option("multi_concept_free_sam", shared.OptionInfo(
            False, "Free the SAM model after each job (else kept; on the CPU with --lowvram/--medvram)",
            section=("multi_concept", "Multi-Concept")))
    script_callbacks.on_ui_settings(add)


def refine(p, layout_latents: torch.Tensor, found: torch.Tensor, warnings: list[str]) -> torch.Tensor | None:
    """(B, n, h, w) attention masks -> (B, n, H, W) SAM masks, or None (attention it is)."""
    choice = getattr(shared.opts, SETTING, "auto") if hasattr(shared, "opts") else "auto"
    if choice == "none":
        return None
    path = sam.find_checkpoint(sam_folder(), choice)
    if path is None:
        message = sam.missing_message(sam_folder()) if choice == "auto" else \
            f"automatic regions: the SAM checkpoint {choice} is not in {sam_folder()}: used the attention masks"
        warnings.append(message)
        if message not in _told:   # once in the console; every image's infotext says it
            _told.add(message)
            print(f"[Multi-Concept] {message}")
        return None
    try:
        predictor = MODELS.predictor(path, devices.device)
        model = p.sd_model
        with torch.no_grad():
            decoded = model.decode_first_stage(layout_latents.to(devices.device, devices.dtype_vae))
        masks = []
        for b, image in enumerate(to_images(decoded)):
            refined, notes = sam.refine(predictor, np.asarray(image), found[b])
            masks.append(refined)
            warnings.extend(notes)
        return torch.stack(masks)
    except sam.ModelFileError as exc:
        warnings.append(f"{exc}: used the attention masks")
        print(f"[Multi-Concept] {exc}")
        return None
    finally:
        if getattr(shared.opts, "multi_concept_free_sam", False):
            MODELS.free()
        elif getattr(shared.cmd_opts, "lowvram", False) or getattr(shared.cmd_opts, "medvram", False):
            MODELS.offload()
