"""Linear/Conv forward that adds each concept's LoRA delta to that concept's rows only."""

from __future__ import annotations

from .state import RunState


def make_lora_forward(original, ops_by_concept: dict[int, list], run: RunState):
    def forward(x, *args, **kwargs):
        y = original(x, *args, **kwargs)
        call = run.call
        if call is None:
            return y
        for concept, ops in ops_by_concept.items():
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
