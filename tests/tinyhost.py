"""A miniature of what A1111 runs: the real ldm UNetModel (tiny config, random weights) behind
k-diffusion's CompVisDenoiser, a CFG denoiser shaped like A1111's, k-diffusion's samplers, and
real kohya-format LoRA files."""

from __future__ import annotations

import copy

import torch
from k_diffusion import sampling
from k_diffusion.external import CompVisDenoiser
from ldm.modules.diffusionmodules.openaimodel import UNetModel
from safetensors.torch import save_file
from torch import nn

CONTEXT_DIM = 32


def make_unet(seed: int = 0, attention_resolutions=(1, 2, 4), num_res_blocks: int = 1) -> UNetModel:
    """SD1.5's layout (4 levels, attention at the top 3, 1x1 conv proj_in) at 1/10 the width."""
    torch.manual_seed(seed)
    unet = UNetModel(image_size=32, in_channels=4, out_channels=4, model_channels=32,
                     attention_resolutions=list(attention_resolutions), num_res_blocks=num_res_blocks,
                     channel_mult=(1, 2, 2, 2), num_heads=2, use_spatial_transformer=True,
                     transformer_depth=1, context_dim=CONTEXT_DIM, use_checkpoint=False, legacy=False)
    # ldm zero-initialises output projections; refill them or prompts and LoRAs change nothing
    with torch.no_grad():
        for module in unet.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)) and module.weight.abs().max() == 0:
                module.weight.normal_(0, 0.05)
    return unet.eval()


