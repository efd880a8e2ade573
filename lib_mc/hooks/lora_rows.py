"""Linear/Conv forward that adds each concept's LoRA delta to that concept's rows only."""

from __future__ import annotations

import torch

from .state import RunState


def make_lora_forward(original, ops_by_concept: dict[int, list], run: RunState):
    # the ops follow the input's device and dtype: a host may move or cast the UNet after the
    # job was prepared (Forge loads it to the GPU for sampling, or computes in another dtype)
    placed: dict[tuple, dict[int, list]] = {}

    def ops_for(x):
        dtype = None if torch.is_autocast_enabled() else x.dtype   # under autocast, as the layer's own weight
        key = (x.device, dtype)
        if key not in placed:
            placed[key] = {c: [op.to(x.device, dtype) for op in ops] for c, ops in ops_by_concept.items()}
        return placed[key]

    def forward(x, *args, **kwargs):
        y = original(x, *args, **kwargs)
        call = run.call
        if call is None:
            return y
        for concept, ops in ops_for(x).items():
            rows = call.concept_rows.get(concept)
            if rows is None or rows.start == rows.stop:
                continue
            xs = x[rows]
            delta = ops[0](xs)
            for op in ops[1:]:
                delta = delta + op(xs)
            y[rows] += delta.to(y.dtype)
        return y
    return forward
