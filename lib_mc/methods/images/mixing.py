"""Mask-guided mixing with a kept background (PnP-MIX): outside every region (the background's
weight w_0) the prediction is the kept background's, x0 = its latent, as A1111 keeps an
inpainting mask's outside; every sampler's last step lands on its x0, so the image ends exactly
on the background there. Inside, the method's own prediction stays."""

from __future__ import annotations

import torch


def out_for_x0(to_x0, x: torch.Tensor, sigma: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """The denoiser output whose x0 is `x0`. to_x0(x, out, sigma) is affine in out (x0 itself
    for k-diffusion denoisers, (x - beta * eps) / alpha for eps models): inverted row by row."""
    if to_x0 is None:
        return x0.to(x.dtype)
    zero = to_x0(x, torch.zeros_like(x), sigma)
    slope = to_x0(x, torch.ones_like(x), sigma) - zero
    return ((x0.to(x) - zero) / slope).to(x.dtype)


def background_rows(background: torch.Tensor, images) -> torch.Tensor:
    last = background.shape[0] - 1
    return torch.stack([background[min(b, last)] for b in images])


def background_prediction(plan, to_x0, x, sigma, images) -> torch.Tensor | None:
    """The prediction of the kept background for these rows (None: no background kept)."""
    if plan.background is None or not plan.options.keep_background or not len(images):
        return None
    return out_for_x0(to_x0, x, sigma, background_rows(plan.background, images).to(x.device))


def keep_outside(plan, to_x0, out: torch.Tensor, x, sigma, images) -> torch.Tensor:
    """out * (1 - w_0) + background * w_0 for a prediction whose own w_0 part is the base's."""
    target = background_prediction(plan, to_x0, x, sigma, images)
    if target is None:
        return out
    w0 = plan.weights_for(x, list(images))[0]
    return out * (1 - w0) + target * w0
