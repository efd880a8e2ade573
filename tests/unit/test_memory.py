"""lib_mc/memory.py: the per-row activation estimate against the real ldm UNet's allocations, the
documented formula at SD1.5 and SDXL sizes, and the rows that fit."""

import types

import pytest
import torch
from ldm.modules.attention import CrossAttention
from torch.profiler import ProfilerActivity, profile

from benchmark import sdp_attention_forward
from lib_mc.memory import GIB, SHAPES, UNetShape, estimate_bytes_per_row, rows_that_fit
from tinyhost import CONTEXT_DIM, make_unet

MIB = 2 ** 20


def peak_bytes(unet, rows: int, side: int) -> int:
    """Peak of the CPU allocator's live bytes during one call, replayed from its allocation events."""
    x, t = torch.randn(rows, 4, side, side), torch.full((rows,), 500.0)
    context = torch.randn(rows, 8, CONTEXT_DIM)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        unet(x, t, context=context)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_us()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def tiny_unet(res_blocks: int, sdp: bool):
    unet = make_unet(num_res_blocks=res_blocks).eval()
    if sdp:   # per instance, as A1111's sdp option acts, without touching the class other tests use
        for module in unet.modules():
            if isinstance(module, CrossAttention):
                module.forward = types.MethodType(sdp_attention_forward, module)
    shape = UNetShape(unet.model_channels, tuple(unet.channel_mult), res_blocks, (1, 1, 1, 0))
    return unet, shape


@pytest.mark.parametrize("res_blocks, side", [(1, 16), (2, 24)])
def test_estimate_matches_the_allocations_one_more_row_adds_to_a_real_unet_call(res_blocks, side):
    unet, shape = tiny_unet(res_blocks, sdp=True)
    measured = (peak_bytes(unet, 3, side) - peak_bytes(unet, 1, side)) / 2
    estimated = estimate_bytes_per_row(shape, (side, side), dtype_bytes=4)
    assert 0.95 < measured / estimated < 1.15   # measured 1.05-1.09x at 16-48 latent cells a side


def test_the_estimate_assumes_sdp_attention_without_it_the_scores_dominate():
    unet, shape = tiny_unet(1, sdp=False)   # ldm's einsum attention keeps n x n scores per head
    measured = (peak_bytes(unet, 3, 32) - peak_bytes(unet, 1, 32)) / 2
    assert measured > 3 * estimate_bytes_per_row(shape, (32, 32), dtype_bytes=4)


def test_the_documented_formula_at_sd15_and_sdxl_sizes():
    # SD1.5 512x512 (latent 64x64, C = 320, n0 = 4096): skips 5.0625 C n0 (conv_in 1, level 0
    # 2 + downsample 1/4, level 1 2*2/4 + 2/16, level 2 2*4/16 + 4/64, level 3 2*4/64) and the
    # level-0 feed-forward 19 C n0
    c_n0 = 320 * 64 * 64
    assert estimate_bytes_per_row("sd1", (64, 64)) == (5.0625 + 19) * c_n0 * 2
    assert estimate_bytes_per_row("sd2", (64, 64), dtype_bytes=4) == (5.0625 + 19) * c_n0 * 4
    # SDXL 1024x1024 (latent 128x128): skips 4.875 C n0; no attention at level 0, so the largest
    # block is level 1's transformer, 19 * 2C * n0/4 = 9.5 C n0 (level 0's decoder res block: 9 C n0)
    c_n0 = 320 * 128 * 128
    assert estimate_bytes_per_row("sdxl", (128, 128)) == (4.875 + 9.5) * c_n0 * 2
    assert 140 * MIB < estimate_bytes_per_row("sdxl", (128, 128)) < 150 * MIB
    # linear in the latent's area, for non-square latents too
    assert estimate_bytes_per_row("sdxl", (128, 96)) * 4 == estimate_bytes_per_row("sdxl", (256, 192))
    assert set(SHAPES) == {"sd1", "sd2", "sdxl"}


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="unknown UNet architecture 'flux'; known: sd1, sd2, sdxl"):
        estimate_bytes_per_row("flux", (64, 64))
    with pytest.raises(ValueError, match="latent size must be positive"):
        estimate_bytes_per_row("sd1", (0, 64))
    with pytest.raises(ValueError, match="bytes_per_row must be positive"):
        rows_that_fit(GIB, 0)


def test_rows_that_fit_keep_the_reserve_aside():
    assert rows_that_fit(5 * GIB, 150 * MIB) == 4 * GIB // (150 * MIB) == 27   # default reserve 1 GiB
    assert rows_that_fit(5 * GIB, 150 * MIB, reserve_bytes=0) == 34
    assert rows_that_fit(GIB + 150 * MIB - 1, 150 * MIB) == 0   # not even one row
    assert rows_that_fit(GIB // 2, 150 * MIB) == 0              # less free than the reserve