class TinyLDM(nn.Module):
    """What CompVisDenoiser needs from LatentDiffusion: alphas_cumprod and apply_model."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.diffusion_model = unet
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
        self.register_buffer("alphas_cumprod", torch.cumprod(1 - betas, 0).float())

    def apply_model(self, x, t, cond):
        return self.diffusion_model(x, t, context=cond["c_crossattn"])


class CFGHost:
    """Shaped like A1111's CFGDenoiser: [cond rows, uncond rows] in one inner-model call, then CFG.

    `route`, when set, receives every inner-model call (the engine's entry point)."""

    def __init__(self, ldm: TinyLDM, cond: torch.Tensor, uncond: torch.Tensor, cfg_scale: float = 5.0):
        self.inner = CompVisDenoiser(ldm)
        self.cond, self.uncond, self.cfg_scale = cond, uncond, cfg_scale
        self.route = None
        self.step = 0
        self.total_steps = 0

    def model_fn(self, x, sigma, cond):
        return self.inner(x, sigma, cond=cond)

    def __call__(self, x, sigma):
        b = x.shape[0]
        x_in = torch.cat([x, x])
        sigma_in = torch.cat([sigma, sigma])
        cond_in = {"c_crossattn": torch.cat([self.cond.expand(b, -1, -1), self.uncond.expand(b, -1, -1)])}
        if self.route is None:
            out = self.model_fn(x_in, sigma_in, cond_in)
        else:
            out = self.route(self.model_fn, x_in, sigma_in, cond_in, n_cond=b, step=self.step,
                             total_steps=self.total_steps)
        self.step += 1
        cond_out, uncond_out = out[:b], out[b:]
        return uncond_out + (cond_out - uncond_out) * self.cfg_scale


def sample(host: CFGHost, sampler: str = "euler", steps: int = 6, batch: int = 1, latent_hw=(16, 16),
           seed: int = 0) -> torch.Tensor:
    """A full sampling run; same seed = same initial and ancestral noise."""
    gen = torch.Generator().manual_seed(seed)
    sigmas = host.inner.get_sigmas(steps)
    x = torch.randn((batch, 4) + tuple(latent_hw), generator=gen) * sigmas[0]
    host.step, host.total_steps = 0, steps
    with torch.no_grad():
        if sampler == "euler":
            return sampling.sample_euler(host, x, sigmas, disable=True)
        noise = lambda s, s_next: torch.randn(x.shape, generator=gen)  # noqa: E731
        return sampling.sample_euler_ancestral(host, x, sigmas, disable=True, noise_sampler=noise)


def euler_pass(host: CFGHost, steps: int, initial: torch.Tensor, **extra):
    """What a WebUI hands `session.sample`: k-diffusion's Euler on `host` over `steps` from
    `initial` (unit noise, scaled to the first sigma), the same noise replayed for a second
    pass, the sampler's sigmas as its schedule; `extra`: more HostPass fields."""
    from lib_mc.engine import HostPass
    from lib_mc.methods.schedule import SamplerSchedule
    sigmas = host.inner.get_sigmas(steps)

    def run(noise):
        host.step, host.total_steps = 0, steps
        with torch.no_grad():
            return sampling.sample_euler(host, noise * sigmas[0], sigmas, disable=True)
    return HostPass(sample=run, initial=initial, replay_noise=lambda: initial, schedule=SamplerSchedule(sigmas),
                    **extra)


def random_context(seed: int, tokens: int = 8, dim: int = CONTEXT_DIM) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((1, tokens, dim), generator=gen)


# ---- LoRA files ---------------------------------------------------------------------------

ATTN_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.2")


def lora_targets(unet: nn.Module, convs: bool = False) -> list[str]:
    names = [n for n, m in unet.named_modules()
             if isinstance(m, nn.Linear) and n.endswith(ATTN_TARGETS)]
    if convs:  # LoCon: ResBlock convs (3x3) and proj_in (1x1)
        names += [n for n, m in unet.named_modules()
                  if isinstance(m, nn.Conv2d) and (n.endswith(("in_layers.2", "out_layers.3", "proj_in")))]
    return names


def write_lora(path, unet: nn.Module, seed: int, rank: int = 4, alpha: float = 2.0, convs: bool = False,
               strength: float = 0.3, key_of=None) -> dict[str, tuple]:
    """A kohya-format LoRA on the given UNet's layers; returns {module name: (down, up, alpha)}."""
    gen = torch.Generator().manual_seed(seed)
    modules = dict(unet.named_modules())
    state, parts = {}, {}
    for name in lora_targets(unet, convs):
        weight = modules[name].weight
        if weight.dim() == 4:
            down = torch.randn((rank, weight.shape[1]) + tuple(weight.shape[2:]), generator=gen) * strength
            up = torch.randn((weight.shape[0], rank, 1, 1), generator=gen) * strength
        else:
            down = torch.randn((rank, weight.shape[1]), generator=gen) * strength
            up = torch.randn((weight.shape[0], rank), generator=gen) * strength
        key = key_of(name) if key_of else "lora_unet_" + name.replace(".", "_")
        state[f"{key}.lora_down.weight"] = down
        state[f"{key}.lora_up.weight"] = up
        state[f"{key}.alpha"] = torch.tensor(alpha)
        parts[name] = (down, up, alpha)
    # a text-encoder layer, as real LoRAs have; the engine leaves it to the host
    state["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = torch.randn(rank, 8)
    state["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"] = torch.randn(8, rank)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return parts


def merged_copy(unet: nn.Module, loras: list[tuple[dict, float]]) -> nn.Module:
    """Reference: a deep copy of the UNet with LoRAs merged into its weights (W += w * a/r * up @ down)."""
    merged = copy.deepcopy(unet)
    modules = dict(merged.named_modules())
    with torch.no_grad():
        for parts, weight in loras:
            for name, (down, up, alpha) in parts.items():
                w = modules[name].weight
                delta = up.flatten(1) @ down.flatten(1) * (alpha / down.shape[0]) * weight
                w += delta.reshape(w.shape)
    return merged


class count_unet_rows:
    """Counts UNet forward calls and sample-evaluations (batch rows) until removed."""

    def __init__(self, unet: nn.Module):
        self.calls = self.count = 0
        self.handle = unet.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.calls += 1
        self.count += (args[0] if args else kwargs["x"]).shape[0]

    def remove(self):
        self.handle.remove()


def two_lora_world(folder) -> dict:
    """The engine tests' shared setup: a tiny UNet, two LoRA files on it (alice: attention
    layers; bob: also convs), base and concept contexts (alice's longer, so keys get padded)."""
    from lib_mc.lora import load_network
    unet = make_unet()
    parts_a = write_lora(folder / "alice.safetensors", unet, seed=10)
    parts_b = write_lora(folder / "bob.safetensors", unet, seed=11, convs=True)
    return dict(unet=unet, ldm=TinyLDM(unet),
                alice=load_network(str(folder / "alice.safetensors")), alice_parts=parts_a,
                bob=load_network(str(folder / "bob.safetensors")), bob_parts=parts_b,
                cond=random_context(1), uncond=random_context(2),
                alice_cond=random_context(3, tokens=12), bob_cond=random_context(4))
