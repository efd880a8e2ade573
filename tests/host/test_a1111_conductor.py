"""Conductor mode (`"mode": "conductor"`: one pass, the concepts injected into the base rows'
decoder attention) through the A1111 host glue, driven as in test_a1111_flow.py: every sampler
family, batched or split host calls, batches, failure, automatic regions and the hires pass.
The UNet, k-diffusion and the LoRA files are real."""

import pytest
import torch

import test_a1111_flow as flow
from a1111like import SAMPLERS
from lib_mc.methods.conductor import ConductorSession
from test_a1111_flow import drawn_plan, first_pass_with_state, generate, hires, host_options, world  # noqa: F401
from test_a1111_regional import Fail, counted, planted_auto_plan, spy, unpatched  # noqa: F401
from tinyhost import TinyLDM


def conductor_plan(world, **options):
    return drawn_plan(world, start_at=options.pop("start_at", 0.0), mask_refine=False, **options)


def test_every_sampler_family_conducts_at_one_branch_row_per_concept(world):
    for name in SAMPLERS:
        (plain, _), plain_rows = counted(world["unet"], lambda: generate(world, sampler=name, batch=1, steps=2))
        (out, session), rows = counted(world["unet"], lambda: generate(world, conductor_plan(world), sampler=name,
                                                                       batch=1, steps=2, mode="conductor"))
        assert isinstance(session, ConductorSession), name
        assert torch.isfinite(out).all(), name
        assert not torch.allclose(out, plain, atol=1e-3), name
        assert rows == 3 * plain_rows and session.stats.unet_rows == rows, (name, rows, plain_rows)   # base + 2


def test_conductor_with_start_at_end_is_the_plain_image(world):
    for name in ("Euler a", "DPM++ 2M"):
        plain, _ = generate(world, sampler=name)
        again, session = generate(world, conductor_plan(world, start_at=1.0), sampler=name, mode="conductor")
        assert torch.equal(plain, again), name
        assert session.stats.unet_rows > 0


@pytest.mark.parametrize("how", [dict(split=True), dict(s_min_uncond=100.0, split=True), dict(long_negative=True)])
def test_conductor_image_does_not_depend_on_how_the_host_batches_its_calls(world, how):
    """Batch of 2, the host's calls batched [cond, uncond] or apart (Batch cond/uncond off, Negative
    Guidance minimum sigma's cond-only steps, a 2-chunk negative)."""
    base = dict(how, split=False, long_negative=how.get("long_negative", False))
    batched, _ = generate(world, conductor_plan(world), mode="conductor", **base)
    split, session = generate(world, conductor_plan(world), mode="conductor", **how)
    scale = float(batched.abs().max())
    assert torch.allclose(batched, split, rtol=1e-4, atol=1e-4 * scale), (batched - split).abs().max()
    plain, _ = generate(world, **base)
    assert not torch.allclose(batched, plain, atol=1e-2)


def test_a_row_cap_gives_the_one_call_image(world):
    whole, _ = generate(world, conductor_plan(world), mode="conductor")
    capped, _ = generate(world, conductor_plan(world, max_rows_per_call=4), mode="conductor")
    assert torch.allclose(whole, capped, rtol=1e-4, atol=1e-4 * float(whole.abs().max()))


def test_a_run_that_fails_leaves_the_host_as_it_was(world, spy):
    plain, _ = generate(world)
    calls = []

    def hook(module, args, kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise Fail("the 3rd UNet call fails")
    handle = world["unet"].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with pytest.raises(Fail):
            generate(world, conductor_plan(world), mode="conductor")
    finally:
        handle.remove()
    unpatched(world, spy[-1]["p"].sampler)
    again, _ = generate(world)
    assert torch.equal(again, plain)


def test_automatic_regions_are_found_at_the_start_step_in_one_pass(world, spy):
    from modules import shared
    shared.opts.multi_concept_sam_model = "auto"
    unet, plan = planted_auto_plan()
    plan.options.mask_refine = False
    planted = dict(world, unet=unet, ldm=TinyLDM(unet))
    (plain, _), plain_rows = counted(unet, lambda: generate(planted))
    (out, session), rows = counted(unet, lambda: generate(planted, plan, mode="conductor"))
    found = plan.found_masks
    assert found is not None and found.shape[:2] == (2, 2)
    steps_before = plan.start_step(4)
    assert rows == plain_rows // 4 * (steps_before + 3 * (4 - steps_before))   # plain steps, then base + 2 concepts
    assert torch.isfinite(out).all() and not torch.allclose(out, plain, atol=1e-3)


def test_hires_pass_conducts_in_the_upscaled_regions(world):
    plan = conductor_plan(world)
    first, state = first_pass_with_state(world, plan, mode="conductor")
    plain, plain_rows = counted(world["unet"], lambda: hires(world, first))
    conducted, rows = counted(world["unet"], lambda: hires(world, first, (state, plan)))
    assert rows == 3 * plain_rows
    assert not torch.allclose(conducted, plain, atol=1e-3)
    assert torch.equal(hires(world, first, (state, plan), hires_loras=False), plain)
    assert torch.equal(hires(world, first), plain)
