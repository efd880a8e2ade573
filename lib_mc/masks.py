"""Concept regions -> blending weights at latent resolution and at every attention grid.

Weights are composited front to back ("over"), so at every pixel background + concepts sum
to 1 and overlapping masks never add up (OMG's official code adds them).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from .errors import PlanError

LATENT_FACTOR = 8


def latent_size(image_hw: tuple[int, int], factor: int = LATENT_FACTOR) -> tuple[int, int]:
    h, w = image_hw
    return math.ceil(h / factor), math.ceil(w / factor)


def grid_sizes(latent_hw: tuple[int, int], levels: int = 4) -> list[tuple[int, int]]:
    """Spatial sizes the UNet works at. Its stride-2 convs pad, so each level is ceil(prev / 2)."""
    sizes = [tuple(latent_hw)]
    for _ in range(levels - 1):
        h, w = sizes[-1]
        sizes.append((math.ceil(h / 2), math.ceil(w / 2)))
    return sizes


def check_mask(mask, field: str) -> torch.Tensor:
    """Validate one user mask and return it as float32 (H, W) in [0, 1]."""
    if not isinstance(mask, torch.Tensor):
        try:
            mask = torch.as_tensor(mask)
        except Exception as exc:  # numpy arrays, nested lists; anything else is a type error
            raise PlanError(field, f"not an array ({type(mask).__name__})") from exc
    if mask.dim() == 3 and 1 in (mask.shape[0], mask.shape[-1]):
        mask = mask.squeeze(0) if mask.shape[0] == 1 else mask.squeeze(-1)
    if mask.dim() != 2:
        raise PlanError(field, f"must be a 2-D (H, W) mask, got shape {tuple(mask.shape)}")
    if mask.numel() == 0:
        raise PlanError(field, "is empty")
    if mask.dtype == torch.bool:
        mask = mask.float()
    elif mask.dtype == torch.uint8:
        mask = mask.float() / 255.0
    elif not mask.dtype.is_floating_point:
        mask = mask.float()
    mask = mask.detach().to("cpu", torch.float32)
    if not torch.isfinite(mask).all():
        raise PlanError(field, "contains NaN or infinity")
    if mask.min() < 0 or mask.max() > 1:
        raise PlanError(field, f"values must lie in [0, 1], got [{mask.min():.3g}, {mask.max():.3g}]")
    if mask.max() == 0:
        raise PlanError(field, "is all zero: the concept has no region")
    return mask


def _gaussian_blur(mask: torch.Tensor, radius_px: float) -> torch.Tensor:
    """Separable Gaussian with sigma = radius / 2, edge-replicated (no dark border)."""
    sigma = radius_px / 2.0
    half = max(1, math.ceil(radius_px))
    xs = torch.arange(-half, half + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (xs / sigma) ** 2)
    kernel = kernel / kernel.sum()
    img = mask[None, None]
    img = F.pad(img, (half, half, 0, 0), mode="replicate")
    img = F.conv2d(img, kernel.view(1, 1, 1, -1))
    img = F.pad(img, (0, 0, half, half), mode="replicate")
    img = F.conv2d(img, kernel.view(1, 1, -1, 1))
    return img[0, 0]


def composite(coverages: torch.Tensor, back_to_front: Sequence[int]) -> torch.Tensor:
    """(n, h, w) coverages in [0, 1] -> (n + 1, h, w) weights, row 0 = background, sum = 1.

    A concept's weight is its coverage times what the concepts in front of it leave visible.
    """
    n = coverages.shape[0]
    weights = torch.zeros((n + 1,) + tuple(coverages.shape[1:]), dtype=coverages.dtype)
    visible = torch.ones_like(coverages[0]) if n else torch.ones(coverages.shape[1:])
    for index in reversed(list(back_to_front)):  # front first
        weights[index + 1] = coverages[index] * visible
        visible = visible * (1 - coverages[index])
    weights[0] = visible
    return weights


class RegionWeights:
    """Blending weights for one job: background first, then concepts in plan order."""

    def __init__(self, masks: Sequence[torch.Tensor], image_hw: tuple[int, int],
                 back_to_front: Sequence[int] | None = None, feather_px: float = 0.0,
                 levels: int = 4):
        if feather_px < 0:
            raise PlanError("feather", f"must be >= 0 pixels, got {feather_px}")
        self.image_hw = tuple(int(v) for v in image_hw)
        self.latent_hw = latent_size(self.image_hw)
        self.grids = grid_sizes(self.latent_hw, levels)
        order = list(range(len(masks))) if back_to_front is None else list(back_to_front)
        if sorted(order) != list(range(len(masks))):
            raise PlanError("order", f"{order} is not a permutation of the {len(masks)} concepts")
        coverages = [self._coverage(check_mask(m, f"concepts[{i}].mask"), feather_px)
                     for i, m in enumerate(masks)]
        stacked = torch.stack(coverages) if coverages else torch.zeros((0,) + self.latent_hw)
        self.latent = composite(stacked, order)
        self._by_grid: dict[tuple[int, int], torch.Tensor] = {self.latent_hw: self.latent}
        self._by_device: dict[tuple, torch.Tensor] = {}

    def _coverage(self, mask: torch.Tensor, feather_px: float) -> torch.Tensor:
        """Fraction of each latent cell that the mask covers, at image scale first."""
        h, w = self.image_hw
        if tuple(mask.shape) != (h, w):
            # shrink by area, grow by nearest pixel: edges stay where the user drew them
            shrink = mask.shape[0] >= h and mask.shape[1] >= w
            mask = F.interpolate(mask[None, None], size=(h, w), mode="area" if shrink else "nearest-exact")[0, 0]
        if feather_px > 0:
            mask = _gaussian_blur(mask, feather_px)
        return F.adaptive_avg_pool2d(mask[None, None], self.latent_hw)[0, 0].clamp(0, 1)

    def at_grid(self, hw: tuple[int, int]) -> torch.Tensor:
        hw = tuple(hw)
        if hw not in self._by_grid:
            self._by_grid[hw] = F.adaptive_avg_pool2d(self.latent[None], hw)[0]
        return self._by_grid[hw]

    def find_grid(self, n_tokens: int) -> tuple[int, int] | None:
        """The UNet grid that flattens to n_tokens tokens, None if there is none."""
        for hw in self.grids:
            if hw[0] * hw[1] == n_tokens:
                return hw
        return None

    def grid_for_tokens(self, n_tokens: int) -> tuple[int, int]:
        hw = self.find_grid(n_tokens)
        if hw is not None:
            return hw
        raise KeyError(f"no attention grid of {n_tokens} tokens for latent {self.latent_hw}; "
                       f"known grids: {self.grids}")

    def at_tokens(self, n_tokens: int) -> torch.Tensor:
        """(n + 1, n_tokens) weights flattened the way attention flattens (row-major h, w)."""
        return self.at_grid(self.grid_for_tokens(n_tokens)).flatten(1)

    def latent_on(self, like: torch.Tensor) -> torch.Tensor:
        """Latent weights as (n + 1, 1, 1, h, w) on the device and dtype of `like`, cached."""
        key = (like.device, like.dtype)
        if key not in self._by_device:
            self._by_device[key] = self.latent.to(like.device, like.dtype)[:, None, None]
        return self._by_device[key]
