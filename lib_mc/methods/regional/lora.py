"""A layer's forward that adds each concept's LoRA delta only where its region is: weighted by
the region at the layer's resolution (convolutions and image-token layers; inside a
cross-attention branch, at the positions of the tokens it gathered). A text layer
(cross-attention to_k / to_v) adds the LoRA of the concept whose prompt it projects. The rows
are the host's own: no extra UNet rows, no weight merging."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...hooks.lora_rows import placed_ops
from ...lora.ops import ConvLowRank, LinearLowRank
from ...hooks.state import RunState
from .call import NO_CONCEPT, RegionalCall


def _delta(ops, x):
    delta = ops[0](x)
    for op in ops[1:]:
        delta = delta + op(x)
    return delta


class _Stacked:
    """Every concept's low-rank ops of one layer as one: downs stacked (R rank channels), ups
    side by side, and which concept each rank channel belongs to. The region weights scale the
    rank channels, so all concepts cost one down and one up projection over the layer's input
    (no gathering of tokens, no per-concept weighting of the full output)."""

    def __init__(self, ops: list[tuple[int, object]], conv: bool):
        self.conv = conv
        self.down = torch.cat([op.down for _, op in ops])
        self.up = torch.cat([op.up for _, op in ops], dim=1)
        self.slots = torch.cat([torch.full((op.down.shape[0],), concept + 1, dtype=torch.long) for concept, op in ops])
        self.key = tuple((concept, op.down.shape[0]) for concept, op in ops)
        if conv:
            first = ops[0][1]
            self.stride, self.padding, self.dilation = first.stride, first.padding, first.dilation
            self.pointwise = self.down.shape[2:] == (1, 1) and tuple(self.stride) == (1, 1)

    @staticmethod
    def of(placed: dict[int, list]) -> "_Stacked | None":
        ops = [(concept, op) for concept, concept_ops in placed.items() for op in concept_ops]
        if all(isinstance(op, LinearLowRank) for _, op in ops):
            return _Stacked(ops, conv=False)
        if all(isinstance(op, ConvLowRank) and op.mid is None for _, op in ops) and \
                len({(op.down.shape[2:], op.stride, op.padding, op.dilation) for _, op in ops}) == 1:
            return _Stacked(ops, conv=True)
        return None

    def __call__(self, x: torch.Tensor, call: RegionalCall, like: torch.Tensor) -> torch.Tensor | None:
        if not self.conv:
            scale = call.rank_scale(self.key, self.slots, x.shape[1], like)   # (rows, N, R)
            return None if scale is None else F.linear(F.linear(x, self.down) * scale, self.up)
        if self.pointwise:   # 1x1 (SD1.5's proj_in / proj_out): matmuls, not the slow small-conv path
            b, c, h, w = x.shape
            low = torch.matmul(self.down.flatten(1), x.reshape(b, c, h * w))
        else:
            low = F.conv2d(x, self.down, None, self.stride, self.padding, self.dilation)
            b, _, h, w = low.shape
            low = low.flatten(2)
        scale = call.rank_scale(self.key, self.slots, (h, w), like)   # (rows, R, h * w)
        return torch.matmul(self.up.flatten(1), low * scale).view(b, -1, h, w)


def make_regional_lora_forward(original, ops_by_concept: dict[int, list], run: RunState, *, context_layer: bool):
    """context_layer: the layer projects a text context (cross-attention to_k / to_v): it has no
    region; a concept's LoRA acts on it only in that concept's branch."""
    ops_for = placed_ops(ops_by_concept)
    stacks: dict[tuple, _Stacked | None] = {}

    def stacked_for(x):
        key = (x.device, x.dtype, torch.is_inference_mode_enabled())
        if key not in stacks:
            stacks[key] = _Stacked.of(ops_for(x))
        return stacks[key]

    def forward(x, *args, **kwargs):
        y = original(x, *args, **kwargs)
        call: RegionalCall | None = run.call
        if call is None or x.shape[0] != call.rows:
            return y
        if context_layer:
            if call.branch != NO_CONCEPT and call.branch in ops_by_concept:
                y = y + _delta(ops_for(x)[call.branch], x).to(y.dtype)
            return y
        if x.dim() == 3:
            stacked = stacked_for(x)
            if stacked is not None:   # kohya LoRA / LoCon linear layers: one pair of matmuls
                delta = stacked(x, call, y)
                return y if delta is None else y + delta.to(y.dtype)
            for concept, ops in ops_for(x).items():
                part = call.region_part(concept, x.shape[1], y)
                if part is None:
                    continue   # no region at this layer (or not image tokens)
                positions, w = part
                if positions is None:
                    y = y + w * _delta(ops, x).to(y.dtype)
                else:   # only the region's tokens: the delta costs its area
                    y[:, positions] += w * _delta(ops, x[:, positions]).to(y.dtype)
            return y
        if x.dim() != 4:
            return y   # no spatial extent (time embedding): a region cannot apply
        stacked = stacked_for(x)
        if stacked is not None:   # LoCon convs, proj_in / proj_out
            return y + stacked(x, call, y).to(y.dtype)
        # at the output's size: a stride-2 conv halves it
        weights = call.weights_at(tuple(y.shape[-2:]), y)[:, :, None]            # (n+1, rows, 1, h, w)
        for concept, ops in ops_for(x).items():
            w = weights[concept + 1]
            if w.any():
                y = y + w * _delta(ops, x).to(y.dtype)
        return y
    return forward
