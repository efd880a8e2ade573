"""Mask refinement as Concept Conductor does it, as pure functions.

At the refinement steps the head-averaged self-attention probabilities of one decoder layer
(`layers.refinement_layer`) are read for the base branch's cond rows and every concept branch's
cond rows. Per image and branch, k-means on the probability rows (k from N + 1 to 2N + 1 for N
concepts, every segment of every k pooled) gives segments; each concept takes, in the base
branch and in its own branch, the segment with the best IoU with its current mask, and its new
mask is the union of the two. Where two or more concepts' new masks overlap (two concepts that
pick the same segment overlap on all of it), every concept keeps its old mask at those cells.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...auto.refine import kmeans


def _fraction_to_step(fraction: float, total_steps: int) -> int:
    return min(total_steps, max(0, int(round(fraction * total_steps))))


def refinement_steps(total_steps: int, start: float, until: float, every: float) -> list[int]:
    """The steps (0-based evaluations) that refine: from round(start * total) to round(until *
    total), both included, every max(1, round(every * total)) steps (the paper at 200 steps:
    50, 55, ..., 80)."""
    first, last = _fraction_to_step(start, total_steps), _fraction_to_step(until, total_steps)
    stride = max(1, int(round(every * total_steps)))
    return [s for s in range(first, last + 1, stride) if s < total_steps]


def cluster_counts(n_concepts: int, fixed: int = 0) -> list[int]:
    """k for k-means: `fixed` when given, else every k from N + 1 to 2N + 1 (the paper's N + 1
    branches to twice that, exclusive)."""
    if fixed:
        return [int(fixed)]
    return list(range(n_concepts + 1, 2 * n_concepts + 2))


@torch.no_grad()
def head_mean_probabilities(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """q, k: (n, heads * d) of one row -> (n, n) softmax(q k^T / sqrt(d)) averaged over heads, in
    float32 on their device, one head at a time (at SDXL 1024 px n = 4096)."""
    n, inner = q.shape
    d = inner // heads
    qh = q.detach().float().view(n, heads, d).transpose(0, 1)
    kh = k.detach().float().view(k.shape[0], heads, d).transpose(0, 1)
    total = torch.zeros((n, k.shape[0]), dtype=torch.float32, device=q.device)
    for h in range(heads):
        total += (qh[h] @ kh[h].T * d ** -0.5).softmax(-1)
    return total / heads


@torch.no_grad()
def segments(probabilities: torch.Tensor, grid: tuple[int, int], ks: list[int]) -> torch.Tensor:
    """(n, n) probabilities at a grid of n = h * w cells -> (S, h, w) bool: every non-empty
    segment of k-means with each k in ks, pooled."""
    found = []
    for k in ks:
        labels = kmeans(probabilities, k).view(grid).cpu()
        found.extend(labels == j for j in range(int(labels.max()) + 1))
    found = [s for s in found if s.any()]
    return torch.stack(found)


def best_segment(candidates: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The segment of (S, h, w) with the highest IoU with the (h, w) bool mask (first on ties)."""
    inter = (candidates & mask).flatten(1).sum(1).float()
    union = (candidates | mask).flatten(1).sum(1).float().clamp_min(1)
    return candidates[int((inter / union).argmax())]


def refine_image(base: torch.Tensor, branches: list[torch.Tensor], old: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One image. base: (S, h, w) segments of the base branch; branches[i]: those of concept i's
    branch; old: (N, h, w) bool current masks. -> (new (N, h, w) bool, overlap (h, w) bool): each
    concept's best base segment united with its best own segment; at overlap cells (two or
    more new masks) every concept keeps its old mask. A concept with an empty mask keeps it."""
    union = torch.zeros_like(old)
    for i, own in enumerate(branches):
        if old[i].any():
            union[i] = best_segment(base, old[i]) | best_segment(own, old[i])
        else:
            union[i] = old[i]
    overlap = union.sum(0) > 1
    return torch.where(overlap, old, union), overlap


def at_grid(masks: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(N, H, W) coverages in [0, 1] -> (N, h, w) bool: cells the mask covers more than half of;
    a mask that covers no cell so takes every cell it touches."""
    pooled = F.adaptive_avg_pool2d(masks.float()[None], grid)[0]
    binary = pooled > 0.5
    for i in range(binary.shape[0]):
        if not binary[i].any():
            binary[i] = pooled[i] > 0
    return binary


def apply(old: torch.Tensor, new: torch.Tensor, overlap: torch.Tensor) -> torch.Tensor:
    """Back at the old masks' resolution: old (N, H, W) coverages, new (N, h, w) and overlap
    (h, w) at the grid -> (N, H, W): the new masks (nearest), the old ones, pixel for pixel, at
    the overlap cells."""
    size = tuple(old.shape[-2:])
    up = F.interpolate(new.float()[None], size=size, mode="nearest")[0]
    keep = F.interpolate(overlap.float()[None, None], size=size, mode="nearest")[0, 0] > 0.5
    return torch.where(keep, old.float(), up)


def own_masks(plan, image: int, hw: tuple[int, int]) -> torch.Tensor:
    """(N, h, w) every concept's own mask (before front-to-back compositing) for this image, as
    coverages at hw: the refined ones once set, else found (automatic) or drawn."""
    if plan.concept_masks is not None:
        masks = plan.concept_masks[min(image, len(plan.concept_masks) - 1)]
        return F.adaptive_avg_pool2d(masks.float()[None], hw)[0]
    auto = {index: slot for slot, index in enumerate(plan.auto_concepts)}
    out = []
    for index, concept in enumerate(plan.concepts):
        if index in auto and plan.found_masks is not None:
            mask = plan.found_masks[min(image, len(plan.found_masks) - 1), auto[index]]
        elif concept.mask is not None:
            mask = concept.mask
        else:
            mask = torch.ones(hw)
        out.append(F.adaptive_avg_pool2d(mask.float()[None, None], hw)[0, 0])
    return torch.stack(out)
