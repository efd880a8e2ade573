"""Latent re-initialisation (LoRA-Composer): before sampling, each drawn concept's region of
the initial noise is replaced by the noise patch where its class word's cross-attention was
strongest at the first step (a window the size of the region's box), then the latent is
renormalised to the original's mean and standard deviation."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def box_of(weights: torch.Tensor) -> tuple[int, int, int, int] | None:
    """(top, left, height, width) of the cells where a concept holds most of the weight."""
    cells = (weights > 0.5).nonzero()
    if cells.numel() == 0:
        return None
    top, left = cells.min(0).values.tolist()
    bottom, right = cells.max(0).values.tolist()
    return top, left, bottom - top + 1, right - left + 1


def strongest_window(attention: torch.Tensor, height: int, width: int) -> tuple[int, int]:
    """(top, left) of the height x width window with the largest attention sum."""
    sums = F.avg_pool2d(attention[None, None].float(), (height, width), stride=1)[0, 0]
    index = int(sums.flatten().argmax())
    return index // sums.shape[1], index % sums.shape[1]


def reinitialise(noise: torch.Tensor, maps: torch.Tensor, boxes: list[list[tuple | None]]) -> torch.Tensor:
    """noise (B, C, h, w); maps (B, n, h, w) class-word attention at latent size; boxes[b][i]:
    concept i's box in image b (None: not moved). Patches are read from the original noise."""
    out = noise.clone()
    for b in range(noise.shape[0]):
        moved = False
        for i, box in enumerate(boxes[b]):
            if box is None:
                continue
            top, left, height, width = box
            src_top, src_left = strongest_window(maps[b, i], height, width)
            out[b, :, top:top + height, left:left + width] = noise[b, :, src_top:src_top + height,
                                                                   src_left:src_left + width]
            moved = True
        if moved:
            x, ref = out[b], noise[b]
            out[b] = (x - x.mean()) / x.std() * ref.std() + ref.mean()
    return out
