"""InstantID's model files in their official formats, with random weights, for the tests:
- the IP-Adapter as InstantID's `ip-adapter.bin` (torch.save of {"image_proj": Resampler state
  dict, "ip_adapter": {"2n+1.to_k_ip.weight", ...}}) or its .safetensors twin; the Resampler is a
  copy of the official code (ReferenceResampler), which also serves as the tests' reference;
- the IdentityNet as diffusers writes it: ControlNetModel(tiny SDXL config).save_pretrained(folder)
  (config.json + diffusion_pytorch_model.safetensors), or that state dict as one .safetensors file
  (how control_instant_id_sdxl.safetensors is shared)."""

from __future__ import annotations

import math

import torch
from diffusers import ControlNetModel
from safetensors.torch import save_file
from torch import nn

from tinyxl import CONTEXT_DIM

# ---- IP-Adapter ----------------------------------------------------------------------------
# instantX-research/InstantID ip_adapter/resampler.py (from tencent-ailab/IP-Adapter), verbatim
# in substance: the reference the package's Resampler is compared with


def _feed_forward(dim, mult=4):
    inner_dim = int(dim * mult)
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, inner_dim, bias=False), nn.GELU(),
                         nn.Linear(inner_dim, dim, bias=False))


def _reshape_tensor(x, heads):
    bs, length, width = x.shape
    x = x.view(bs, length, heads, -1)
    x = x.transpose(1, 2)
    return x.reshape(bs, heads, length, -1)


class _PerceiverAttention(nn.Module):
    def __init__(self, *, dim, dim_head=64, heads=8):
        super().__init__()
        self.scale = dim_head ** -0.5
        self.dim_head = dim_head
        self.heads = heads
        inner_dim = dim_head * heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_kv = nn.Linear(dim, inner_dim * 2, bias=False)
        self.to_out = nn.Linear(inner_dim, dim, bias=False)

    def forward(self, x, latents):
        x = self.norm1(x)
        latents = self.norm2(latents)
        b, l, _ = latents.shape
        q = self.to_q(latents)
        kv_input = torch.cat((x, latents), dim=-2)
        k, v = self.to_kv(kv_input).chunk(2, dim=-1)
        q = _reshape_tensor(q, self.heads)
        k = _reshape_tensor(k, self.heads)
        v = _reshape_tensor(v, self.heads)
        scale = 1 / math.sqrt(math.sqrt(self.dim_head))
        weight = (q * scale) @ (k * scale).transpose(-2, -1)
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        out = weight @ v
        out = out.permute(0, 2, 1, 3).reshape(b, l, -1)
        return self.to_out(out)


class ReferenceResampler(nn.Module):
    def __init__(self, dim=1024, depth=8, dim_head=64, heads=16, num_queries=8, embedding_dim=768,
                 output_dim=1024, ff_mult=4):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(1, num_queries, dim) / dim ** 0.5)
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList([])
        for _ in range(depth):
            self.layers.append(nn.ModuleList([_PerceiverAttention(dim=dim, dim_head=dim_head, heads=heads),
                                              _feed_forward(dim=dim, mult=ff_mult)]))

    def forward(self, x):
        latents = self.latents.repeat(x.size(0), 1, 1)
        x = self.proj_in(x)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        latents = self.proj_out(latents)
        return self.norm_out(latents)


# InstantID's is dim 1280, depth 4, heads 20; a narrower one keeps the tests fast
RESAMPLER = dict(dim=128, depth=2, dim_head=64, heads=2, num_queries=16, embedding_dim=512, ff_mult=4)


def reference_resampler(output_dim: int, seed: int, **overrides) -> ReferenceResampler:
    torch.manual_seed(seed)
    model = ReferenceResampler(**{**RESAMPLER, **overrides}, output_dim=output_dim)
    with torch.no_grad():   # LayerNorms start at 1/0: randomise them too, or a swapped norm goes unseen
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.normal_(1, 0.2)
                module.bias.normal_(0, 0.2)
    return model.eval()


