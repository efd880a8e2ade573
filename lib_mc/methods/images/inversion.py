"""DDIM inversion of a clean latent up the sampler's own noise levels (schedule.py), shared by
conductor's layout alignment and by image concepts / the kept background.

From the clean latent to the lowest level with the noise the model predicts there; then at
every level the UNet is evaluated on the inverted latent and its noise moves it to the next
level. The latent at each level is the UNet's input there: sampling deterministically (Euler /
DDIM) down from the highest one retraces the path to the picture. steps + 1 evaluations."""

from __future__ import annotations

import hashlib
from typing import Callable

import torch

from ..schedule import SamplerSchedule

# evaluate(x, level, on_path) -> the denoiser's output on x at that level; on_path is False for
# the first evaluation (the clean latent, to find its noise), True for the inverted latents
Evaluate = Callable[[torch.Tensor, float, bool], torch.Tensor]
ToX0 = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]


def invert_levels(evaluate: Evaluate, x0: torch.Tensor, schedule: SamplerSchedule, to_x0: ToX0) -> dict[float, torch.Tensor]:
    """x0: (rows, C, h, w) clean latents -> {level: the inverted latents at that level}."""
    levels = schedule.ascending()
    out = evaluate(x0, levels[0], False)
    x = schedule.at(x0, schedule.eps(x0, to_x0(x0, out, levels[0]), levels[0]), levels[0])
    inverted = {}
    for i, level in enumerate(levels):
        inverted[level] = x
        out = evaluate(x, level, True)
        if i + 1 < len(levels):
            pred = to_x0(x, out, level)
            x = schedule.at(pred, schedule.eps(x, pred, level), levels[i + 1])
    return inverted


def at_level(inverted: dict[float, torch.Tensor], clean: torch.Tensor, schedule: SamplerSchedule,
             level: float) -> torch.Tensor:
    """The inverted latent at `level`: the nearest inverted one, moved to exactly this level
    along its own noise direction (second-order samplers call between the levels)."""
    nearest = schedule.nearest(level, inverted)
    z = inverted[nearest]
    if abs(float(nearest) - float(level)) < 1e-9:
        return z
    return schedule.at(clean, schedule.eps(z, clean.to(z), nearest), level)


def content_key(*tensors: torch.Tensor, extra: tuple = ()) -> str:
    """A hash of the tensors' values (the same picture and prompt: the same key)."""
    digest = hashlib.sha1()
    for tensor in tensors:
        t = tensor.detach().float().cpu().contiguous()
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.numpy().tobytes())
    digest.update(repr(extra).encode())
    return digest.hexdigest()


class InversionCache:
    """Inverted latents by content (picture, prompt, levels): a picture is inverted once per job,
    whatever the batches, images or concepts that use it."""

    def __init__(self):
        self.entries: dict[str, dict[float, torch.Tensor]] = {}

    def get(self, key: str) -> dict[float, torch.Tensor] | None:
        return self.entries.get(key)

    def put(self, key: str, inverted: dict[float, torch.Tensor]) -> None:
        self.entries[key] = inverted

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for levels in self.entries.values() for t in levels.values())
