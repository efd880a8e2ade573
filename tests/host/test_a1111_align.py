"""Conductor mode's layout from a reference picture through the A1111 host glue
(lib_mc/hosts/webui.py, a1111.py), driven as test_a1111_flow.py drives it: the job's reference
PNG decoded, cropped to the generation's size and encoded by the host's VAE (ldm's real encoder
at a tiny width), the sampler's sigmas read, and the latents the engine moves written into the
sampler's own latent. Also the parts Forge uses (its DDIM's VP latent, the noise levels of
timestep samplers). The UNet, k-diffusion and the LoRA files are real."""

import base64
import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from k_diffusion import sampling
from ldm.modules.diffusionmodules.model import Encoder
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from modules import shared
from PIL import Image

import a1111like
from a1111like import A1111Sampler, processing
from lib_mc.hosts import a1111, webui
from lib_mc.reference import reference_pixels
from test_a1111_flow import IMAGE, drawn_plan, host_options, world  # noqa: F401
from test_a1111_regional import unpatched


class TinyFirstStage:
    """What A1111's LatentDiffusion does to encode a picture, with ldm's own VAE encoder at a
    tiny width: encode_first_stage -> the posterior, get_first_stage_encoding -> scale * z."""

    def __init__(self):
        torch.manual_seed(4)
        self.encoder = Encoder(double_z=True, z_channels=4, resolution=IMAGE[0], in_channels=3, out_ch=3, ch=32,
                               ch_mult=[1, 1, 1, 1], num_res_blocks=1, attn_resolutions=[], dropout=0.0).eval()
        self.quant_conv = torch.nn.Conv2d(8, 8, 1)
        self.encoded: list[torch.Tensor] = []

    def encode_first_stage(self, pixels):
        self.encoded.append(pixels)
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(pixels)))

    def get_first_stage_encoding(self, z):
        return 0.18215 * z


def png(width=200, height=100) -> str:
    """Red left half, blue right half, a green square in the middle."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, : width // 2] = (255, 0, 0)
    pixels[:, width // 2:] = (0, 0, 255)
    pixels[height // 2 - 10:height // 2 + 10, width // 2 - 10:width // 2 + 10] = (0, 255, 0)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def generate(world, reference, first_stage, steps=6, batch=2):
    """One conductor txt2img batch through process_before_every_sampling and sampler.sample."""
    shared.opts.batch_cond_uncond = True
    p = processing(*IMAGE[::-1], steps=steps, batch=batch, seed=3)
    p.sd_model = SimpleNamespace(model=SimpleNamespace(diffusion_model=world["unet"]), is_sdxl=False,
                                 encode_first_stage=first_stage.encode_first_stage,
                                 get_first_stage_encoding=first_stage.get_first_stage_encoding)
    p.sampler = A1111Sampler("Euler", world["ldm"], shared.opts)
    state = webui.JobState(job=SimpleNamespace(save_layout=False, mode="conductor", reference=reference))
    state.prepared = SimpleNamespace(plan=drawn_plan(world, start_at=0.0, mask_refine=False), warnings=[])
    p._multi_concept = state
    a1111.process_before_every_sampling(p)
    initial = p.rng.next()
    out = p.sampler.sample(p, initial, world["cond"].expand(batch, -1, -1), world["uncond"].expand(batch, -1, -1))
    return out, p, state, initial


@pytest.fixture
def euler_seen(monkeypatch):
    """k-diffusion's Euler, keeping the latent it continues from after each model call."""
    seen = []

    def euler(model, x, sigmas, **kwargs):
        def watched(x_, sigma, **extra):
            out = model(x_, sigma, **extra)
            seen.append(x_.clone())
            return out
        return sampling.sample_euler(watched, x, sigmas, **kwargs)
    monkeypatch.setitem(a1111like.SAMPLERS, "Euler", (euler, False, False, False))
    return seen


