"""Linear/Conv/norm forward that adds each concept's LoRA delta to that concept's rows only."""

from __future__ import annotations

import torch

from .state import RunState


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the layer computes in: autocast's for its device, else the input's. Never the
    weight's storage dtype (A1111's 'FP8 weight' stores float8 and computes in fp16)."""
    if x.device.type == "cuda" and torch.is_autocast_enabled():
        return torch.get_autocast_gpu_dtype()
    if x.device.type == "cpu" and torch.is_autocast_cpu_enabled():
        return torch.get_autocast_cpu_dtype()
    return x.dtype


def placed_ops(ops_by_concept: dict[int, list]):
    """`ops_for(x)`: each concept's ops on the input's device and compute dtype. A host may move
    or cast the UNet after the job was prepared (Forge loads it to the GPU for sampling, or
    computes in another dtype); each op keeps what it placed (dense and DoRA parts included)
    for the session."""
    placed: dict[tuple, dict[int, list]] = {}

    def ops_for(x):
        key = (x.device, compute_dtype(x), torch.is_inference_mode_enabled())
        if key not in placed:
            placed[key] = {c: [op.to(*key[:2]) for op in ops] for c, ops in ops_by_concept.items()}
        return placed[key]
    return ops_for


def make_lora_forward(original, ops_by_concept: dict[int, list], run: RunState):
    ops_for = placed_ops(ops_by_concept)

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
