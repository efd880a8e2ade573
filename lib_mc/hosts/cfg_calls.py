"""Host-independent pieces of routing a WebUI's CFG denoiser calls into the engine."""

from __future__ import annotations

from typing import Callable

import torch

from ..engine import CallImages


class CondRows:
    """Which rows of each inner-model call are conditional, and of which image.

    A1111's CFG denoiser builds [cond rows, uncond rows] (one cond row per image: AND is refused)
    and calls its inner model with all of them at once or in row-ordered chunks (Batch
    cond/uncond off, a negative prompt of another chunk count than the prompt). `begin` at each
    CFG call with the batch size, `take` at each inner call with its row count."""

    def __init__(self):
        self.n_cond = self.offset = 0
        self.calls = 0

    def begin(self, n_cond: int) -> None:
        self.n_cond, self.offset = n_cond, 0
        self.calls += 1

    def take(self, rows: int) -> CallImages:
        start, end = self.offset, self.offset + rows
        self.offset = end
        cond = tuple(range(start, min(end, self.n_cond)))
        uncond = tuple(r - self.n_cond for r in range(max(start, self.n_cond), end))
        return CallImages(cond, uncond)


def unpack_cond(cond: dict) -> tuple[dict[str, torch.Tensor], Callable[[dict], dict]]:
    """A1111's condition dict ({"c_crossattn": [t], "c_concat": [t]} for SD1, {"crossattn": t,
    "vector": v, "c_concat": [t]} for SDXL) -> plain tensors, and the function that packs back."""
    listed = {key for key, value in cond.items() if isinstance(value, (list, tuple))}
    for key in listed:
        if len(cond[key]) != 1:
            raise ValueError(f"condition '{key}' holds {len(cond[key])} tensors; one is supported")
    plain = {key: (value[0] if key in listed else value) for key, value in cond.items()}

    def pack(tensors: dict) -> dict:
        return {key: ([value] if key in listed else value) for key, value in tensors.items()}
    return plain, pack


def context_key(cond: dict) -> str:
    return "crossattn" if "crossattn" in cond else "c_crossattn"
