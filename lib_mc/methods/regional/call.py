"""What the regional hooks need to know about the UNet call in flight: the region weights of
its rows at every resolution, each concept's context for its rows, and whose LoRA a layer
applies right now (`scope`)."""

from __future__ import annotations

import contextlib

import torch

from ...plan import Plan

NO_CONCEPT = -1
GATHER_BELOW = 0.5   # a region covering less than this share of the tokens is gathered


class RegionalCall:
    host_rows = True   # the rows are the host's own ([cond rows, uncond rows] of its call)

    def __init__(self, plan: Plan, images: list[int], contexts: list[torch.Tensor], *, isolate: bool,
                 capture=None):
        """images[r]: the batch image of row r; contexts[i]: concept i's context, (rows, L, D);
        capture: an enhancement `Capture` collecting attention maps (a gradient-enabled call)."""
        self.plan, self.images, self.contexts, self.isolate = plan, images, contexts, isolate
        self.capture = capture
        # image-token layers always add each concept's LoRA under its region weights; the text
        # layers (cross-attention to_k / to_v) add the LoRA of the branch in flight: NO_CONCEPT
        # for the main prompt, i while concept i's prompt is projected
        self.branch: int = NO_CONCEPT
        self.tokens: tuple[torch.Tensor, int] | None = None   # a branch's gathered token positions, of how many
        self._weights: dict[tuple, torch.Tensor] = {}
        self._labels: dict[tuple, torch.Tensor] = {}
        self._parts: dict[tuple, tuple | None] = {}
        self._gathers = self._gather_id = 0

    @property
    def rows(self) -> int:
        return len(self.images)

    @contextlib.contextmanager
    def scoped(self, branch: int, tokens: tuple[torch.Tensor, int] | None = None):
        """Concept `branch`'s LoRA on the text layers, and (tokens, n): the image-token layers see
        only those of n token positions."""
        before = self.branch, self.tokens, self._gather_id
        self.branch, self.tokens = branch, tokens
        if tokens is not None:   # a new gather: parts cached for it are its own (ids of freed tensors recur)
            self._gathers += 1
            self._gather_id = self._gathers
        try:
            yield
        finally:
            self.branch, self.tokens, self._gather_id = before

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
        return self.plan.regions.find_grid(n_tokens)

    def token_weights(self, n_tokens: int, like: torch.Tensor) -> torch.Tensor | None:
        """(n + 1, rows, n_tokens) for a flattened attention grid, None if no grid has that many
        tokens; inside a branch that gathered some positions, the weights of those."""
        positions = None
        if self.tokens is not None and n_tokens == self.tokens[0].numel():
            positions, n_tokens = self.tokens
        hw = self.grid_of(n_tokens)
        if hw is None:
            return None
        weights = self.weights_at(hw, like).flatten(2)
        return weights if positions is None else weights[:, :, positions.to(weights.device)]

    def region_part(self, concept: int, n_tokens: int, like: torch.Tensor):
        """Where concept's LoRA acts among n_tokens image tokens: None (nowhere), else (positions or
        None for all tokens, weights (rows, k, 1)). A small region is gathered, so its delta
        costs its area; a large one is computed everywhere and weighted (cheaper than gathering)."""
        key = (concept, n_tokens, self._gather_id if self.tokens is not None else None, like.device, like.dtype)
        if key not in self._parts:
            weights = self.token_weights(n_tokens, like)
            part = None
            if weights is not None:
                w = weights[concept + 1]
                inside = (w > 0).any(0)
                count = int(inside.sum())
                if count == w.shape[1] or count > GATHER_BELOW * w.shape[1]:
                    part = (None, w[..., None])
                elif count:
                    positions = inside.nonzero().flatten()
                    part = (positions, w[:, positions, None])
            self._parts[key] = part
        return self._parts[key]

    def rank_scale(self, key: tuple, slots: torch.Tensor, size, like: torch.Tensor) -> torch.Tensor | None:
        """The region weight of the concept each rank channel belongs to (slots: 1 + concept per
        channel), for a layer whose concepts' ranks are `key`: size n_tokens -> (rows, N, R) for
        a token layer (None if not image tokens); size (h, w) -> (rows, R, h * w) for a conv."""
        cache_key = ("rank", key, size, self._gather_id if self.tokens is not None else None, like.device, like.dtype)
        if cache_key not in self._parts:
            if isinstance(size, tuple):
                weights = self.weights_at(size, like).flatten(2)
                scale = weights[slots.to(weights.device)].transpose(0, 1).contiguous()
            else:
                weights = self.token_weights(size, like)
                scale = None if weights is None else weights[slots.to(weights.device)].permute(1, 2, 0).contiguous()
            self._parts[cache_key] = scale
        return self._parts[cache_key]

    def labels(self, n_tokens: int, device) -> torch.Tensor:
        """(rows, n_tokens) long: 0 background, i + 1 concept i, where the weight is largest."""
        key = (n_tokens, device)
        if key not in self._labels:
            weights = self.token_weights(n_tokens, torch.empty(0, device=device))
            self._labels[key] = weights.argmax(0)
        return self._labels[key]
