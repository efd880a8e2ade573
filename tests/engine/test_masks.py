"""Region weights: grids the real UNet uses at odd sizes, normalisation, order and feather."""

import pytest
import torch

from lib_mc.errors import PlanError
from lib_mc.masks import RegionWeights, check_mask, grid_sizes, latent_size
from tinyhost import make_unet


def attention_token_counts(unet, latent_hw):
    """Token counts every attention module sees on the UNet's down path at this latent size.

    (ldm's up path cannot concatenate odd sizes; A1111 patches that, and its grids are these.)"""
    seen = set()
    handles = [m.register_forward_pre_hook(lambda mod, args: seen.add(args[0].shape[1]))
               for name, m in unet.named_modules() if name.endswith(("attn1", "attn2"))]
    cheap = {}
    for name, m in unet.named_modules():   # keep attention cheap at 15k tokens: shapes are all we need
        if name.endswith(("attn1", "attn2")):
            cheap[m] = m.forward
            m.forward = lambda x, context=None, mask=None: torch.zeros_like(x)
    try:
        with torch.no_grad():
            from ldm.modules.diffusionmodules.util import timestep_embedding
            h = torch.zeros((1, 4) + tuple(latent_hw))
            emb = unet.time_embed(timestep_embedding(torch.tensor([10]), unet.model_channels))
            context = torch.zeros(1, 8, 32)
            for block in unet.input_blocks:
                h = block(h, emb, context)
            unet.middle_block(h, emb, context)
    finally:
        for h in handles:
            h.remove()
        for m in cheap:
            del m.forward
    return seen


@pytest.mark.parametrize("image, latent, grids", [
    ((600, 808), (75, 101), [(75, 101), (38, 51), (19, 26), (10, 13)]),
    ((832, 1216), (104, 152), [(104, 152), (52, 76), (26, 38), (13, 19)]),
])
def test_odd_sizes_map_to_the_grids_the_unet_attends_at(image, latent, grids):
    unet = make_unet(attention_resolutions=(1, 2, 4, 8))
    assert latent_size(image) == latent
    assert grid_sizes(latent) == grids
    mask = torch.zeros(image)
    mask[:, : image[1] // 2] = 1
    weights = RegionWeights([mask], image)
    seen = attention_token_counts(unet, latent)
    assert seen == {h * w for h, w in grids}
    for tokens in seen:
        per_token = weights.at_tokens(tokens)
        assert per_token.shape == (2, tokens)
        torch.testing.assert_close(per_token.sum(0), torch.ones(tokens))
        # the left half is the concept at every grid: first column 1, last column 0
        h, w = weights.grid_for_tokens(tokens)
        grid = per_token[1].view(h, w)
        assert grid[:, 0].min() == 1 and grid[:, -1].max() == 0


def test_overlaps_never_add_up_and_later_concepts_sit_in_front():
    a = torch.zeros(64, 64)
    a[:, :40] = 1
    b = torch.zeros(64, 64)
    b[:, 24:] = 1
    weights = RegionWeights([a, b], (64, 64)).latent      # 8 x 8: overlap in latent columns 3-4
    torch.testing.assert_close(weights.sum(0), torch.ones(8, 8))
    assert weights[2, :, 3:].min() == 1 and weights[1, :, 3:].max() == 0   # b in front
    assert weights[1, :, :3].min() == 1 and weights[0].max() == 0
    behind = RegionWeights([a, b], (64, 64), back_to_front=[1, 0]).latent   # a in front
    assert behind[1, :, :5].min() == 1 and behind[2, :, :5].max() == 0


def test_soft_masks_and_feather_still_sum_to_one():
    gen = torch.Generator().manual_seed(0)
    masks = [torch.rand(100, 76, generator=gen) for _ in range(3)]
    hard = torch.zeros(96, 80)
    hard[20:70, 10:50] = 1
    for feather in (0.0, 6.0):
        weights = RegionWeights(masks + [hard], (96, 80), feather_px=feather)
        torch.testing.assert_close(weights.latent.sum(0), torch.ones(12, 10))
        assert weights.latent.min() >= 0
    sharp = RegionWeights([hard], (96, 80)).latent[1]
    soft = RegionWeights([hard], (96, 80), feather_px=12).latent[1]
    assert ((soft > 0) & (soft < 1)).sum() > ((sharp > 0) & (sharp < 1)).sum()


def test_masks_of_another_size_are_resized_to_the_image():
    small = torch.zeros(32, 32, dtype=torch.bool)
    small[:, :16] = True
    weights = RegionWeights([small], (128, 256)).latent
    assert weights.shape == (2, 16, 32)
    assert weights[1, :, :16].min() == 1 and weights[1, :, 16:].max() == 0


@pytest.mark.parametrize("mask, problem", [
    (torch.zeros(8, 8), "all zero"),
    (torch.ones(2, 8, 8), "2-D"),
    (torch.ones(8), "2-D"),
    (torch.zeros(0, 8), "empty"),
    (torch.full((8, 8), 2.0), r"\[0, 1\]"),
    (torch.full((8, 8), float("nan")), "NaN"),
    ("left half", "not an array"),
])
def test_bad_masks_are_named(mask, problem):
    with pytest.raises(PlanError, match=problem) as err:
        check_mask(mask, "concepts[1].mask")
    assert str(err.value).startswith("concepts[1].mask")


def test_uint8_and_channel_masks_are_accepted():
    m = torch.zeros(1, 8, 8, dtype=torch.uint8)
    m[..., :4] = 255
    assert check_mask(m, "m").max() == 1
    assert check_mask(m.permute(1, 2, 0), "m").shape == (8, 8)
