"""The noise levels of one sampling run, in the units the host's denoiser is called with, and
deterministic (DDIM) moves between them. Methods that invert a picture or move the sampler's
latent need them; the host fills them in from its sampler.

Two parameterisations cover both WebUIs:
- sigmas (k-diffusion samplers, and every sampler in Forge, whose UNet calls always get sigmas):
  x = x0 + sigma * eps; the UNet sees x / sqrt(1 + sigma^2);
- timesteps of a VP latent (A1111's DDIM, PLMS, UniPC): x = sqrt(a_t) * x0 + sqrt(1 - a_t) * eps
  with a_t = alphas_cumprod[t]; the UNet sees x itself.
In both, x = alpha * x0 + beta * eps and the UNet's input is x / sqrt(alpha^2 + beta^2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class SamplerSchedule:
    levels: torch.Tensor                         # the sampler's levels, high to low, without the final 0
    alphas_cumprod: torch.Tensor | None = None   # given: levels are VP timesteps; None: k-diffusion sigmas

    def __post_init__(self):
        levels = torch.as_tensor(self.levels, dtype=torch.float64).flatten().cpu()
        self.levels = levels[levels > 0] if self.alphas_cumprod is None else levels
        if self.alphas_cumprod is not None:
            self.alphas_cumprod = torch.as_tensor(self.alphas_cumprod).detach().double().cpu()
        if not len(self.levels):
            raise ValueError("a sampler schedule needs at least one noise level")

    def coefficients(self, level: float) -> tuple[float, float]:
        """(alpha, beta) of x = alpha * x0 + beta * eps at this level."""
        level = float(level)
        if self.alphas_cumprod is None:
            return 1.0, level
        last = len(self.alphas_cumprod) - 1
        a = float(self.alphas_cumprod[min(last, max(0, int(level)))])   # as A1111's get_pred_x0 indexes
        return math.sqrt(a), math.sqrt(1.0 - a)

    def input_scale(self, level: float) -> float:
        """sqrt(alpha^2 + beta^2): the sampler's x is this times the UNet's (unit-variance) input."""
        alpha, beta = self.coefficients(level)
        return math.sqrt(alpha * alpha + beta * beta)

    def eps(self, x: torch.Tensor, x0: torch.Tensor, level: float) -> torch.Tensor:
        alpha, beta = self.coefficients(level)
        return (x - alpha * x0) / beta

    def at(self, x0: torch.Tensor, eps: torch.Tensor, level: float) -> torch.Tensor:
        """The latent at `level` with this x0 and noise direction (DDIM's deterministic move)."""
        alpha, beta = self.coefficients(level)
        return alpha * x0 + beta * eps

    def log_ratio(self, level: float) -> float:
        """log(beta / alpha): one scale for both kinds on which 'nearest level' is measured."""
        alpha, beta = self.coefficients(level)
        return math.log(max(beta, 1e-12) / max(alpha, 1e-12))

    def nearest(self, level: float, candidates) -> float:
        here = self.log_ratio(level)
        return min(candidates, key=lambda c: abs(self.log_ratio(c) - here))

    def ascending(self) -> list[float]:
        return sorted(float(v) for v in self.levels)