def attn2_shapes_in_adapter_order(unet: nn.Module) -> list[tuple[tuple, tuple]]:
    """(to_k, to_v) weight shapes of the UNet's cross-attentions, input blocks, output blocks,
    middle block (diffusers' down, up, mid)."""
    found = [(n, m) for n, m in unet.named_modules() if n.endswith(".attn2")]
    ordered = [m for prefix in ("input_blocks.", "output_blocks.", "middle_block.")
               for n, m in found if n.startswith(prefix)]
    return [(tuple(m.to_k.weight.shape), tuple(m.to_v.weight.shape)) for m in ordered]


def ip_adapter_state(unet: nn.Module, seed: int, marker: bool = False, **resampler) -> dict:
    """The official nested state dict for this UNet. `marker`: layer n's weights are all n + 1
    (to_v_ip: -(n + 1)), so a test can see which layer went where."""
    shapes = attn2_shapes_in_adapter_order(unet)
    proj = reference_resampler(shapes[0][0][1], seed, **resampler)
    gen = torch.Generator().manual_seed(seed)
    layers = {}
    for n, (k_shape, v_shape) in enumerate(shapes):
        k = torch.full(k_shape, n + 1.0) if marker else torch.randn(k_shape, generator=gen) * 0.1
        v = torch.full(v_shape, -(n + 1.0)) if marker else torch.randn(v_shape, generator=gen) * 0.1
        layers[f"{2 * n + 1}.to_k_ip.weight"], layers[f"{2 * n + 1}.to_v_ip.weight"] = k, v
    return {"image_proj": proj.state_dict(), "ip_adapter": layers}


def write_ip_adapter(path, unet: nn.Module, seed: int = 0, marker: bool = False, **resampler) -> dict:
    """ip-adapter.bin (torch.save, as InstantID publishes it) or, for a .safetensors path, the flat
    "image_proj.*"/"ip_adapter.*" layout. Returns the nested state dict."""
    state = ip_adapter_state(unet, seed, marker, **resampler)
    if str(path).endswith(".safetensors"):
        save_file({f"{part}.{k}": v.contiguous() for part, d in state.items() for k, v in d.items()}, str(path))
    else:
        torch.save(state, str(path))
    return state


# ---- IdentityNet ----------------------------------------------------------------------------
# InstantID's ControlNetModel/config.json at tinyxl's size: SDXL's blocks (no attention at full
# size, then 1 and 2 transformer blocks), heads of 16 channels (SDXL: 64), "text_time"
# embedding of text_embeds (24) + 6 size/crop numbers x 4 (SDXL: 1280 + 6 x 256 = 2816)
TINY_CONTROLNET = dict(
    in_channels=4, block_out_channels=(32, 64, 128), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    transformer_layers_per_block=[1, 1, 2], attention_head_dim=(2, 4, 8), cross_attention_dim=CONTEXT_DIM,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=4,
    projection_class_embeddings_input_dim=48)
TINY_HEAD_CHANNELS = 16
TEXT_EMBEDS = 24


def make_controlnet(seed: int = 0) -> ControlNetModel:
    """diffusers' ControlNetModel at the tiny config with every weight random: diffusers zeroes the
    hint output and the residual convs (all residuals would be 0) and starts norms at 1/0."""
    torch.manual_seed(seed)
    model = ControlNetModel(**TINY_CONTROLNET)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)) and module.weight.abs().max() == 0:
                module.weight.normal_(0, 0.05)
                if module.bias is not None:
                    module.bias.normal_(0, 0.05)
            if isinstance(module, (nn.GroupNorm, nn.LayerNorm)):
                module.weight.normal_(1, 0.2)
                module.bias.normal_(0, 0.2)
    return model.eval()


def write_identitynet_folder(folder, seed: int = 0) -> ControlNetModel:
    """The official layout: diffusers' save_pretrained (config.json + diffusion_pytorch_model.safetensors)."""
    model = make_controlnet(seed)
    model.save_pretrained(str(folder))
    return model


def write_identitynet_file(path, seed: int = 0) -> ControlNetModel:
    """One .safetensors with diffusers' keys and no config (control_instant_id_sdxl.safetensors)."""
    model = make_controlnet(seed)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model


write_identitynet = write_identitynet_folder   # the official layout is the default
