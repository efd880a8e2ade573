"""A1111's (and Forge's) img2img step setup: how many steps the schedule has and how many of its
last ones img2img runs (`t_enc`); the sampler then runs t_enc + 1 steps from
sigmas[steps - t_enc - 1:]."""

from modules.shared import opts


def setup_img2img_steps(p, steps=None):
    if opts.img2img_fix_steps or steps is not None:
        requested_steps = (steps or p.steps)
        steps = int(requested_steps / min(p.denoising_strength, 0.999)) if p.denoising_strength > 0 else 0
        t_enc = requested_steps - 1
    else:
        steps = p.steps
        t_enc = int(min(p.denoising_strength, 0.999) * steps)
    return steps, t_enc
