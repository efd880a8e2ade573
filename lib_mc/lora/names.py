"""kohya layer keys -> module names of an ldm/sgm UNet.

kohya writes SD1.5 LoRAs with diffusers block names (`down_blocks_0_attentions_0`) and SDXL
LoRAs with the original ones (`input_blocks_4_1`); both are mapped, as A1111's Lora extension does.
"""

from __future__ import annotations

import re

import torch
from torch import nn

PREFIX = "lora_unet_"

_RESNET_PARTS = {
    "conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0", "norm2": "out_layers_0",
    "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection",
}


def _resnet(rest: str) -> str:
    for diffusers, ldm in _RESNET_PARTS.items():
        if rest == diffusers or rest.startswith(diffusers + "_"):
            return ldm + rest[len(diffusers):]
    return rest


def diffusers_to_ldm(key: str) -> list[str]:
    """Candidate ldm keys (without prefix) for a diffusers-style kohya key (without prefix)."""
    if m := re.fullmatch(r"down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "attentions":
            return [f"input_blocks_{1 + 3 * i + j}_1_{rest}"]
        return [f"input_blocks_{1 + 3 * i + j}_0_{_resnet(rest)}"]
    if m := re.fullmatch(r"down_blocks_(\d+)_downsamplers_0_conv", key):
        return [f"input_blocks_{3 + 3 * int(m[1])}_0_op"]
    if m := re.fullmatch(r"mid_block_(attentions|resnets)_(\d+)_(.+)", key):
        kind, j, rest = m[1], int(m[2]), m[3]
        if kind == "attentions":
            return [f"middle_block_1_{rest}"]
        return [f"middle_block_{2 * j}_{_resnet(rest)}"]
    if m := re.fullmatch(r"up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "attentions":
            return [f"output_blocks_{3 * i + j}_1_{rest}"]
        return [f"output_blocks_{3 * i + j}_0_{_resnet(rest)}"]
    if m := re.fullmatch(r"up_blocks_(\d+)_upsamplers_0_conv", key):
        i = int(m[1])  # the upsampler sits after the block's attention, if it has one
        return [f"output_blocks_{2 + 3 * i}_2_conv", f"output_blocks_{2 + 3 * i}_1_conv"]
    if m := re.fullmatch(r"time_embedding_linear_(\d+)", key):
        return [f"time_embed_{0 if m[1] == '1' else 2}"]
    simple = {"conv_in": "input_blocks_0_0", "conv_out": "out_2", "conv_norm_out": "out_0"}
    return [simple[key]] if key in simple else []


def is_linear(module: nn.Module) -> bool:
    """torch's Linear, or a host's own linear layer (Forge's `ForgeOperations.Linear` is a plain
    Module with a 2-D weight)."""
    if isinstance(module, nn.Linear):
        return True
    weight = getattr(module, "weight", None)
    return (not isinstance(module, nn.Conv2d) and isinstance(weight, torch.Tensor) and weight.dim() == 2
            and hasattr(module, "in_features"))


def is_norm(module: nn.Module) -> bool:
    """GroupNorm/LayerNorm (ldm's GroupNorm32 and Forge's own norms subclass them)."""
    return isinstance(module, (nn.GroupNorm, nn.LayerNorm))


def layer_modules(unet: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """kohya key -> (module name, module) for every Linear/Conv/norm layer of the UNet."""
    table = {}
    for name, module in unet.named_modules():
        if is_linear(module) or isinstance(module, nn.Conv2d) or is_norm(module):
            table[PREFIX + name.replace(".", "_")] = (name, module)
    return table


def resolve(key: str, table: dict[str, tuple[str, nn.Module]]) -> tuple[str, nn.Module] | None:
    if key in table:
        return table[key]
    for candidate in diffusers_to_ldm(key[len(PREFIX):]):
        if PREFIX + candidate in table:
            return table[PREFIX + candidate]
    return None
