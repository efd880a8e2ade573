"""Stage-1 cross-attention of chosen tokens, summed over layers and steps (no extra model).

During the layout pass a recorder sits on every attention module (on Forge: in the attention
replace patch): after the host's own attention it recomputes softmax(q k^T) for the conditional
rows of cross-attention calls and adds the probabilities of the watched tokens, averaged over
heads, to a map per grid size. Only steps in the recording window count (later steps place
subjects more precisely).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .masks import stretch


class AttentionRecorder:
    def __init__(self, tokens: list[list[int]], per_image: list[list[list[int]]] | None = None):
        """tokens[c]: context positions of watched concept c; per_image[b][c]: the same for image b
        when a batch's prompts differ (wildcards, Dynamic Prompts), else every image uses tokens."""
        self.tokens = tokens
        self.per_image = per_image
        self.flat = sorted({t for group in tokens for t in group})
        self.active = False
        self.images: tuple[int, ...] = ()     # the image of each cond row of the call in flight (none: no cond rows)
        # n_query_tokens -> image -> (n_flat, n) summed probabilities, and how many were summed: per
        # image, so calls that split the batch (or hold no cond rows at all) add up the same
        self.sums: dict[int, dict[int, torch.Tensor]] = {}
        self.counts: dict[int, dict[int, int]] = {}

    def tokens_of(self, image: int) -> list[list[int]]:
        if self.per_image is None:
            return self.tokens
        return self.per_image[min(image, len(self.per_image) - 1)]

    def flat_of(self, image: int) -> list[int]:
        return self.flat if self.per_image is None else sorted({t for g in self.tokens_of(image) for t in g})

    def wants(self, context_tokens: int) -> bool:
        if not (self.active and self.images):
            return False
        last = max((max(self.flat_of(b), default=-1) for b in self.images), default=-1)
        return last >= 0 and context_tokens > last

    def make_forward(self, module, original):
        """A forward for an ldm attention module instance (A1111)."""
        def forward(x, context=None, mask=None, **kwargs):
            out = original(x, context=context, mask=mask, **kwargs)
            if context is not None and self.wants(context.shape[1]):
                n = len(self.images)
                with torch.no_grad():
                    self.record(module.to_q(x[:n]), module.to_k(context[:n]), module.heads)
            return out
        return forward

    @torch.no_grad()
    def record(self, q: torch.Tensor, k: torch.Tensor, heads: int) -> None:
        """Projected q (b, n, inner) and k (b, T, inner) of the conditional rows of a cross-attention."""
        b, n, inner = q.shape
        q = q.reshape(b, n, heads, inner // heads).transpose(1, 2).float()
        k = k.reshape(b, -1, heads, inner // heads).transpose(1, 2).float()
        probs = (q @ k.transpose(-1, -2) * (inner // heads) ** -0.5).softmax(-1)   # (b, h, n, T)
        sums, counts = self.sums.setdefault(n, {}), self.counts.setdefault(n, {})
        for row, image in enumerate(self.images[:b]):
            picked = probs[row][..., self.flat_of(image)].mean(0).transpose(0, 1).cpu()   # (n_flat, n)
            sums[image] = sums[image] + picked if image in sums else picked
            counts[image] = counts.get(image, 0) + 1

    def maps(self, latent_hw: tuple[int, int], grids: list[tuple[int, int]]) -> torch.Tensor:
        """(B, n_concepts, h, w) at latent size: each grid's mean map, scaled to a maximum of 1,
        upsampled and summed over the grids (coarse grids place the subject, fine ones its edges)."""
        by_tokens = {h * w: (h, w) for h, w in grids}
        images = sorted({b for by_image in self.sums.values() for b in by_image})
        if not images:
            raise RuntimeError("no cross-attention was recorded in the layout pass")
        if images != list(range(len(images))):
            raise RuntimeError(f"cross-attention was recorded for images {images} only")
        return torch.stack([self._image_maps(b, latent_hw, by_tokens) for b in images])

    def _image_maps(self, image: int, latent_hw, by_tokens) -> torch.Tensor:
        total = None
        for n, by_image in self.sums.items():
            hw = by_tokens.get(n)
            if hw is None or image not in by_image:
                continue
            grid = (by_image[image] / self.counts[n][image]).view(1, -1, *hw)
            grid = stretch(grid)   # each grid counts alike, whatever its attention's spread
            up = F.interpolate(grid, size=latent_hw, mode="bilinear", align_corners=False)
            total = up if total is None else total + up
        if total is None:
            raise RuntimeError("no cross-attention was recorded in the layout pass")
        total = stretch(total)[0]
        index = {t: i for i, t in enumerate(self.flat_of(image))}
        return torch.stack([total[[index[t] for t in group]].mean(0) if group else torch.zeros_like(total[0])
                            for group in self.tokens_of(image)])
