"""A1111 v1.10's sampling flow in miniature, for driving the host glue offline: a CFG denoiser
that calls its inner model the ways A1111's `CFGDenoiser.forward` does (one batch of [cond,
uncond]; row chunks with *Batch cond/uncond* off; separate cond and uncond calls when the
negative prompt has another number of 75-token chunks; cond only on the steps *Negative
Guidance minimum sigma* skips), and a sampler object shaped like A1111's KDiffusionSampler
(`sample(p, x, conditioning, unconditional_conditioning, ...)`, ancestral noise from `p.rng`,
Brownian-tree noise seeded from the image seeds, `sample_img2img` with img2img's step setup and
the inpainting mask applied after CFG as A1111's CFG denoiser does), and img2img's processing
(`img2img_processing`, `img2img_sample`). The UNet, k-diffusion's denoiser wrapper and sampling
functions are the real ones."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from k_diffusion import sampling
from k_diffusion.external import CompVisDenoiser


class A1111CFGDenoiser:
    def __init__(self, inner_model, opts):
        self.inner_model, self.opts = inner_model, opts
        self.step = 0
        self.total_steps = 0
        self.mask = self.nmask = self.init_latent = None   # img2img's inpainting mask (set per sampling)

    def __call__(self, x, sigma, **kwargs):
        return self.forward(x, sigma, **kwargs)

    def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond=0.0, image_cond=None):
        batch_size = x.shape[0]
        if image_cond is None:
            image_cond = x.new_zeros(batch_size, 5, 1, 1)
        x_in, sigma_in = torch.cat([x, x]), torch.cat([sigma, sigma])
        image_cond_in = torch.cat([image_cond, image_cond])
        tensor = cond

        def make(c, ic):
            return {"c_crossattn": [c], "c_concat": [ic]}

        skip_uncond = bool(self.step % 2 and s_min_uncond > 0 and sigma[0] < s_min_uncond)
        if skip_uncond:
            x_in, sigma_in = x_in[:-batch_size], sigma_in[:-batch_size]
        if tensor.shape[1] == uncond.shape[1] or skip_uncond:
            cond_in = tensor if skip_uncond else torch.cat([tensor, uncond])
            if self.opts.batch_cond_uncond:
                x_out = self.inner_model(x_in, sigma_in, cond=make(cond_in, image_cond_in[:x_in.shape[0]]))
            else:
                x_out = torch.zeros_like(x_in)
                for a in range(0, x_out.shape[0], batch_size):
                    b = a + batch_size
                    x_out[a:b] = self.inner_model(x_in[a:b], sigma_in[a:b], cond=make(cond_in[a:b], image_cond_in[a:b]))
        else:
            x_out = torch.zeros_like(x_in)
            chunk = batch_size * 2 if self.opts.batch_cond_uncond else batch_size
            for a in range(0, tensor.shape[0], chunk):
                b = min(a + chunk, tensor.shape[0])
                x_out[a:b] = self.inner_model(x_in[a:b], sigma_in[a:b], cond=make(tensor[a:b], image_cond_in[a:b]))
            if not skip_uncond:
                n = uncond.shape[0]
                x_out[-n:] = self.inner_model(x_in[-n:], sigma_in[-n:], cond=make(uncond, image_cond_in[-n:]))
        denoised_uncond = x_out[-batch_size:]
        scale = 1.0 if skip_uncond else cond_scale
        denoised = denoised_uncond + (x_out[:batch_size] - denoised_uncond) * scale
        if self.mask is not None:   # inpainting: outside the mask the prediction is the init latent (after CFG)
            denoised = denoised * self.nmask + self.init_latent * self.mask
        self.step += 1
        return denoised


class EpsInner:
    """DDIM/PLMS/UniPC's inner model: the UNet's eps at a timestep (A1111's CompVisTimestepsDenoiser)."""

    def __init__(self, denoiser: CompVisDenoiser):
        self.denoiser = denoiser

    def __call__(self, x, sigma, cond):
        return self.forward(x, sigma, cond=cond)

    def forward(self, x, sigma, cond):
        return self.denoiser.get_eps(x, self.denoiser.sigma_to_t(sigma), cond=cond)


def sample_lcm(model, x, sigmas, extra_args=None, disable=None, noise_sampler=None):
    """A1111's LCM sampler (sd_samplers_lcm.py): x0, then fresh noise for the next sigma."""
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        x = model(x, sigmas[i] * s_in, **extra_args)
        if sigmas[i + 1] > 0:
            x = x + sigmas[i + 1] * noise_sampler(sigmas[i], sigmas[i + 1])
    return x


def sample_ddim_eps(model, x, sigmas, extra_args=None, disable=None, noise_sampler=None):
    """DDIM (eta 0) over an eps model, in sigma form: the timesteps family's model calls."""
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        eps = model(x, sigmas[i] * s_in, **extra_args)
        x = x + eps * (sigmas[i + 1] - sigmas[i])
    return x


# name in the WebUI -> (function, takes ancestral noise, Brownian-tree noise, eps inner model)
SAMPLERS = {
    "Euler": (sampling.sample_euler, False, False, False),
    "Euler a": (sampling.sample_euler_ancestral, True, False, False),
    "LMS": (sampling.sample_lms, False, False, False),
    "Heun": (sampling.sample_heun, False, False, False),
    "DPM2": (sampling.sample_dpm_2, False, False, False),
    "DPM2 a": (sampling.sample_dpm_2_ancestral, True, False, False),
    "DPM++ 2S a": (sampling.sample_dpmpp_2s_ancestral, True, False, False),
    "DPM++ 2M": (sampling.sample_dpmpp_2m, False, False, False),
    "DPM++ SDE": (sampling.sample_dpmpp_sde, False, True, False),
    "DPM++ 2M SDE": (sampling.sample_dpmpp_2m_sde, False, True, False),
    "DPM++ 3M SDE": (sampling.sample_dpmpp_3m_sde, False, True, False),
    "LCM": (sample_lcm, True, False, False),
    "DDIM": (sample_ddim_eps, False, False, True),
}


# A1111's `second_order` samplers: its CFG denoiser's total_steps counts two evaluations per step
SECOND_ORDER = {"Heun", "DPM2", "DPM2 a", "DPM++ 2S a", "DPM++ SDE"}


class A1111Sampler:
    """Shaped like A1111's KDiffusionSampler: `model_wrap_cfg` (the CFG denoiser, whose
    `inner_model` the adapter routes) and `sample(p, x, ...)` with x the unit initial noise."""

    def __init__(self, name: str, ldm, opts):
        self.name = name
        self.func, self.ancestral, self.brownian, eps = SAMPLERS[name]
        denoiser = CompVisDenoiser(ldm)
        self.sigma_source = denoiser
        self.model_wrap_cfg = A1111CFGDenoiser(EpsInner(denoiser) if eps else denoiser, opts)

    def get_sigmas(self, p, steps):
        """As A1111's: the sigmas `sample` runs over (the glue reads them for layout alignment)."""
        return self.sigma_source.get_sigmas(steps)

    def sample(self, p, x, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        steps = steps or p.steps
        sigmas = self.get_sigmas(p, steps)
        return self._run(p, x * sigmas[0], sigmas, conditioning, unconditional_conditioning, image_conditioning)

    def sample_img2img(self, p, x, noise, conditioning, unconditional_conditioning, steps=None,
                       image_conditioning=None):
        """img2img and the hires fix's second pass: x (the init latent) noised to the sigma of
        the denoising strength, then the last t_enc + 1 steps of the schedule."""
        from modules import sd_samplers_common
        steps, t_enc = sd_samplers_common.setup_img2img_steps(p, steps)
        sigmas = self.get_sigmas(p, steps)[steps - t_enc - 1:]
        self.model_wrap_cfg.init_latent = x
        return self._run(p, x + noise * sigmas[0], sigmas, conditioning, unconditional_conditioning, image_conditioning)

    def _run(self, p, x, sigmas, conditioning, unconditional_conditioning, image_conditioning):
        cfg = self.model_wrap_cfg
        # as A1111's initialize() and launch_sampling(): the step counter, the evaluations expected, the mask
        cfg.step, cfg.total_steps = 0, (len(sigmas) - 1) * (2 if self.name in SECOND_ORDER else 1)
        cfg.mask, cfg.nmask = getattr(p, "mask", None), getattr(p, "nmask", None)
        kwargs = {}
        if self.ancestral:
            kwargs["noise_sampler"] = lambda s, s_next: p.rng.next()
        if self.brownian:
            kwargs["noise_sampler"] = sampling.BrownianTreeNoiseSampler(
                x, sigmas[sigmas > 0].min(), sigmas.max(), seed=p.all_seeds[:x.shape[0]])
        extra = dict(cond=conditioning, uncond=unconditional_conditioning, cond_scale=p.cfg_scale,
                     s_min_uncond=p.s_min_uncond, image_cond=image_conditioning)
        with torch.no_grad():
            return self.func(self.model_wrap_cfg, x, sigmas, extra_args=extra, disable=True, **kwargs)


def img2img_processing(init_latent, steps=6, seed=0, strength=0.6, mask=None, noise_multiplier=1.0, **kwargs):
    """The attributes of A1111's StableDiffusionProcessingImg2Img the host glue and its sample()
    read: the init latent (B, 4, h, w) as init() encodes it, the denoising strength, the noise
    multiplier and, for inpainting, the latent mask (1 = repaint) as init() makes it: p.mask
    keeps the init latent, p.nmask is repainted."""
    batch, _, h, w = init_latent.shape
    p = processing(width=w * 8, height=h * 8, steps=steps, batch=batch, seed=seed, **kwargs)
    p.init_latent, p.denoising_strength, p.initial_noise_multiplier = init_latent, strength, noise_multiplier
    p.image_conditioning = None
    p.mask = p.nmask = None
    if mask is not None:
        latmask = mask.float().expand(init_latent.shape[1], h, w)
        p.mask, p.nmask = 1.0 - latmask, latmask
    return p


def img2img_sample(p, conditioning, unconditional_conditioning, scripts_hook=None):
    """A1111's StableDiffusionProcessingImg2Img.sample: the batch's noise (times the noise
    multiplier), the scripts' process_before_every_sampling, sample_img2img, then the mask's
    outside put back to the init latent."""
    x = p.rng.next()
    if p.initial_noise_multiplier != 1.0:
        x *= p.initial_noise_multiplier
    if scripts_hook is not None:
        scripts_hook(p, x=p.init_latent, noise=x, c=conditioning, uc=unconditional_conditioning)
    samples = p.sampler.sample_img2img(p, p.init_latent, x, conditioning, unconditional_conditioning,
                                       image_conditioning=p.image_conditioning)
    if p.mask is not None:
        samples = samples * p.nmask + p.init_latent * p.mask
    return samples


def processing(width=128, height=128, steps=6, batch=1, seed=0, cfg_scale=5.0, s_min_uncond=0.0, prompt="p"):
    """The attributes of A1111's StableDiffusionProcessingTxt2Img the host glue reads."""
    from modules import rng
    seeds = [seed + i for i in range(batch)]
    p = SimpleNamespace(width=width, height=height, steps=steps, batch_size=batch, cfg_scale=cfg_scale,
                        s_min_uncond=s_min_uncond, all_seeds=seeds, iteration=0, is_hr_pass=False,
                        prompt=prompt, prompts=[prompt] * batch, negative_prompts=[""] * batch,
                        extra_generation_params={}, sd_model=None)
    p.rng = rng.ImageRNG((4, height // 8, width // 8), seeds)
    return p
