"""Which of the WebUIs' samplers the two passes can run with.

Stage 2 must make the same model evaluations as stage 1 (it replays stage 1's predictions before
the start step and its layout rows after it), so a sampler qualifies when its number of model
calls is fixed by the step count: every sampler of A1111 v1.10 and Forge but the one whose error
control picks its own steps. Checked before the layout pass, so nothing is spent on a job that
cannot finish."""

from __future__ import annotations

from ..job import JobError

# name as the WebUI lists it -> why it cannot be used
REFUSED = {
    "DPM adaptive": "its error control chooses the number of model calls from the image itself, so the "
                    "second pass cannot follow the first",
}


def check_sampler(name: str | None) -> None:
    reason = REFUSED.get((name or "").strip())
    if reason:
        raise JobError("sampler", f"{name} cannot be used with Multi-Concept: {reason}; pick another sampler "
                                  "(e.g. Euler a, DPM++ 2M, DPM++ SDE, DDIM)")
