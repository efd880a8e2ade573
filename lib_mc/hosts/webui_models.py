"""The WebUI side (A1111 and Forge alike: only `modules` API both share) of the models behind
automatic regions: the settings, the decoded layout images, face detection
(models/insightface) and SAM refinement (models/sam), each with a once-per-session console
notice when its model file is missing."""

from __future__ import annotations

import os
from typing import Callable

import numpy as np
import torch

from modules import devices, paths, shared

from .. import memory
from ..auto import faces as face_detection
from ..auto import sam
from .layout_images import decode, to_images

SETTING = "multi_concept_sam_model"
FACES_SETTING = "multi_concept_faces"
MAX_ROWS_SETTING = "multi_concept_max_rows"
MODELS = sam.SamModels()
_detectors: dict[str, face_detection.FaceDetector] = {}
_told: set[str] = set()


def note(message: str, warnings: list[str]) -> None:
    warnings.append(message)
    if message not in _told:   # once in the console; every image's infotext says it
        _told.add(message)
        print(f"[Multi-Concept] {message}")


def layout_images(p, layout_latents: torch.Tensor) -> Callable[[], list[np.ndarray]]:
    """The decoded layout images, decoded on first use only: with neither a face detector nor
    SAM at work, the VAE is not run. The same latents (automatic regions, then where face
    concepts' faces are) are decoded once: the last decode is kept on `p` with its tensor."""
    def images() -> list[np.ndarray]:
        kept = getattr(p, "_multi_concept_decoded", None)
        if kept is None or kept[0] is not layout_latents:
            out = decode(p.sd_model, layout_latents)
            kept = (layout_latents, [np.asarray(image) for image in to_images(out)])
            p._multi_concept_decoded = kept
        return kept[1]
    return images


def faces_folder() -> str:
    return os.path.join(paths.models_path, "insightface")


def detect_faces(images: Callable[[], list[np.ndarray]], grid_hw: tuple[int, int], warnings: list[str]) -> list | None:
    """Face boxes per image in cells of the attention grid, or None (split by position)."""
    if not getattr(shared.opts, FACES_SETTING, True):
        return None
    path = face_detection.find_detector(faces_folder())
    if path is None:
        note(f"automatic regions: no face detector in {faces_folder()} (put the buffalo_l pack's "
              f"{face_detection.DETECTOR_FILES[0]} there): people sharing a class word were split by position",
              warnings)
        return None
    try:
        detector = _detectors.get(path) or _detectors.setdefault(path, face_detection.FaceDetector(path))
        return [face_detection.to_cells(detector.detect(image), image.shape[:2], grid_hw) for image in images()]
    except sam.ModelFileError as exc:
        note(f"{exc}: people sharing a class word were split by position", warnings)
        return None


def sam_folder() -> str:
    return os.path.join(paths.models_path, "sam")


def choices() -> list[str]:
    folder = sam_folder()
    files = sorted(f for f in os.listdir(folder) if f.endswith((".pth", ".pt"))) if os.path.isdir(folder) else []
    return ["auto", "none"] + files


def rows_per_call(arch: str, latent_hw: tuple[int, int]) -> int | None:
    """Rows per UNet call for this job: what the free GPU memory holds (CUDA only; None = no
    limit on the CPU), capped by the setting."""
    cap = int(getattr(shared.opts, MAX_ROWS_SETTING, 0) or 0)
    free = None
    device = torch.device(devices.device)
    if device.type == "cuda" and torch.cuda.is_available():
        driver_free, _ = torch.cuda.mem_get_info(device)
        free = driver_free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    dtype_bytes = torch.tensor([], dtype=getattr(devices, "dtype_unet", torch.float16)).element_size()
    return choose_rows(free, memory.estimate_bytes_per_row(arch, latent_hw, dtype_bytes), cap)


def choose_rows(free_bytes: int | None, bytes_per_row: int, cap: int = 0) -> int | None:
    """The smaller of what fits (never under one row) and the cap; None: no limit at all."""
    limits = [cap] if cap > 0 else []
    if free_bytes is not None:
        limits.append(max(1, memory.rows_that_fit(free_bytes, bytes_per_row)))
    return min(limits) if limits else None


def register_settings() -> None:
    import gradio as gr
    from modules import script_callbacks

    from . import grounding_boxes

    def add():
        shared.opts.add_option(SETTING, shared.OptionInfo(
            "auto", "SAM checkpoint for automatic regions (models/sam; auto = the smallest found, "
                    "none = attention masks only)", gr.Dropdown, lambda: {"choices": choices()},
            section=("multi_concept", "Multi-Concept")))
        shared.opts.add_option(FACES_SETTING, shared.OptionInfo(
            True, "Use faces (models/insightface, det_10g.onnx) to tell apart people who share a class word",
            section=("multi_concept", "Multi-Concept")))
        shared.opts.add_option(grounding_boxes.SETTING, shared.OptionInfo(
            grounding_boxes.ATTENTION, "Boxes for automatic regions: attention (no extra model) or Grounding DINO "
            "(models/grounding-dino or sd-webui-segment-anything's; needs transformers 4.40+, which Forge has)",
            gr.Radio, {"choices": [grounding_boxes.ATTENTION, grounding_boxes.GROUNDING_DINO]},
            section=("multi_concept", "Multi-Concept"), infotext=grounding_boxes.INFOTEXT))
        shared.opts.add_option("multi_concept_free_sam", shared.OptionInfo(
            False, "Free the SAM and Grounding DINO models after each job (else kept; on the CPU with --lowvram/--medvram)",
            section=("multi_concept", "Multi-Concept")))
        shared.opts.add_option(MAX_ROWS_SETTING, shared.OptionInfo(
            0, "Most UNet rows per call (0 = as many as the free GPU memory holds); lower it if a job "
               "runs out of memory", gr.Number, {"precision": 0, "minimum": 0},
            section=("multi_concept", "Multi-Concept")))
    script_callbacks.on_ui_settings(add)