def test_the_reference_is_encoded_by_the_hosts_vae_and_moves_the_samplers_latent(world, euler_seen):
    first_stage = TinyFirstStage()
    inputs = []
    handle = world["unet"].register_forward_pre_hook(
        lambda m, args, kwargs: inputs.append((args[0] if args else kwargs["x"]).detach().clone()), with_kwargs=True)
    try:
        out, p, state, initial = generate(world, png(), first_stage)
    finally:
        handle.remove()
    unpatched(world, p.sampler)
    assert torch.isfinite(out).all()
    # the VAE saw the picture at the generation's size, and its posterior's mode is the reference
    (pixels,) = first_stage.encoded
    torch.testing.assert_close(pixels, reference_pixels(png(), IMAGE))
    with torch.no_grad():
        expected = 0.18215 * first_stage.encode_first_stage(pixels).mode()
    assert state.reference[0] == IMAGE and torch.equal(state.reference[1], expected)
    session = state.session
    assert session.stats.invert_rows == 2 * (6 + 1) and session.stats.align_rows == 2 * 2 * 3   # 2 steps, 3 branches
    # the first step: the sampler continues from the moved latent, the one the base rows were evaluated on
    sigma0 = float(p.sampler.get_sigmas(p, 6)[0])
    moved = euler_seen[0]
    assert (moved - initial * sigma0).abs().max() > 1e-3
    conducted = [x for x in inputs if x.shape[0] == 2 * 2 * 3][0]   # base, alice, bob: [cond, uncond] x 2 images
    torch.testing.assert_close(conducted[:2], moved / (sigma0 ** 2 + 1) ** 0.5, rtol=1e-5, atol=1e-6)
    assert not state.moves.pending


def test_without_a_reference_nothing_is_encoded_and_the_image_is_the_same(world):
    first_stage = TinyFirstStage()
    out, p, state, _ = generate(world, "", first_stage)
    assert not first_stage.encoded and state.reference is None
    assert state.session.stats.invert_rows == state.session.stats.align_rows == 0
    with_picture, _, _, _ = generate(world, png(), TinyFirstStage())
    assert not torch.allclose(out, with_picture, atol=1e-3)
    unpatched(world, p.sampler)


def test_a_vae_that_returns_the_latent_itself_is_taken_as_it_is():
    """Forge's and sgm's (SDXL) encode_first_stage return the scaled latent as a tensor and
    get_first_stage_encoding is the identity; a tensor's .mode() is torch.mode, not a posterior."""
    first_stage = TinyFirstStage()
    scaled = lambda pixels: first_stage.get_first_stage_encoding(   # noqa: E731
        TinyFirstStage.encode_first_stage(first_stage, pixels).mode())
    p = SimpleNamespace(width=IMAGE[1], height=IMAGE[0],
                        sd_model=SimpleNamespace(encode_first_stage=scaled, get_first_stage_encoding=lambda z: z))
    state = webui.JobState(job=SimpleNamespace(mode="conductor", reference=png()))
    latent = webui.reference_latent(p, state)
    with torch.no_grad():
        expected = scaled(reference_pixels(png(), IMAGE))
    assert latent.shape == (1, 4, IMAGE[0] // 8, IMAGE[1] // 8) and torch.equal(latent, expected)


def test_reference_pixels_are_cropped_not_stretched_and_transparency_is_white():
    pixels = reference_pixels(png(200, 100), (64, 64))   # 2:1 scaled to cover 64 x 64: the middle 100 x 100
    assert pixels.shape == (1, 3, 64, 64) and pixels.min() >= -1 and pixels.max() <= 1
    red, blue = pixels[0, :, 32, 2], pixels[0, :, 32, 61]
    assert red[0] > 0.9 and red[2] < -0.9 and blue[2] > 0.9 and blue[0] < -0.9
    assert pixels[0, 1, 32, 32] > 0.9   # the green square is in the middle, 20 / 100 of the side
    green = (pixels[0, 1] > 0.5) & (pixels[0, 0] < 0)
    assert 9 <= int(green[32].sum()) <= 16
    clear = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    buffer = io.BytesIO()
    clear.save(buffer, format="PNG")
    white = reference_pixels(base64.b64encode(buffer.getvalue()).decode(), (16, 16))
    assert torch.allclose(white, torch.ones_like(white))


def test_timestep_samplers_noise_levels():
    """A1111's DDIM / PLMS / UniPC call with timesteps of a VP latent; Forge's (classic eps
    estimation) call the UNet with the timesteps' sigmas."""
    alphas = torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2, 0)
    timesteps = torch.tensor([1, 251, 501, 751])

    class CompVis:
        def __init__(self, classic):
            self.model_wrap_cfg = SimpleNamespace(classic_ddim_eps_estimation=classic)

        def get_timesteps(self, p, steps):
            return timesteps
    p = SimpleNamespace(steps=4, sd_model=SimpleNamespace(alphas_cumprod=alphas.float()))
    p.sampler = CompVis(False)
    vp = webui.sampler_schedule(p)
    assert vp.alphas_cumprod is not None and sorted(vp.levels.tolist()) == timesteps.tolist()
    alpha, beta = vp.coefficients(501)
    assert abs(alpha ** 2 - float(alphas[501])) < 1e-6 and abs(alpha ** 2 + beta ** 2 - 1) < 1e-9
    p.sampler = CompVis(True)
    forge = webui.sampler_schedule(p)
    assert forge.alphas_cumprod is None
    assert torch.allclose(forge.levels, ((1 - alphas) / alphas).sqrt()[timesteps].float().double(), rtol=1e-5)


