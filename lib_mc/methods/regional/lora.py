"""A layer's forward that adds each concept's LoRA delta only where its region is: weighted by
the region at the layer's resolution (convolutions and image-token layers; inside a
cross-attention branch, at the positions of the tokens it gathered). A text layer
(cross-attention to_k / to_v) adds the LoRA of the concept whose prompt it projects. The rows
are the host's own: no extra UNet rows, no weight merging."""

from __future__ import annotations

from ...hooks.lora_rows import placed_ops
from ...hooks.state import RunState
from .call import NO_CONCEPT, RegionalCall


def _delta(ops, x):
    delta = ops[0](x)
    for op in ops[1:]:
        delta = delta + op(x)
    return delta


def make_regional_lora_forward(original, ops_by_concept: dict[int, list], run: RunState, *, context_layer: bool):
    """context_layer: the layer projects a text context (cross-attention to_k / to_v): it has no
    region; a concept's LoRA acts on it only in that concept's branch."""
    ops_for = placed_ops(ops_by_concept)

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
        # at the output's size: a stride-2 conv halves it
        weights = call.weights_at(tuple(y.shape[-2:]), y)[:, :, None]            # (n+1, rows, 1, h, w)
        for concept, ops in ops_for(x).items():
            w = weights[concept + 1]
            if w.any():
                y = y + w * _delta(ops, x).to(y.dtype)
        return y
    return forward
