"""The decoder self-attention layers Concept Conductor reads, found on any ldm / sgm / Forge UNet
(output_blocks of num_res_blocks + 1 blocks per level, deepest level first):

- layout alignment: SD1.5 output_blocks.3.1 (the first decoder block at latent / 4, 16x16 at
  512 px), SDXL output_blocks.1.1, transformer block 4 (latent / 4, 32x32 at 1024 px);
- mask refinement: SD1.5 output_blocks.8.1 (the last decoder block at latent / 2, 32x32 at
  512 px); SDXL the same place, output_blocks.5.1 (64x64 at 1024 px).

Smaller test UNets get the block at the same level and place, the transformer index clamped to
the blocks they have."""

from __future__ import annotations

from torch import nn


def _levels(unet: nn.Module) -> tuple[int, list[int]]:
    mult = list(getattr(unet, "channel_mult"))
    blocks = getattr(unet, "num_res_blocks")
    blocks = list(blocks) if isinstance(blocks, (list, tuple)) else [int(blocks)] * len(mult)
    return len(mult), blocks


def is_sdxl_like(unet: nn.Module) -> bool:
    """SDXL's UNet has three levels (SD1.5 / SD2: four)."""
    return _levels(unet)[0] == 3


def output_block(unet: nn.Module, level: int, place: int) -> int:
    """The index in output_blocks of block `place` (negative: from the end) of `level` (0: full
    latent resolution)."""
    count, blocks = _levels(unet)
    start = sum(blocks[lvl] + 1 for lvl in range(count - 1, level, -1))
    per_level = blocks[level] + 1
    return start + (place % per_level)


def self_attention(unet: nn.Module, block: int, transformer: int) -> tuple[str, nn.Module]:
    """(name, attn1 module) of transformer block `transformer` (clamped) in output block `block`."""
    container = unet.output_blocks[block]
    for name, child in container.named_modules():
        blocks = getattr(child, "transformer_blocks", None)
        if blocks is not None:
            index = min(transformer, len(blocks) - 1)
            prefix = f"output_blocks.{block}.{name}." if name else f"output_blocks.{block}."
            return f"{prefix}transformer_blocks.{index}.attn1", blocks[index].attn1
    raise ValueError(f"output_blocks.{block} of this UNet has no attention")


def alignment_layer(unet: nn.Module) -> tuple[str, nn.Module]:
    if is_sdxl_like(unet):
        return self_attention(unet, output_block(unet, 2, 1), 4)
    return self_attention(unet, output_block(unet, 2, 0), 0)


def refinement_layer(unet: nn.Module) -> tuple[str, nn.Module]:
    return self_attention(unet, output_block(unet, 1, -1), 0)


def decoder_attention(unet: nn.Module) -> dict[nn.Module, str]:
    """Every attention module of the decoder (attn1 and attn2 of output_blocks) -> its name."""
    return {m: name for name, m in unet.named_modules()
            if name.startswith("output_blocks") and name.endswith(("attn1", "attn2"))}
