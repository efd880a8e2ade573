"""What the conductor hooks need to know about the UNet call in flight: the branch rows (base,
each concept), the region weights of the base rows at every attention grid, and the concepts'
decoder attention outputs kept from earlier calls of the same host call (when the host's row
cap splits the branches into several calls, the base rows come last)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...hooks.state import CallState
from ...plan import Plan


@dataclass
class ConductorCall(CallState):
    plan: Plan | None = None
    images: list[int] = field(default_factory=list)   # the batch image of each base row
    stored: dict = field(default_factory=dict)          # layer -> concept -> its output rows (earlier calls)
    captures: dict = field(default_factory=dict)        # what refinement or alignment asked this call to keep

    def grid_of(self, n_tokens: int) -> tuple[int, int] | None:
        return self.plan.regions.find_grid(n_tokens)

    def base_weights(self, n_tokens: int, like: torch.Tensor) -> torch.Tensor | None:
        """(n + 1, base rows, n_tokens, 1): background then each concept, front-to-back
        composited (sum 1), at this grid; None where no grid has n_tokens tokens."""
        key = ("weights", n_tokens, like.device, like.dtype)
        if key not in self.captures:
            hw = self.grid_of(n_tokens)
            if hw is None:
                self.captures[key] = None
            else:
                plan = self.plan
                per_image = plan.image_regions or [plan.regions]
                last = len(per_image) - 1
                stacked = torch.stack([per_image[min(b, last)].at_grid(hw) for b in self.images], 1)
                self.captures[key] = stacked.flatten(2)[..., None].to(like.device, like.dtype)
        return self.captures[key]
