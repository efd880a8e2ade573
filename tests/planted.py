"""Cross-attention planted in the real ldm CrossAttention modules, so that chosen tokens dominate
chosen latent cells in every cross-attention layer through ldm's own forward: for each planted
token its key is set to a direction u and the queries of its cells get a large multiple of u."""

import torch
from torch import nn

LATENT = (16, 16)


class PlantedKey(nn.Module):
    def __init__(self, inner: nn.Linear, tokens: list[int], directions: torch.Tensor):
        super().__init__()
        self.inner, self.tokens, self.directions = inner, tokens, directions

    def forward(self, context):
        k = self.inner(context).clone()
        if context.shape[1] > max(self.tokens):
            for token, u in zip(self.tokens, self.directions):
                k[:, token] = u
        return k


class PlantedQuery(nn.Module):
    """Adds strength * u_j to the queries of the cells where token j is planted, per image."""

    def __init__(self, inner: nn.Linear, cells_per_image: list[list[torch.Tensor]], directions, strength=60.0):
        super().__init__()
        self.inner, self.cells, self.directions, self.strength = inner, cells_per_image, directions, strength

    def forward(self, x):
        q = self.inner(x)
        n = x.shape[1]
        h, w = self.cells[0][0].shape   # the latent the cells are drawn on
        if n not in {-(-h // 2 ** level) * -(-w // 2 ** level) for level in range(4)}:
            return q   # a regional branch's gathered tokens: no grid to plant on
        side = int(round(n ** 0.5))   # square latents in these tests
        for row in range(q.shape[0]):
            image = row % len(self.cells)   # cond and uncond rows of image b
            for cells, u in zip(self.cells[image], self.directions):
                # a coarse cell attends to the token when the subject fills most of it
                grid = torch.nn.functional.adaptive_avg_pool2d(cells[None, None].float(), (side, side))[0, 0]
                q[row, grid.flatten() >= 0.5] += self.strength * u
        return q


def plant(unet, tokens, cells_per_image):
    """Plant token attention in every cross-attention layer (attn2 of each transformer block)."""
    modules = [m for name, m in unet.named_modules() if name.endswith("attn2")]
    for module in modules:
        inner = module.to_q.out_features
        directions = torch.nn.functional.normalize(
            torch.randn(len(tokens), inner, generator=torch.Generator().manual_seed(7)), dim=-1)
        module.to_k = PlantedKey(module.to_k, tokens, directions)
        module.to_q = PlantedQuery(module.to_q, cells_per_image, directions)
    return unet


def cells(top, left, bottom, right):
    mask = torch.zeros(LATENT)
    mask[top:bottom, left:right] = 1
    return mask


def covers(found, planted):
    """Attention is coarse (the 4x4 and 8x8 layers see the subject in big cells): the mask must
    hold nearly all of the planted cells, and at least half of it must be planted cells."""
    found, planted = found > 0.5, planted > 0.5
    inside = float((found & planted).sum())
    return inside / float(planted.sum()) >= 0.85 and inside / float(found.sum()) >= 0.5
