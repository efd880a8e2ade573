"""Concept enhancement (LoRA-Composer's attention constraints), off by default.

During the first steps a second, gradient-enabled forward of the cond rows collects, at the
latent/4 grid (the paper's resolution), each concept's class-word cross-attention over the whole
image and the self-attention maps; three losses (the paper's weights) say how far the layout is
from the regions:
- foreground: the class word's attention, smoothed and weighted by a Gaussian over the region's
  box, should reach 1 among its top 20% cells: 8 * max(0, 1 - mean of the top-k);
- fill: the attention's row and column maxima inside the box should cover the box: 2 * L1;
- leakage: region queries' self-attention mass on keys outside the region: 10 * mean of the top-k.
The gradient of their sum with respect to the latent is applied as guidance on the cond rows'
prediction, x0 -= lr * grad with the paper's step size 20 * sqrt(linspace(1, 0.5)), until the
loss rises after step 5 or half the steps are done. It costs a forward and a backward of the
cond rows per guided step and the backward's activations: an out-of-memory stops the job with
a message (the hooks come off in the session's `finally`)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ...errors import EngineError

WEIGHTS = dict(foreground=8.0, fill=2.0, leakage=10.0)
TOP_FRACTION = 0.2
UNTIL = 0.5            # the paper refines up to step 25 of 50
PATIENCE = 5           # ... and stops once the loss rises after step 5


def step_size(step: int, total_steps: int) -> float:
    total = max(1, total_steps)
    return 20.0 * math.sqrt(1.0 - 0.5 * min(step, total - 1) / max(1, total - 1))


class Capture:
    """What one gradient-enabled forward collects at the grid of `n_tokens` tokens."""

    def __init__(self, tokens: list[list[int] | None], n_tokens: int):
        self.tokens, self.n_tokens = tokens, n_tokens
        self.cross: list[torch.Tensor] = []    # (rows, n_concepts, N) per layer
        self.self_maps: list[torch.Tensor] = []   # (rows, N, N) per layer

    def wants(self, n: int) -> bool:
        return n == self.n_tokens

    @staticmethod
    def _probs(q, k, heads):
        b, n, inner = q.shape
        qh = q.view(b, n, heads, -1).transpose(1, 2)
        kh = k.view(b, k.shape[1], heads, -1).transpose(1, 2)
        return (qh @ kh.transpose(-1, -2) * qh.shape[-1] ** -0.5).softmax(-1).mean(1)   # (b, n, T)

    def add_cross(self, q: torch.Tensor, heads: int, keys: list[torch.Tensor | None]) -> None:
        maps = []
        for tokens, k in zip(self.tokens, keys):
            if tokens is None or k is None:
                maps.append(torch.zeros(q.shape[:2], device=q.device, dtype=torch.float32))
                continue
            maps.append(self._probs(q.float(), k.float(), heads)[..., tokens].mean(-1))
        self.cross.append(torch.stack(maps, 1))

    def add_self(self, q: torch.Tensor, k: torch.Tensor, heads: int) -> None:
        self.self_maps.append(self._probs(q.float(), k.float(), heads))


def _gaussian_blur(maps: torch.Tensor) -> torch.Tensor:
    xs = torch.arange(-1, 2, dtype=maps.dtype, device=maps.device)
    kernel = torch.exp(-0.5 * (xs / 0.5) ** 2)
    kernel = kernel / kernel.sum()
    kernel2d = (kernel[:, None] * kernel[None, :])[None, None]
    flat = maps.reshape(-1, 1, *maps.shape[-2:])
    return F.conv2d(F.pad(flat, (1, 1, 1, 1), mode="reflect"), kernel2d).reshape(maps.shape)


def _box_gaussian(box: torch.Tensor) -> torch.Tensor:
    """A 2-D Gaussian (sigma 1 on [-1, 1]) over the mask's bounding box, 0 outside."""
    out = torch.zeros_like(box)
    cells = box.nonzero()
    if cells.numel() == 0:
        return out
    (top, left), (bottom, right) = cells.min(0).values.tolist(), cells.max(0).values.tolist()
    ys = torch.linspace(-1, 1, bottom - top + 1, device=box.device)
    xs = torch.linspace(-1, 1, right - left + 1, device=box.device)
    out[top:bottom + 1, left:right + 1] = torch.exp(-0.5 * (ys[:, None] ** 2 + xs[None, :] ** 2))
    return out


def _top_mean(values: torch.Tensor, count: int) -> torch.Tensor:
    return values.flatten().topk(max(1, min(count, values.numel()))).values.mean()


def enhancement_loss(capture: Capture, regions: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """regions: (rows, n_concepts, h, w) 0/1 masks at the grid. -> the summed losses (a scalar)."""
    if not capture.cross:
        raise EngineError("concept enhancement: no cross-attention was captured at the latent/4 grid")
    h, w = grid
    cross = torch.stack(capture.cross).mean(0).view(*capture.cross[0].shape[:2], h, w)
    self_map = torch.stack(capture.self_maps).mean(0) if capture.self_maps else None
    total = cross.new_zeros(())
    for row in range(cross.shape[0]):
        for i, tokens in enumerate(capture.tokens):
            box = regions[row, i]
            if tokens is None or box.sum() == 0:
                continue
            area = int(box.sum())
            attention = cross[row, i] / cross[row, i].amax().clamp_min(1e-8)
            smooth = _gaussian_blur(attention)
            k = math.ceil(TOP_FRACTION * area)
            total = total + WEIGHTS["foreground"] * F.relu(1 - _top_mean(smooth * _box_gaussian(box), k))
            inside = attention * box
            total = total + WEIGHTS["fill"] * (F.l1_loss(inside.amax(0), box.amax(0)) +
                                               F.l1_loss(inside.amax(1), box.amax(1)))
            if self_map is not None:
                flat = box.flatten() > 0
                leak = self_map[row][flat][:, ~flat].sum(-1)
                if leak.numel():
                    total = total + WEIGHTS["leakage"] * F.relu(_top_mean(leak, k))
    return total


def out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, getattr(torch.cuda, "OutOfMemoryError", ())) or "out of memory" in str(exc).lower()
