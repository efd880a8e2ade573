"""The UNets tests/benchmark.py times, with what a host puts around each: SD1.5's layout (ldm) and
SDXL's (sgm), random weights at full or reduced width, k-diffusion's wrapper, a CFG host shaped
like A1111's, the conditioning each family's UNet takes, and kohya LoRA files on the layers
kohya trains."""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from typing import Any, Callable

import torch
from safetensors.torch import save_file
from torch import nn

from lib_mc.memory import UNetShape
from tinyhost import CFGHost, TinyLDM

# the layers a kohya LoRA (networks.lora, not LoCon) trains in SD1.5's and SDXL's UNets: every
# transformer block's attention projections, both feed-forward layers and proj_in / proj_out
# (1x1 convs in SD1.5, linear layers in SDXL)
KOHYA_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                 "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")

SDXL_ADM = 2816          # SDXL's `vector`: pooled OpenCLIP embedding (1280) + 6 size/crop embeddings of 256
SDXL_DEPTH = (0, 2, 10)  # transformer blocks per level (sd_xl_base.yaml)


@dataclass
class Model:
    """One UNet and its host. cond(seed): one prompt's conditioning as the host hands it to the
    engine (a (1, 77, C) tensor, or SDXL's {"crossattn", "vector"}); call(rows): one UNet call of
    that many rows at a mid timestep on this latent size (the memory-per-row measurement)."""
    family: str                 # "sd1" or "sdxl" (lib_mc/memory.py's names)
    description: str
    unet: nn.Module
    host: CFGHost
    context_key: str            # the engine's context key for this host's cond dict
    cond: Callable[[int], Any]
    call: Callable[[int, tuple[int, int]], torch.Tensor]
    shape: UNetShape            # for lib_mc/memory.py's estimate
    weights_dtype: torch.dtype


def sdp_attention_forward(self, x, context=None, mask=None, **kwargs):
    """Attention as A1111's sd_hijack_optimizations installs it (the 'sdp' option), class-wide,
    for ldm's CrossAttention (SD1.5) and sgm's (SDXL) alike."""
    source = x if context is None else context
    q, k, v = self.to_q(x), self.to_k(source), self.to_v(source)
    b, n, inner = q.shape
    q, k, v = (t.view(b, -1, self.heads, inner // self.heads).transpose(1, 2) for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    return self.to_out(out.transpose(1, 2).reshape(b, n, inner))


def _refill_zero_layers(unet: nn.Module, std: float = 0.02) -> None:
    """ldm and sgm zero-initialise output projections: refill them, or prompts and LoRAs change nothing."""
    with torch.no_grad():
        for module in unet.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)) and module.weight.abs().max() == 0:
                module.weight.normal_(0, std)


