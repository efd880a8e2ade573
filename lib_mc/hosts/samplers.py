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


# samplers that evaluate the model twice per step (k-diffusion's second-order and midpoint ones)
TWO_EVALUATIONS = {"Heun", "DPM2", "DPM2 a", "DPM++ 2S a", "DPM++ SDE"}


def evaluations_per_step(name: str | None) -> int:
    """How many CFG evaluations the sampler makes per step: the engine counts evaluations, and a
    fraction of the steps (start_at, isolation_until) must mean the same for every sampler."""
    return 2 if (name or "").strip() in TWO_EVALUATIONS else 1


def check_sampler(name: str | None, mode: str = "blend") -> None:
    """Only the two-stage method needs the same model calls in both passes; one pass runs any sampler."""
    reason = REFUSED.get((name or "").strip()) if mode == "blend" else None
    if reason:
        raise JobError("sampler", f"{name} cannot be used with Multi-Concept: {reason}; pick another sampler "
                                  "(e.g. Euler a, DPM++ 2M, DPM++ SDE, DDIM)")
