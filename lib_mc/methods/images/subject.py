"""An image concept's subject found in its reference picture when no mask is given: the class
word's cross-attention (its positions in the concept's own prompt, `Concept.own_class_tokens`)
on the reference rows while they are inverted, averaged over heads, layers and levels, each
grid's map scaled to [0, 1] (its minimum to 0: the word's attention has a floor everywhere)
and summed at latent size; the subject is where the sum reaches half its maximum."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class SubjectAttention:
    def __init__(self, rows: dict[int, list[int]]):
        """rows: row of the inversion call -> the class word's positions in that row's prompt."""
        self.rows = rows
        self.sums: dict[tuple[int, int], torch.Tensor] = {}   # (row, query tokens) -> (tokens,) summed

    @torch.no_grad()
    def record(self, q: torch.Tensor, k: torch.Tensor, heads: int) -> None:
        """Projected q (rows, n, inner) and k (rows, T, inner) of one cross-attention of the call."""
        b, n, inner = q.shape
        d = inner // heads
        for row, tokens in self.rows.items():
            if row >= b or max(tokens) >= k.shape[1]:
                continue
            qh = q[row].reshape(n, heads, d).transpose(0, 1).float()
            kh = k[row].reshape(-1, heads, d).transpose(0, 1).float()
            probs = (qh @ kh.transpose(-1, -2) * d ** -0.5).softmax(-1)   # (heads, n, T)
            picked = probs[..., tokens].mean((0, 2)).cpu()
            key = (row, n)
            self.sums[key] = self.sums[key] + picked if key in self.sums else picked

    def mask(self, row: int, regions) -> torch.Tensor | None:
        """(h, w) at latent size: 1 on the subject of this row's picture (None: nothing recorded)."""
        total = None
        for (r, n), summed in self.sums.items():
            hw = regions.find_grid(n) if r == row else None
            if hw is None:
                continue
            grid = summed.reshape(hw)
            grid = (grid - grid.min()) / (grid.max() - grid.min()).clamp(min=1e-12)
            up = F.interpolate(grid[None, None], size=regions.latent_hw, mode="bilinear", align_corners=False)[0, 0]
            total = up if total is None else total + up
        if total is None:
            return None
        return (total >= 0.5 * total.max()).float()