def _random_context(seed: int, dim: int, device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((1, 77, dim), generator=gen).to(device)


def build_sd15(channels: int, context_dim: int, device: torch.device, host_attention: str = "sdp") -> Model:
    """SD1.5's UNet layout (sd-v1 config: 4 levels, 2 res blocks, 8 heads); width from `channels`.
    fp16 weights on CUDA, as A1111 keeps them (the sampler runs under fp16 autocast; fp32
    weights would add autocast's fp16 copy of them to every run's peak)."""
    from ldm.modules.attention import CrossAttention
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    if host_attention == "sdp":
        CrossAttention.forward = sdp_attention_forward
    torch.manual_seed(0)
    unet = UNetModel(image_size=32, in_channels=4, out_channels=4, model_channels=channels,
                     attention_resolutions=[1, 2, 4], num_res_blocks=2, channel_mult=(1, 2, 4, 4),
                     num_heads=8, use_spatial_transformer=True, transformer_depth=1, context_dim=context_dim,
                     use_checkpoint=False, legacy=False)
    _refill_zero_layers(unet)
    unet = unet.eval().to(device)
    if device.type == "cuda":
        unet = unet.half()
    ldm = TinyLDM(unet).to(device)   # its alphas_cumprod buffer stays fp32
    cond = lambda seed: _random_context(seed, context_dim, device)  # noqa: E731

    def call(rows: int, latent_hw: tuple[int, int]) -> torch.Tensor:
        x = torch.randn((rows, 4) + tuple(latent_hw), device=device)
        return unet(x, torch.full((rows,), 500.0, device=device),
                    context=torch.randn(rows, 77, context_dim, device=device))

    return Model("sd1", f"SD1.5 layout (ldm), model_channels {channels}, context {context_dim}", unet,
                 CFGHost(ldm, cond(1), cond(2)), "c_crossattn", cond, call,
                 UNetShape(channels, (1, 2, 4, 4), 2, (1, 1, 1, 0)), next(unet.parameters()).dtype)


def build_sdxl(channels: int, context_dim: int, device: torch.device, host_attention: str = "sdp") -> Model:
    """SDXL's UNet (sd_xl_base.yaml's network_config: 3 levels, attention at 2x and 4x
    downsampling with 2 and 10 transformer blocks, linear proj_in/out, 64-channel heads, `y`
    (2816 wide) through label_emb), width from `channels` (SDXL: 320, 2.6 B parameters), built
    on `device` directly; fp16 weights on CUDA, as A1111 keeps SDXL (autocast as for SD1.5)."""
    import tinyxl   # puts the vendored sgm on sys.path and makes sgm build its vanilla CrossAttention
    from sgm.modules.attention import CrossAttention
    from sgm.modules.diffusionmodules.openaimodel import UNetModel
    if host_attention == "sdp":
        CrossAttention.forward = sdp_attention_forward
    torch.manual_seed(0)
    # on the device directly (2.6 B parameters); sgm prints a line or two per transformer built
    with torch.device(device), contextlib.redirect_stdout(io.StringIO()):
        unet = UNetModel(adm_in_channels=SDXL_ADM, num_classes="sequential", use_checkpoint=False, in_channels=4,
                         out_channels=4, model_channels=channels, attention_resolutions=[4, 2], num_res_blocks=2,
                         channel_mult=[1, 2, 4], num_head_channels=min(64, channels),
                         use_spatial_transformer=True, use_linear_in_transformer=True,
                         transformer_depth=list(SDXL_DEPTH), context_dim=context_dim,
                         spatial_transformer_attn_type="softmax-xformers", legacy=False)
        _refill_zero_layers(unet)
    unet = unet.eval()
    if device.type == "cuda":
        unet = unet.half()
    ldm = tinyxl.TinyXL(unet).to(device)   # its alphas_cumprod buffer stays fp32

    def cond(seed: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        return {"crossattn": torch.randn((1, 77, context_dim), generator=gen).to(device),
                "vector": torch.randn((1, SDXL_ADM), generator=gen).to(device)}

    def call(rows: int, latent_hw: tuple[int, int]) -> torch.Tensor:
        x = torch.randn((rows, 4) + tuple(latent_hw), device=device)
        return unet(x, torch.full((rows,), 500.0, device=device),
                    context=torch.randn(rows, 77, context_dim, device=device),
                    y=torch.randn(rows, SDXL_ADM, device=device))

    params = sum(p.numel() for p in unet.parameters())
    return Model("sdxl", f"SDXL layout (sgm), model_channels {channels}, context {context_dim}, "
                         f"{params / 1e9:.2f} B parameters", unet,
                 tinyxl.XLCFGHost(ldm, cond(1), cond(2)), "crossattn", cond, call,
                 UNetShape(channels, (1, 2, 4), 2, SDXL_DEPTH), next(unet.parameters()).dtype)


def write_kohya_lora(path: str, unet: nn.Module, seed: int, rank: int, alpha: float = 8.0) -> int:
    """A kohya-format LoRA file of this rank on KOHYA_TARGETS (keys `lora_unet_` + the module's
    name, as kohya names SD1.5's and SDXL's layers), made on the CPU from the layers' shapes
    only (the UNet stays where it is); returns the number of layers."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in unet.named_modules():
        if not name.endswith(KOHYA_TARGETS) or not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        shape = module.weight.shape
        tail = tuple(shape[2:])   # (1, 1) for SD1.5's proj convs
        key = "lora_unet_" + name.replace(".", "_")
        state[f"{key}.lora_down.weight"] = torch.randn((rank, shape[1]) + tail, generator=gen) * 0.05
        state[f"{key}.lora_up.weight"] = torch.randn((shape[0], rank) + (1,) * len(tail), generator=gen) * 0.05
        state[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(state, path)
    return len(state) // 3


def build_instantid(model: Model, device: torch.device, seed: int = 0):
    """InstantID's models for an SDXL-layout UNet, random weights at the UNet's own widths: the
    IP-Adapter's to_k_ip / to_v_ip for every cross-attention (the Resampler ran once per job in
    prepare, so a small one gives the 16 identity tokens here), and an IdentityNet as large as an
    SDXL ControlNet (the UNet's encoder: its levels, ResBlocks and transformer depths).
    -> (InstantID, FaceIdentity of one face concept)."""
    import numpy as np
    from lib_mc.faces.instantid.identitynet import IdentityNet
    from lib_mc.faces.instantid.ip_adapter import cross_attention_names
    from lib_mc.faces.instantid.netconfig import NetConfig
    from lib_mc.faces.instantid.resampler import Resampler
    from lib_mc.methods.faces import FaceIdentity, InstantID
    unet = model.unet
    modules = dict(unet.named_modules())
    gen = torch.Generator().manual_seed(seed)
    dtype = next(unet.parameters()).dtype
    layers = {name: tuple((torch.randn(modules[name].to_k.weight.shape, generator=gen) * 0.02).to(device, dtype)
                          for _ in range(2)) for name in cross_attention_names(unet)}
    shape = model.shape
    channels = tuple(shape.channels * m for m in shape.mult)
    context = modules[next(iter(layers))].to_k.weight.shape[1]
    config = NetConfig(in_channels=4, channels=channels, layers=shape.res_blocks, depths=tuple(shape.depth),
                       mid_depth=shape.depth[-1], heads=tuple(max(1, c // min(64, shape.channels)) for c in channels),
                       context_dim=context, adm_dim=SDXL_ADM, linear=True, hint_channels=3,
                       hint_embedding=(16, 32, 96, 256))
    torch.manual_seed(seed)
    with torch.device(device):
        net = IdentityNet(config).eval().to(dtype)
    resampler = Resampler(dim=256, depth=1, heads=4, num_queries=16, embedding_dim=512, output_dim=context,
                          ff_inner=1024).eval()
    embedding = torch.randn(512, generator=gen) * 20
    with torch.no_grad():
        cond, uncond = resampler(embedding.reshape(1, 1, 512)), resampler(torch.zeros(1, 1, 512))
    kps = np.array([[0.3, 0.35], [0.7, 0.35], [0.5, 0.55], [0.35, 0.75], [0.65, 0.75]])
    face = FaceIdentity(embedding.numpy(), kps, 0.8, 0.8, cond.to(device, dtype), uncond.to(device, dtype))
    return InstantID(layers, net), face
