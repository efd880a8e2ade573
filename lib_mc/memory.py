"""How many UNet rows fit in one call: the activation memory of one batch row, from the UNet's shape.

Every concept adds rows to the engine's batched UNet call (22 rows for 4 concepts, SDXL, batch 2),
so the rows per call must follow the free memory. Activation memory grows linearly with the rows:

    bytes_per_row = dtype_bytes * (S + W)

    S  the skip activations the encoder keeps for the decoder, all alive at the UNet's middle:
       conv_in's output (C x n0), each input block's output (c_l x n_l, num_res_blocks per
       level) and each downsample's output (c_l x n_(l+1))
    W  the largest working set of one block, over the levels l (c_l = C * mult_l channels,
       n_l = n0 / 4^l latent cells):
       - a transformer (SDP attention: no n x n scores are kept): 19 c_l n_l, the GEGLU
         feed-forward's 8c projection, 4c gelu(gate) and 4c product beside the block's input,
         its normed copy and the spatial transformer's residual input (3c);
       - a decoder res block: 3 (c_l + c_(l+1)) n_l, the concatenated skip and upsampled input,
         its GroupNorm and its SiLU.

Checked against measured peaks (tests/benchmark.py prints both; README "Cost"): SD1.5 512x512 in
fp16 on an H100, 60 MiB estimated against 66-74 MiB per added row in README's table (whose rows
also hold the engine's replay records); fp32 on a CPU, 1.00-1.09x (tests/unit/test_memory.py).
Weights, the sampler's latents and the allocator's slack are not per row: `reserve_bytes`.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2 ** 30
DEFAULT_RESERVE = GIB   # convolution/SDP workspaces, allocator fragmentation, latents and conditioning


@dataclass(frozen=True)
class UNetShape:
    channels: int                # model_channels (C)
    mult: tuple[int, ...]        # channel_mult, one per resolution level
    res_blocks: int              # num_res_blocks per level
    depth: tuple[int, ...]       # transformer blocks per level (0: no attention there)


SHAPES = {
    "sd1": UNetShape(320, (1, 2, 4, 4), 2, (1, 1, 1, 0)),
    "sd2": UNetShape(320, (1, 2, 4, 4), 2, (1, 1, 1, 0)),
    "sdxl": UNetShape(320, (1, 2, 4), 2, (0, 2, 10)),
}


def activation_elements(shape: UNetShape, latent_hw: tuple[int, int]) -> int:
    """S + W of the module docstring: tensor elements one batch row adds to a UNet call's peak."""
    h, w = latent_hw
    if h < 1 or w < 1:
        raise ValueError(f"latent size must be positive, got {latent_hw}")
    cells = [h * w / 4 ** level for level in range(len(shape.mult))]
    widths = [shape.channels * m for m in shape.mult]
    skips = shape.channels * cells[0] + sum(shape.res_blocks * c * n for c, n in zip(widths, cells))
    skips += sum(c * n for c, n in zip(widths[:-1], cells[1:]))   # downsample outputs
    work = 0.0
    for level, (c, n) in enumerate(zip(widths, cells)):
        below = widths[level + 1] if level + 1 < len(widths) else c
        work = max(work, 3 * (c + below) * n)
        if shape.depth[level]:
            work = max(work, 19 * c * n)
    return round(skips + work)


def estimate_bytes_per_row(arch: str | UNetShape, latent_hw: tuple[int, int], dtype_bytes: int = 2) -> int:
    """Peak activation bytes one more row adds to a UNet call (SDP attention; fp16 by default).

    arch: "sd1", "sd2", "sdxl" or a UNetShape; latent_hw: the latent's (height, width), image / 8."""
    shape = SHAPES.get(arch) if isinstance(arch, str) else arch
    if shape is None:
        raise ValueError(f"unknown UNet architecture {arch!r}; known: {', '.join(SHAPES)}")
    return activation_elements(shape, latent_hw) * dtype_bytes


def rows_that_fit(free_bytes: int, bytes_per_row: int, reserve_bytes: int = DEFAULT_RESERVE) -> int:
    """UNet rows per call that fit in `free_bytes` (free device memory with the model loaded),
    keeping `reserve_bytes` aside. 0 when not even one row fits."""
    if bytes_per_row <= 0:
        raise ValueError(f"bytes_per_row must be positive, got {bytes_per_row}")
    return max(0, (free_bytes - reserve_bytes) // bytes_per_row)
