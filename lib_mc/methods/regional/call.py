"""What the regional hooks need to know about the UNet call in flight: the region weights of
its rows at every resolution, each concept's context for its rows, and whose LoRA a layer
applies right now (`scope`)."""

from __future__ import annotations

import contextlib

import torch

from ...plan import Plan

SPATIAL, NO_CONCEPT = None, -1


class RegionalCall:
    host_rows = True   # the rows are the host's own ([cond rows, uncond rows] of its call)

    def __init__(self, plan: Plan, images: list[int], contexts: list[torch.Tensor], *, isolate: bool,
                 capture=None):
        """images[r]: the batch image of row r; contexts[i]: concept i's context, (rows, L, D);
        capture: an enhancement `Capture` collecting attention maps (a gradient-enabled call)."""
        self.plan, self.images, self.contexts, self.isolate = plan, images, contexts, isolate
        self.capture = capture
        self.scope: int | None = SPATIAL   # SPATIAL: each concept's LoRA under its region weights;
        # NO_CONCEPT: no concept LoRA; i: concept i's LoRA on every input (its own cross-attention branch)
        self._weights: dict[tuple, torch.Tensor] = {}
        self._labels: dict[tuple, torch.Tensor] = {}

    @property
    def rows(self) -> int:
        return len(self.images)

    @contextlib.contextmanager
    def scoped(self, scope: int):
        before, self.scope = self.scope, scope
        try:
            yield
        finally:
            self.scope = before

    def _regions_of(self, image: int):
        plan = self.plan
        if plan.image_regions is None:
            return plan.regions
        return plan.image_regions[min(image, len(plan.image_regions) - 1)]

    def weights_at(self, hw: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
        """(n + 1, rows, h, w): background, then each concept, per row; sum 1 at every cell."""
        key = (tuple(hw), like.device, like.dtype)
        if key not in self._weights:
            per_row = torch.stack([self._regions_of(b).at_grid(hw) for b in self.images], 1)
            self._weights[key] = per_row.to(like.device, like.dtype)
        return self._weights[key]

    def grid_of(self, n_tokens: int) -> tuple[int, int] | None:
        for hw in self.plan.regions.grids:
            if hw[0] * hw[1] == n_tokens:
                return hw
        return None

    def token_weights(self, n_tokens: int, like: torch.Tensor) -> torch.Tensor | None:
        """(n + 1, rows, n_tokens) for a flattened attention grid, None if no grid has that many tokens."""
        hw = self.grid_of(n_tokens)
        return None if hw is None else self.weights_at(hw, like).flatten(2)

    def labels(self, n_tokens: int, device) -> torch.Tensor:
        """(rows, n_tokens) long: 0 background, i + 1 concept i, where the weight is largest."""
        key = (n_tokens, device)
        if key not in self._labels:
            weights = self.token_weights(n_tokens, torch.empty(0, device=device))
            self._labels[key] = weights.argmax(0)
        return self._labels[key]
