"""Segment Anything on the layout image: the attention masks become precise subject masks.

Each automatic concept prompts SAM with the box around its attention mask (or the box the user
drew for it), a point inside it and the other concepts' points as background; of SAM's three candidates the one that agrees best
with the attention mask wins. Checkpoints are the official files (`models/sam`, the folder
sd-webui-segment-anything uses), loaded with `weights_only=True`.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import MultiConceptError
from .kept import KeptModel

KNOWN_FILES = {"vit_b": "sam_vit_b_01ec64.pth", "vit_l": "sam_vit_l_0b3195.pth", "vit_h": "sam_vit_h_4b8939.pth"}
MIN_AGREEMENT = 0.1   # below this IoU with the attention mask, SAM found something else: keep attention


class ModelFileError(MultiConceptError):
    pass


def model_type(path: str) -> str:
    name = os.path.basename(path).lower()
    for kind in KNOWN_FILES:
        if kind in name:
            return kind
    raise ModelFileError(f"{path}: cannot tell the SAM model type from the file name "
                         f"(it must contain vit_b, vit_l or vit_h, like {', '.join(KNOWN_FILES.values())})")


def find_checkpoint(folder: str, choice: str = "auto") -> str | None:
    """`choice`: a file name in the folder, or "auto" for the smallest known model present."""
    if choice and choice != "auto":
        path = os.path.join(folder, choice)
        return path if os.path.isfile(path) else None
    if not os.path.isdir(folder):
        return None
    present = sorted(f for f in os.listdir(folder) if f.endswith((".pth", ".pt")) and
                     any(kind in f.lower() for kind in KNOWN_FILES))
    ranked = sorted(present, key=lambda f: [k in f.lower() for k in KNOWN_FILES].index(True))
    return os.path.join(folder, ranked[0]) if ranked else None


def missing_message(folder: str) -> str:
    return (f"automatic regions: no SAM checkpoint in {folder} (put {KNOWN_FILES['vit_b']}, "
            f"{KNOWN_FILES['vit_l']} or {KNOWN_FILES['vit_h']} there): used the attention masks")


class SamModels(KeptModel):
    """One SAM kept between jobs (its predictor; the model inside it moves)."""

    def __init__(self):
        super().__init__(lambda predictor: predictor.model)

    def predictor(self, path: str, device: torch.device):
        return self.get(path, lambda: _load(path), device)


def _load(path: str):
    try:
        from segment_anything import SamPredictor, sam_model_registry
    except ImportError as exc:
        raise ModelFileError(f"segment_anything is not installed ({exc}); the extension's install.py "
                             "installs it") from exc
    if not os.path.isfile(path):
        raise ModelFileError(f"SAM checkpoint {path} does not exist")
    model = sam_model_registry[model_type(path)]()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as exc:   # pickle errors, wrong keys or shapes: name the file
        raise ModelFileError(f"SAM checkpoint {path} could not be loaded as {model_type(path)}: {exc}") from exc
    return SamPredictor(model.eval())


def choose_mask(candidates: np.ndarray, coarse: np.ndarray) -> tuple[np.ndarray, float]:
    """SAM's candidates (k, H, W) bool -> the one with the best IoU with the coarse mask."""
    scores = []
    for candidate in candidates:
        union = np.logical_or(candidate, coarse).sum()
        scores.append(np.logical_and(candidate, coarse).sum() / union if union else 0.0)
    best = int(np.argmax(scores))
    return candidates[best], float(scores[best])


def _prompt(coarse: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Box (x0, y0, x1, y1) around the mask and a point inside it (the cell nearest its centroid)."""
    ys, xs = np.nonzero(coarse)
    box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float32)
    cy, cx = ys.mean(), xs.mean()
    nearest = int(np.argmin((ys - cy) ** 2 + (xs - cx) ** 2))
    return box, np.array([xs[nearest], ys[nearest]], dtype=np.float32)


@torch.no_grad()
def refine(predictor, image: np.ndarray, coarse: torch.Tensor, boxes=None) -> tuple[torch.Tensor, list[str]]:
    """image: (H, W, 3) uint8 layout image; coarse: (n, h, w) attention masks of one image;
    boxes[i]: None or the (x, y, w, h) image fractions drawn for concept i, SAM's box prompt.
    Returns (n, H, W) disjoint masks and notes on concepts where attention was kept."""
    h, w = image.shape[:2]
    up = F.interpolate(coarse[None].float(), size=(h, w), mode="nearest")[0].numpy() > 0.5
    predictor.set_image(image)
    prompts = [_prompt(m) if m.any() else None for m in up]
    refined, notes = [], []
    for i, mask in enumerate(up):
        if prompts[i] is None:
            refined.append(mask)
            continue
        box, point = prompts[i]
        if boxes is not None and boxes[i] is not None:
            x, y, bw, bh = boxes[i]
            box = np.array([x * w, y * h, (x + bw) * w, (y + bh) * h], dtype=np.float32)
        others = [p[1] for j, p in enumerate(prompts) if j != i and p is not None]
        points = np.stack([point] + others)
        labels = np.array([1] + [0] * len(others))
        candidates, _, _ = predictor.predict(point_coords=points, point_labels=labels, box=box,
                                             multimask_output=True)
        chosen, agreement = choose_mask(candidates.astype(bool), mask)
        if agreement < MIN_AGREEMENT or not chosen.any():
            notes.append(f"concept {i + 1}: SAM's mask did not match the attention (IoU {agreement:.2f}): kept attention")
            chosen = mask
        refined.append(chosen)
    claims = torch.from_numpy(np.stack(refined))
    coarse_up = torch.from_numpy(up)
    # overlaps: a claimant whose attention mask holds the pixel keeps it, else the first claimant
    owner = torch.full((h, w), -1, dtype=torch.long)
    for i in range(len(claims)):
        owner[(owner < 0) & claims[i] & coarse_up[i]] = i
    for i in range(len(claims)):
        owner[(owner < 0) & claims[i]] = i
    for i in range(len(claims)):
        if not (owner == i).any():   # lost everything: its attention cells are its own
            owner[coarse_up[i]] = i
    return torch.stack([(owner == i).float() for i in range(len(claims))]), notes
