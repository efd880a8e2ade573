"""Mask refinement during stage 2 (Concept Conductor): self-attention says which cells belong
together. K-means on one decoder layer's self-attention rows of the base branch gives segments;
each automatic concept takes the segment that best overlaps its current mask. Where two concepts
would take the same segment, both keep their old masks.
"""

from __future__ import annotations

import torch


def kmeans(features: torch.Tensor, k: int, iterations: int = 15, seed: int = 0) -> torch.Tensor:
    """features (n, d) -> labels (n,); k-means++ start from a fixed seed (deterministic)."""
    n = features.shape[0]
    k = min(k, n)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    centres = [features[int(torch.randint(n, (1,), generator=gen))]]
    for _ in range(1, k):
        dist = torch.cdist(features, torch.stack(centres)).amin(1) ** 2
        if float(dist.sum()) <= 0:   # fewer distinct rows than k: fewer segments
            break
        centres.append(features[int(torch.multinomial((dist / dist.sum()).cpu(), 1, generator=gen))])
    centres = torch.stack(centres)
    k = len(centres)
    for _ in range(iterations):
        labels = torch.cdist(features, centres).argmin(1)
        for j in range(k):
            chosen = labels == j
            if chosen.any():
                centres[j] = features[chosen].mean(0)
    return torch.cdist(features, centres).argmin(1)


def refine_masks(self_attention: torch.Tensor, masks: torch.Tensor, k: int) -> torch.Tensor:
    """self_attention (n, n) probabilities at a grid of n = h*w cells; masks (m, h, w) in {0, 1}
    at that grid. Returns new (m, h, w) masks."""
    m, h, w = masks.shape
    labels = kmeans(self_attention.float(), k).view(h, w)
    segments = torch.stack([(labels == j) for j in range(int(labels.max()) + 1)])   # (k, h, w)
    current = masks > 0.5
    inter = (segments[None] & current[:, None]).flatten(2).sum(-1).float()          # (m, k)
    union = (segments[None] | current[:, None]).flatten(2).sum(-1).float()
    best = (inter / union.clamp_min(1)).argmax(1)
    out = masks.clone().float()
    for i in range(m):
        contested = (best == best[i]).sum() > 1
        if not contested and inter[i, best[i]] > 0:
            out[i] = segments[best[i]].float()
    return out
