"""img2img's step setup in A1111 and Forge (`setup_img2img_steps`): the schedule's length and
t_enc, the sampler then running the schedule's last t_enc + 1 steps (sigmas[steps - t_enc - 1:])."""

from modules.shared import opts


def setup_img2img_steps(p, steps=None):
    """Normally the schedule has the steps asked for and img2img runs its last fraction
    (denoising strength, below 1). With fixed steps (the option, or steps passed as the hires
    pass does) the schedule is stretched so that the steps asked for are the ones run."""
    strength = min(p.denoising_strength, 0.999)
    if opts.img2img_fix_steps or steps is not None:
        wanted = steps or p.steps
        return (int(wanted / strength) if p.denoising_strength > 0 else 0), wanted - 1
    return p.steps, int(strength * p.steps)
