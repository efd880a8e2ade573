"""Host-independent pieces of routing a WebUI's CFG denoiser calls into the engine."""

from __future__ import annotations

from typing import Callable

import torch


class CondRows:
    """Which rows of each inner-model call are conditional.

    A1111's CFG denoiser calls its inner model with [cond rows, uncond rows] in one batch, or in
    row-ordered chunks (low-VRAM options, prompts of different lengths). `begin` at each CFG call,
    `take` at each inner call."""

    def __init__(self):
        self.n_cond = self.offset = 0
        self.calls = 0

    def begin(self, n_cond: int) -> None:
        self.n_cond, self.offset = n_cond, 0
        self.calls += 1

    def take(self, rows: int) -> int:
        n = max(0, min(self.n_cond - self.offset, rows))
        self.offset += rows
        return n


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
