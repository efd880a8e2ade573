"""IP-Adapter's Resampler (tencent-ailab/IP-Adapter resampler.py, as InstantID ships it): a
perceiver that turns one 512-d ArcFace embedding into 16 context tokens. Module names match the
official state dict ("latents", "proj_in", "layers.i.0.to_kv", "layers.i.1.1", ...) so it loads
as is; the sizes are read from that state dict (InstantID: dim 1280, depth 4, 20 heads of 64)."""

from __future__ import annotations

import math

import torch
from torch import nn

DIM_HEAD = 64   # every published Resampler uses 64-wide heads; the state dict cannot tell


def feed_forward(dim: int, inner: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(),
                         nn.Linear(inner, dim, bias=False))


class PerceiverAttention(nn.Module):
    def __init__(self, dim: int, dim_head: int, heads: int):
        super().__init__()
        self.dim_head, self.heads = dim_head, heads
        inner = dim_head * heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x, latents = self.norm1(x), self.norm2(latents)
        b, n, _ = latents.shape
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat((x, latents), dim=-2)).chunk(2, dim=-1)
        q, k, v = (t.view(b, -1, self.heads, self.dim_head).transpose(1, 2) for t in (q, k, v))
        # the official scaling: both sides by dim_head^-1/4 and a float softmax (stable in fp16)
        scale = 1 / math.sqrt(math.sqrt(self.dim_head))
        weight = (q * scale) @ (k * scale).transpose(-2, -1)
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        return self.to_out((weight @ v).transpose(1, 2).reshape(b, n, -1))


class Resampler(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, num_queries: int, embedding_dim: int,
                 output_dim: int, ff_inner: int, dim_head: int = DIM_HEAD):
        super().__init__()
        self.embedding_dim, self.output_dim = embedding_dim, output_dim
        self.latents = nn.Parameter(torch.zeros(1, num_queries, dim))
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(nn.ModuleList([PerceiverAttention(dim, dim_head, heads), feed_forward(dim, ff_inner)])
                                    for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        latents = self.latents.repeat(x.size(0), 1, 1)
        x = self.proj_in(x)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


def resampler_from_state_dict(state: dict[str, torch.Tensor]) -> Resampler:
    """Builds and loads the Resampler the tensors describe; KeyError/ValueError when they are
    not one (the caller names the file)."""
    _, queries, dim = state["latents"].shape
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("layers."))
    inner = state["layers.0.0.to_q.weight"].shape[0]
    if inner % DIM_HEAD:
        raise ValueError(f"attention width {inner} is not a multiple of {DIM_HEAD}-wide heads")
    model = Resampler(dim=dim, depth=depth, heads=inner // DIM_HEAD, num_queries=queries,
                      embedding_dim=state["proj_in.weight"].shape[1], output_dim=state["proj_out.weight"].shape[0],
                      ff_inner=state["layers.0.1.1.weight"].shape[0])
    model.load_state_dict(state)   # strict: a missing or misshapen tensor raises here
    return model.eval()