def refine(images: Callable[[], list[np.ndarray]], found: torch.Tensor, warnings: list[str],
           image_boxes=None) -> torch.Tensor | None:
    """(B, n, h, w) attention masks -> (B, n, H, W) SAM masks, or None (attention it is).
    image_boxes[b][i]: automatic concept i's box in image b (drawn or Grounding DINO's;
    fractions), SAM's box prompt."""
    choice = getattr(shared.opts, SETTING, "auto") if hasattr(shared, "opts") else "auto"
    if choice == "none":
        return None
    path = sam.find_checkpoint(sam_folder(), choice)
    if path is None:
        note(sam.missing_message(sam_folder()) if choice == "auto" else
              f"automatic regions: the SAM checkpoint {choice} is not in {sam_folder()}: used the attention masks",
              warnings)
        return None
    try:
        predictor = MODELS.predictor(path, devices.device)
        masks = []
        for b, image in enumerate(images()):
            refined, notes = sam.refine(predictor, image, found[b], image_boxes[b] if image_boxes else None)
            masks.append(refined)
            warnings.extend(notes)
        return torch.stack(masks)
    except sam.ModelFileError as exc:
        note(f"{exc}: used the attention masks", warnings)
        return None
    finally:
        release(MODELS)


def release(models) -> None:
    """After use: freed (the setting), or moved to the CPU under --lowvram/--medvram, or kept."""
    if getattr(shared.opts, "multi_concept_free_sam", False):
        models.free()
    elif getattr(shared.cmd_opts, "lowvram", False) or getattr(shared.cmd_opts, "medvram", False):
        models.offload()


# ---- face concepts: antelopev2 (models/insightface) and InstantID (models/instantid, models/ControlNet) ----

_loaded: dict[str, tuple] = {}   # kind -> (what it was loaded from, the model): the last of each kind only


def _last_loaded(kind: str, key, load):
    """The model of this kind loaded from `key`, loaded once; another key replaces it (one of each
    kind is held: the IdentityNet is as large as an SDXL ControlNet)."""
    if _loaded.get(kind, (None,))[0] != key:
        _loaded.pop(kind, None)   # the old one goes before the new one loads
        _loaded[kind] = (key, load())
    return _loaded[kind][1]


def extensions_dir() -> str | None:
    try:
        from modules import paths_internal
        return paths_internal.extensions_dir
    except (ImportError, AttributeError):
        return None


def face_analysis():
    """The antelopev2 pack's detector and recogniser, loaded once; ModelFileError names the files
    and every folder searched when they are missing."""
    from ..faces.analysis import FaceAnalysis
    from ..faces.models import antelopev2_folders, find_antelopev2
    found = find_antelopev2(antelopev2_folders(paths.models_path, extensions_dir()))
    return _last_loaded("antelopev2", found, lambda: FaceAnalysis(*found))


def instantid(unet, need_control: bool):
    """InstantID's IP-Adapter (mapped onto this UNet) and, when asked, its IdentityNet; each file
    loaded once."""
    from ..faces.instantid.files import find_instantid, instantid_folders
    from ..faces.instantid.identitynet import load_identitynet
    from ..faces.instantid.ip_adapter import load_ip_adapter
    ip_path, net_path = find_instantid(instantid_folders(paths.models_path))
    ip = _last_loaded("ip", (ip_path, id(unet)), lambda: load_ip_adapter(ip_path, unet))
    net = _last_loaded("net", net_path, lambda: load_identitynet(net_path)) if need_control else None
    return ip, net


def offload_instantid() -> None:
    """The IdentityNet back in CPU memory between jobs: a face job moves it to the GPU at its
    first call (about 2.5 GB in fp16); a later job, with faces or without, must not find the card
    that much fuller."""
    net = _loaded.get("net", (None, None))[1]
    weight = next(net.parameters(), None) if net is not None else None
    if weight is not None and weight.device.type != "cpu":
        net.to("cpu")


def find_faces(p, latents: torch.Tensor, warnings: list[str]) -> list | None:
    """Faces (boxes, keypoints) in the images of these latents, per image; None without the models."""
    try:
        analysis = face_analysis()
    except sam.ModelFileError as exc:
        note(f"face concepts: {exc}: faces placed in the upper part of their regions", warnings)
        return None
    return [analysis.faces(image, embed=False) for image in layout_images(p, latents)()]
