"""InstantID's IP-Adapter: the Resampler (face embedding -> 16 tokens) and, per cross-attention
of the UNet, the extra key/value projections `to_k_ip`/`to_v_ip` for those tokens.

The official file numbers its layers as diffusers' `attn_processors` lists them (every attn1
and attn2 of the down blocks, then the up blocks, then the mid block), and only the attn2
processors carry weights, so the n-th cross-attention is key 2n+1. ldm/sgm (and Forge) name the
same layers input_blocks / output_blocks / middle_block; sd-webui-controlnet's IP-Adapter walks
them in that order too."""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file
from torch import nn

from ...auto.sam import ModelFileError
from .resampler import Resampler, resampler_from_state_dict

FACE_EMBEDDING_DIM = 512   # ArcFace (antelopev2 glintr100)
BLOCK_ORDER = ("input_blocks.", "output_blocks.", "middle_block.")


def cross_attention_names(unet: nn.Module) -> list[str]:
    """The UNet's attn2 modules in the adapter's key order."""
    names = [n for n, m in unet.named_modules() if n.endswith(".attn2") and hasattr(m, "to_k")]
    return [n for prefix in BLOCK_ORDER for n in names if n.startswith(prefix)]


class IPAdapter(nn.Module):
    def __init__(self, resampler: Resampler, layers: dict[str, tuple[torch.Tensor, torch.Tensor]]):
        super().__init__()
        self.resampler = resampler
        self.names = list(layers)
        # buffers, so .to(device, dtype) moves them with the Resampler
        for i, (k, v) in enumerate(layers.values()):
            self.register_buffer(f"k_ip_{i}", k)
            self.register_buffer(f"v_ip_{i}", v)

    @property
    def layers(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {name: (getattr(self, f"k_ip_{i}"), getattr(self, f"v_ip_{i}")) for i, name in enumerate(self.names)}

    @torch.no_grad()
    def tokens(self, embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw ArcFace embedding -> (cond tokens, uncond tokens), each (1, 16, D); the uncond
        tokens are the Resampler applied to zeros, as InstantID's pipeline builds its negative."""
        param = self.resampler.latents
        emb = torch.as_tensor(embedding).to(param.device, param.dtype).reshape(1, -1, FACE_EMBEDDING_DIM)
        return self.resampler(emb), self.resampler(torch.zeros_like(emb))


def _read(path: str) -> tuple[dict, dict]:
    try:
        if path.endswith(".safetensors"):
            flat = load_file(path)
            state = {part: {k[len(part) + 1:]: v for k, v in flat.items() if k.startswith(part + ".")}
                     for part in ("image_proj", "ip_adapter")}
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:   # a broken or foreign file: say which one
        raise ModelFileError(f"{path}: cannot be read as an IP-Adapter ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict) or not state.get("image_proj") or not state.get("ip_adapter"):
        raise ModelFileError(f"{path}: not an IP-Adapter (it has no 'image_proj' and 'ip_adapter' weights)")
    return state["image_proj"], state["ip_adapter"]


def load_ip_adapter(path: str, unet: nn.Module) -> IPAdapter:
    """InstantID's ip-adapter.bin (a torch pickle {"image_proj": ..., "ip_adapter": ...}) or the
    same as .safetensors ("image_proj.*", "ip_adapter.*"), fitted to this UNet's cross-attentions."""
    name = os.path.basename(path)
    image_proj, ip_layers = _read(path)
    if "latents" not in image_proj:
        raise ModelFileError(f"{path}: not InstantID's IP-Adapter (its image projection is not a Resampler)")
    try:
        resampler = resampler_from_state_dict(image_proj)
    except (KeyError, ValueError, RuntimeError) as exc:
        raise ModelFileError(f"{path}: its Resampler weights are incomplete or misshapen ({exc})") from exc
    if resampler.embedding_dim != FACE_EMBEDDING_DIM:
        raise ModelFileError(f"{path}: not InstantID's IP-Adapter (its Resampler takes {resampler.embedding_dim}-d "
                             f"input, not a {FACE_EMBEDDING_DIM}-d face embedding)")
    modules = dict(unet.named_modules())
    targets = cross_attention_names(unet)
    count = sum(1 for k in ip_layers if k.endswith(".to_k_ip.weight"))
    if not count:
        raise ModelFileError(f"{path}: not an IP-Adapter (its 'ip_adapter' part has no to_k_ip layers)")
    if count != len(targets):
        raise ModelFileError(f"{name} does not fit this model: it has {count} cross-attention layers, the UNet has "
                             f"{len(targets)} (InstantID is for SDXL, which has 70) ({path})")
    layers = {}
    for n, target in enumerate(targets):
        key = f"{2 * n + 1}"
        k, v = ip_layers.get(f"{key}.to_k_ip.weight"), ip_layers.get(f"{key}.to_v_ip.weight")
        want = tuple(modules[target].to_k.weight.shape)
        if k is None or v is None:
            raise ModelFileError(f"{path}: layer {key} (to_k_ip/to_v_ip) is missing")
        if tuple(k.shape) != want or tuple(v.shape) != tuple(modules[target].to_v.weight.shape):
            raise ModelFileError(f"{name} does not fit this model: layer {key} is {tuple(k.shape)}, the UNet's "
                                 f"{target} is {want} ({path})")
        layers[target] = (k.float(), v.float())
    if resampler.output_dim != want[1]:
        raise ModelFileError(f"{name} does not fit this model: its tokens are {resampler.output_dim}-d, the "
                             f"UNet's context is {want[1]}-d ({path})")
    return IPAdapter(resampler.float(), layers).eval()