def test_forges_ddim_gets_its_moved_vp_latent_and_the_moved_latents_eps():
    """Forge's DDIM hands the CFG denoiser a VP latent and returns eps from x * sqrt(1 + s^2),
    while the engine moved that scaled latent: after the write-back, DDIM's own x0 from the
    sampler's latent and the returned eps is the x0 the denoiser predicted for the moved latent."""
    alphas = torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2, 0)
    t = 501
    a = alphas[t]
    s = ((1 - a) / a).sqrt()
    gen = torch.Generator().manual_seed(0)
    x_vp = torch.randn((2, 4, 8, 8), generator=gen)                  # the sampler's latent
    x_ve = x_vp * (1 + s ** 2).sqrt()                                  # what the UNet calls saw
    moved = x_ve[1] + 0.3 * torch.randn((4, 8, 8), generator=gen)    # the engine moved image 1
    x0 = torch.randn((2, 4, 8, 8), generator=gen)                     # the denoiser's x0 (for the moved latent)
    eps = (x_ve - x0) / s                                             # what Forge's CFG forward returns
    cfg = SimpleNamespace(classic_ddim_eps_estimation=True,
                          inner_model=SimpleNamespace(inner_model=SimpleNamespace(alphas_cumprod=alphas)))
    moves = webui.LatentMoves()
    moves.add({1: moved})
    out = moves.apply(cfg, x_vp, torch.full((2,), float(t)), eps.clone())
    ddim_x0 = (x_vp - (1 - a).sqrt() * out) / a.sqrt()
    torch.testing.assert_close(ddim_x0, x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x_vp[1] * (1 + s ** 2).sqrt(), moved, rtol=1e-5, atol=1e-5)
    assert not moves.pending


def test_forges_cfg_denoiser_is_wrapped_only_with_a_reference():
    class CFGDenoiser:
        def forward(self, x, sigma, *args, **kwargs):
            return x + 1

    cfg = CFGDenoiser()
    state = webui.JobState(job=SimpleNamespace(mode="conductor", reference=""))
    assert webui.moves_routing(cfg, state) is None
    state.job.reference = png()
    x = torch.zeros((2, 4, 2, 2))
    with webui.moves_routing(cfg, state):
        state.moves.add({1: torch.full((4, 2, 2), 5.0)})
        out = cfg.forward(x, torch.ones(2))
    assert torch.equal(out, torch.ones_like(out)) and (x[1] == 5).all() and (x[0] == 0).all()
    assert "forward" not in vars(cfg)
