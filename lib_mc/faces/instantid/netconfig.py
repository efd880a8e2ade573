"""The IdentityNet's sizes, read from its state dict (diffusers' key names); what the tensors
cannot tell (heads, norms, the sinusoid) comes from diffusers' config.json when there is one,
else SDXL's values."""

from __future__ import annotations

import re
from dataclasses import dataclass

HEAD_CHANNELS = 64   # SDXL's attention heads are 64 wide (config: 5, 10, 20 heads for 320, 640, 1280)


@dataclass
class NetConfig:
    in_channels: int
    channels: tuple[int, ...]          # per down block
    layers: int                        # ResnetBlocks per down block
    depths: tuple[int, ...]            # transformer blocks per down block (0: a DownBlock2D)
    mid_depth: int
    heads: tuple[int, ...]
    context_dim: int
    adm_dim: int                       # the `y` vector (SDXL: 2816)
    linear: bool                       # linear proj_in/out (SDXL) or 1x1 convs
    hint_channels: int
    hint_embedding: tuple[int, ...]
    groups: int = 32
    eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    bgr: bool = False


def _count(state, prefix: str) -> int:
    found = {int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(found) + 1 if found else 0


def config_from_state(state: dict, settings: dict | None = None, head_channels: int = HEAD_CHANNELS) -> NetConfig:
    """Sizes from the tensors; what they cannot tell (heads, norms, sinusoid) from diffusers'
    config.json when there is one, else SDXL's."""
    settings = settings or {}
    blocks = _count(state, "down_blocks.")
    channels = tuple(state[f"down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in range(blocks))
    depths = tuple(_count(state, f"down_blocks.{i}.attentions.0.transformer_blocks.") for i in range(blocks))
    heads = settings.get("num_attention_heads") or settings.get("attention_head_dim")
    heads = tuple(c // head_channels for c in channels) if heads is None else heads
    hint = [state["controlnet_cond_embedding.conv_in.weight"].shape[0]]
    hint += [state[f"controlnet_cond_embedding.blocks.{i}.weight"].shape[0]
             for i in range(1, _count(state, "controlnet_cond_embedding.blocks."), 2)]
    context = next(v.shape[1] for k, v in state.items() if k.endswith("attn2.to_k.weight"))
    heads = (heads,) * blocks if isinstance(heads, int) else tuple(heads)
    if any(d and (h < 1 or c % h) for c, d, h in zip(channels, depths, heads)):
        raise ValueError(f"{heads} attention heads do not split widths {channels}")
    return NetConfig(
        in_channels=state["conv_in.weight"].shape[1], channels=channels, layers=_count(state, "down_blocks.0.resnets."),
        depths=depths, mid_depth=_count(state, "mid_block.attentions.0.transformer_blocks."),
        heads=heads, context_dim=context,
        adm_dim=state["add_embedding.linear_1.weight"].shape[1],
        linear=state["mid_block.attentions.0.proj_in.weight"].dim() == 2,
        hint_channels=state["controlnet_cond_embedding.conv_in.weight"].shape[1], hint_embedding=tuple(hint),
        groups=settings.get("norm_num_groups", 32), eps=settings.get("norm_eps", 1e-5),
        flip_sin_to_cos=settings.get("flip_sin_to_cos", True), freq_shift=settings.get("freq_shift", 0),
        bgr=settings.get("controlnet_conditioning_channel_order", "rgb") == "bgr")
