"""A miniature of what A1111 runs for SDXL: the real `sgm` UNetModel (Stability-AI's
generative-models at the commit A1111 v1.10 clones, vendored in tests/vendor) at a tiny config
with random weights, behind sgm's own OpenAIWrapper and k-diffusion's CompVisDenoiser, and
kohya SDXL LoRA files with the key names real SDXL LoRAs use. Importing this module puts
tests/vendor on sys.path (only the SDXL tests import it)."""

from __future__ import annotations

import os
import sys

import torch
from safetensors.torch import save_file
from torch import nn

sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), "vendor"))

import sgm.modules.attention  # noqa: E402
from sgm.modules.attention import CrossAttention  # noqa: E402,F401  (the class A1111 builds for SDXL)
from sgm.modules.diffusionmodules.openaimodel import UNetModel  # noqa: E402
from sgm.modules.diffusionmodules.wrappers import OpenAIWrapper  # noqa: E402

from tinyhost import ATTN_TARGETS, CFGHost  # noqa: E402

# A1111 (modules/sd_models_xl.py) makes sgm build its vanilla CrossAttention, whose forward it
# then replaces with its own optimisation; the config's softmax-xformers falls back to it
sgm.modules.attention.XFORMERS_IS_AVAILABLE = False

CONTEXT_DIM = 64   # SDXL: 2048 (both text encoders), SD1.5: 768; the SD1.5 tiny UNet has 32
ADM_DIM = 48       # SDXL: 2816 (pooled text embedding + size/crop embeddings)


def make_xl_unet(seed: int = 0) -> UNetModel:
    """configs/inference/sd_xl_base.yaml's network_config (3 levels, attention at 2x and 4x
    downsampling, deeper transformers lower down, linear proj_in/out, `y` through label_emb) at a
    tenth of the width, checkpointing off as A1111 sets it."""
    torch.manual_seed(seed)
    unet = UNetModel(adm_in_channels=ADM_DIM, num_classes="sequential", use_checkpoint=False, in_channels=4,
                     out_channels=4, model_channels=32, attention_resolutions=[4, 2], num_res_blocks=2,
                     channel_mult=[1, 2, 4], num_head_channels=16, use_spatial_transformer=True,
                     use_linear_in_transformer=True, transformer_depth=[1, 1, 2], context_dim=CONTEXT_DIM,
                     spatial_transformer_attn_type="softmax-xformers", legacy=False)
    # sgm zero-initialises output projections; refill them or prompts and LoRAs change nothing
    with torch.no_grad():
        for module in unet.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)) and module.weight.abs().max() == 0:
                module.weight.normal_(0, 0.05)
    return unet.eval()


class TinyXL(nn.Module):
    """What CompVisDenoiser needs from A1111's SDXL model (sgm's DiffusionEngine as extended by
    sd_models_xl.py): alphas_cumprod and apply_model, which hands the cond dict to sgm's
    OpenAIWrapper (crossattn -> context, vector -> y)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.model = OpenAIWrapper(unet)
        # LegacyDDPMDiscretization's schedule (A1111's extend_sdxl takes alphas_cumprod from it)
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
        self.register_buffer("alphas_cumprod", torch.cumprod(1 - betas, 0).float())

    def apply_model(self, x, t, cond):
        return self.model(x, t, cond)


class XLCFGHost(CFGHost):
    """tinyhost's CFG host with SDXL's conditioning: {"crossattn": (B, T, C), "vector": (B, ADM)}."""

    def __call__(self, x, sigma):
        b = x.shape[0]
        x_in, sigma_in = torch.cat([x, x]), torch.cat([sigma, sigma])
        cond_in = {key: torch.cat([self.cond[key].expand(b, *self.cond[key].shape[1:]),
                                   self.uncond[key].expand(b, *self.uncond[key].shape[1:])])
                   for key in ("crossattn", "vector")}
        if self.route is None:
            out = self.model_fn(x_in, sigma_in, cond_in)
        else:
            out = self.route(self.model_fn, x_in, sigma_in, cond_in, n_cond=b, step=self.step,
                             total_steps=self.total_steps)
        self.step += 1
        cond_out, uncond_out = out[:b], out[b:]
        return uncond_out + (cond_out - uncond_out) * self.cfg_scale


def xl_cond(seed: int, tokens: int = 8) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"crossattn": torch.randn((1, tokens, CONTEXT_DIM), generator=gen),
            "vector": torch.randn((1, ADM_DIM), generator=gen)}


# ---- SDXL LoRA files ------------------------------------------------------------------------

# what kohya's sd-scripts trains on SDXL's UNet: the transformers' linear layers (attention,
# feed-forward, proj_in/out); with convs (LoCon) also the ResBlocks' 3x3 convs
XL_TARGETS = ATTN_TARGETS + ("ff.net.0.proj", "proj_in", "proj_out")


def xl_lora_targets(unet: nn.Module, convs: bool = False) -> list[str]:
    names = [n for n, m in unet.named_modules() if isinstance(m, nn.Linear) and n.endswith(XL_TARGETS)]
    if convs:
        names += [n for n, m in unet.named_modules()
                  if isinstance(m, nn.Conv2d) and n.endswith(("in_layers.2", "out_layers.3"))]
    return names


def write_xl_lora(path, unet: nn.Module, seed: int, rank: int = 4, alpha: float = 2.0, convs: bool = False,
                  strength: float = 0.3) -> dict[str, tuple]:
    """A kohya SDXL LoRA: UNet keys are sgm's module names (`lora_unet_input_blocks_4_1_
    transformer_blocks_0_attn1_to_q`), text-encoder keys `lora_te1_`/`lora_te2_` (the host's).
    Returns {module name: (down, up, alpha)} for tinyhost.merged_copy."""
    gen = torch.Generator().manual_seed(seed)
    modules = dict(unet.named_modules())
    state, parts = {}, {}
    for name in xl_lora_targets(unet, convs):
        weight = modules[name].weight
        tail = tuple(weight.shape[2:])
        down = torch.randn((rank, weight.shape[1]) + tail, generator=gen) * strength
        up = torch.randn((weight.shape[0], rank) + (1,) * len(tail), generator=gen) * strength
        key = "lora_unet_" + name.replace(".", "_")
        state.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                      f"{key}.alpha": torch.tensor(alpha)})
        parts[name] = (down, up, alpha)
    for te, width in (("lora_te1", 768), ("lora_te2", 1280)):
        key = f"{te}_text_model_encoder_layers_0_self_attn_q_proj"
        state[f"{key}.lora_down.weight"] = torch.randn((rank, width), generator=gen)
        state[f"{key}.lora_up.weight"] = torch.randn((width, rank), generator=gen)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return parts
