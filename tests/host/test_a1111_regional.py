"""Regional mode (`"mode": "regional"`: every concept in ONE pass of the host's sampler) through
the A1111 host glue, driven as in test_a1111_flow.py (whose helpers these tests reuse): every
sampler family, batched or split host calls, failure and interrupt, automatic regions,
latent re-initialisation and the hires pass. The UNet, k-diffusion and the LoRA files are real."""

import pytest
import torch
from modules import shared

import test_a1111_flow as flow
from a1111like import SAMPLERS, A1111Sampler
from lib_mc.hosts import webui
from lib_mc.methods.regional import RegionalSession
from lib_mc.plan import build_plan
from planted import PlantedQuery, cells, covers, plant
from test_a1111_flow import IMAGE, column, drawn_plan, first_pass_with_state, generate, hires, host_options, world  # noqa: F401
from tinyhost import TinyLDM, count_unet_rows, make_unet


class SpySampler(A1111Sampler):
    """A1111's sampler, recording each run: the host's `p`, the initial noise it was given and the
    ancestral noise it drew."""
    runs: list = []

    def sample(self, p, x, *args, **kwargs):
        SpySampler.runs.append(dict(p=p, x=x.clone(), drawn=[]))
        return super().sample(p, x, *args, **kwargs)

    def _run(self, p, x, sigmas, *args):
        if self.ancestral:
            run, rng = SpySampler.runs[-1], p.rng

            class Recording:   # p.rng as this run's sampler sees it (the glue replaces p.rng between runs)
                def next(self):
                    noise = rng.next()
                    run["drawn"].append(noise.clone())
                    return noise
            p.rng = Recording()
            try:
                return super()._run(p, x, sigmas, *args)
            finally:
                if isinstance(p.rng, Recording):
                    p.rng = rng
        return super()._run(p, x, sigmas, *args)


@pytest.fixture
def spy(monkeypatch):
    SpySampler.runs = []
    monkeypatch.setattr(flow, "A1111Sampler", SpySampler)
    return SpySampler.runs


class RegionQuery(PlantedQuery):
    """Planted queries for regional mode, whose cross-attention branches run the layer on a region's
    tokens only (after the whole grid): those calls get the layer's own queries."""

    def forward(self, x):
        self.grid_tokens = max(getattr(self, "grid_tokens", 0), x.shape[1])
        return super().forward(x) if x.shape[1] == self.grid_tokens else self.inner(x)


def regional_queries(unet):
    for module in unet.modules():
        if isinstance(module, PlantedQuery):
            module.__class__ = RegionQuery
    return unet


def planted_auto_plan():
    """test_a1111_flow's planted automatic job (word A left, B right in image 0; swapped in image 1)."""
    unet, plan = flow.planted_auto_plan()
    return regional_queries(unet), plan


def counted(unet, run):
    rows = count_unet_rows(unet)
    try:
        out = run()
    finally:
        rows.remove()
    return out, rows.count


def regional_plan(world, **options):
    return drawn_plan(world, start_at=options.pop("start_at", 0.0), **options)


# ---- 1. every sampler family ---------------------------------------------------------------------

def test_every_sampler_family_samples_regionally_at_plain_cost(world):
    for name in SAMPLERS:
        (plain, _), plain_rows = counted(world["unet"], lambda: generate(world, sampler=name, batch=1, steps=2))
        (out, session), rows = counted(world["unet"], lambda: generate(world, regional_plan(world), sampler=name,
                                                                       batch=1, steps=2, mode="regional"))
        assert isinstance(session, RegionalSession), name
        assert torch.isfinite(out).all(), name
        assert not torch.allclose(out, plain, atol=1e-3), name
        assert rows == plain_rows and session.stats.unet_rows == plain_rows, (name, rows, plain_rows)


# ---- 2. the host's call layout does not matter ---------------------------------------------------

@pytest.mark.parametrize("how", [dict(split=True), dict(s_min_uncond=100.0, split=True)])
def test_regional_image_does_not_depend_on_how_the_host_batches_its_calls(world, how):
    """Concept prompts of 12 (alice) and 8 tokens; the host's calls batched [cond, uncond], or
    cond-only and uncond-only calls (Batch cond/uncond off), with or without the cond-only steps
    of Negative Guidance minimum sigma. (A 2-chunk negative makes separate calls whether Batch
    cond/uncond is on or off, in A1111 as here: that is the split layout, with a longer negative.)"""
    batched, _ = generate(world, regional_plan(world), mode="regional", **dict(how, split=False))
    split, session = generate(world, regional_plan(world), mode="regional", **how)
    # the host's own plain images differ by ~1.5e-4 batched vs split (latents up to ~40): 1e-4 of the range
    assert torch.allclose(batched, split, rtol=1e-4, atol=1e-4 * float(batched.abs().max())), \
        (batched - split).abs().max()
    plain, _ = generate(world, **dict(how, split=False))
    assert not torch.allclose(batched, plain, atol=1e-2)


def test_a_negative_longer_than_every_concept_prompt_samples_regionally(world):
    """A 2-chunk negative (17 tokens): the uncond-only calls are longer than every concept prompt,
    the cond-only ones are not; the concepts act, at plain cost."""
    (plain, _), plain_rows = counted(world["unet"], lambda: generate(world, long_negative=True))
    (out, session), rows = counted(world["unet"], lambda: generate(world, regional_plan(world), mode="regional",
                                                                   long_negative=True))
    assert rows == plain_rows and torch.isfinite(out).all() and not torch.allclose(out, plain, atol=1e-2)


# ---- 3. start_at 1, failure and interrupt ----------------------------------------------------------

def unpatched(world, sampler) -> None:
    patched = [name for name, m in world["unet"].named_modules() if "forward" in vars(m)]
    assert not patched, patched
    cfg = sampler.model_wrap_cfg
    assert "sample" not in vars(sampler) and "sample_img2img" not in vars(sampler)
    assert "forward" not in vars(cfg) and "forward" not in vars(cfg.inner_model)


def test_regional_with_start_at_end_is_the_plain_image(world):
    for name in ("Euler a", "DPM++ 2M"):
        plain, _ = generate(world, sampler=name)
        again, session = generate(world, regional_plan(world, start_at=1.0), sampler=name, mode="regional")
        assert torch.equal(plain, again), name
        assert session.stats.unet_rows > 0


class Fail(Exception):
    pass


@pytest.mark.parametrize("how", ["raises", "interrupted"])
def test_a_run_that_fails_or_is_interrupted_leaves_the_host_as_it_was(world, spy, how):
    """A model call that raises on the 3rd UNet call (inside the regional pass), or the user's
    interrupt during the re-initialisation probe: no instance patch stays on the UNet, the
    sampler or the CFG denoiser, and the next plain generation is the plain image bit for bit."""
    plain, _ = generate(world)
    calls = []

    def hook(module, args, kwargs):
        calls.append(1)
        if how == "raises" and len(calls) == 3:
            raise Fail("the 3rd UNet call fails")
        if how == "interrupted":
            shared.state.interrupted = True
    handle = world["unet"].register_forward_pre_hook(hook, with_kwargs=True)
    plan = regional_plan(world, reinit=True)
    for concept, token in zip(plan.concepts, (2, 5)):
        concept.class_tokens = [token]
    try:
        if how == "raises":
            with pytest.raises(Fail):
                generate(world, plan, mode="regional")
        else:
            generate(world, plan, mode="regional")
    finally:
        handle.remove()
        shared.state.interrupted = False
    assert len(calls) == (3 if how == "raises" else 1)
    unpatched(world, spy[-1]["p"].sampler)
    again, _ = generate(world)
    assert torch.equal(again, plain)


# ---- 4. automatic regions in the same pass ---------------------------------------------------------

def test_automatic_regions_are_found_and_act_in_one_pass(world, spy):
    shared.opts.multi_concept_sam_model = "auto"   # no SAM checkpoint here: the attention masks, with a note
    unet, plan = planted_auto_plan()
    planted = dict(world, unet=unet, ldm=TinyLDM(unet))
    (plain, _), plain_rows = counted(unet, lambda: generate(planted))
    (out, session), rows = counted(unet, lambda: generate(planted, plan, mode="regional"))
    assert rows == plain_rows   # no layout pass: the plain steps record, the rest are regional
    found = plan.found_masks
    assert found is not None and found.shape[:2] == (2, 2)
    assert covers(found[0, 0], cells(3, 1, 13, 6)) and covers(found[0, 1], cells(2, 10, 12, 15))
    assert covers(found[1, 0], cells(2, 10, 12, 15)) and covers(found[1, 1], cells(3, 1, 13, 6))
    assert torch.isfinite(out).all() and not torch.allclose(out, plain, atol=1e-3)
    p = spy[-1]["p"]
    assert "automatic regions: no SAM checkpoint" in p.extra_generation_params[webui.WARNINGS_KEY]
    assert p._multi_concept.prepared.warnings == [p.extra_generation_params[webui.WARNINGS_KEY]]
    assert set(p._multi_concept.found) == {0, 1}   # the found masks kept for the infotext


# ---- 5. latent re-initialisation ---------------------------------------------------------------------

def reinit_world(world):
    """Class words planted so that alice's (token 2) attends most to latent columns 8-11 and bob's
    (token 5) to columns 4-7, while alice's region is columns 0-3 and bob's 12-15."""
    unet = regional_queries(plant(make_unet(), [2, 5], [[cells(0, 8, 16, 12), cells(0, 4, 16, 8)]] * 2))
    plan = build_plan([
        dict(name="alice", cond=world["alice_cond"], mask=column(0, 32), class_tokens=[2]),
        dict(name="bob", cond=world["bob_cond"], mask=column(96, 128), class_tokens=[5]),
    ], IMAGE, start_at=0.0, reinit=True)
    return dict(world, unet=unet, ldm=TinyLDM(unet)), plan


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M"])
def test_reinitialisation_probes_once_then_samples_from_the_moved_noise(world, spy, sampler):
    planted, plan = reinit_world(world)
    (plain, _), plain_rows = counted(planted["unet"], lambda: generate(planted, sampler=sampler))
    plain_run = spy[-1]
    (out, session), rows = counted(planted["unet"], lambda: generate(planted, plan, sampler=sampler, mode="regional"))
    assert torch.isfinite(out).all()
    assert rows == plain_rows + 2 and session.stats.probe_rows == 2   # one probe call: the 2 cond rows
    probe, real = spy[-2:]
    assert torch.equal(probe["x"], plain_run["x"]) and probe["drawn"] == []   # aborted at its first call
    # the real pass: each concept's box holds the noise where its word attends most, renormalised
    x = probe["x"]
    moved = torch.cat([x[..., 8:12], x[..., 4:12], x[..., 4:8]], -1)
    for b in range(x.shape[0]):
        expected = (moved[b] - moved[b].mean()) / moved[b].std() * x[b].std() + x[b].mean()
        assert torch.allclose(real["x"][b], expected, atol=1e-5), b
    # and the same ancestral noise as a plain run
    assert len(real["drawn"]) == len(plain_run["drawn"])
    assert all(torch.equal(a, b) for a, b in zip(real["drawn"], plain_run["drawn"]))


# ---- 6. the hires pass ---------------------------------------------------------------------------------

def test_hires_pass_in_regional_mode_acts_in_the_upscaled_regions_at_plain_cost(world):
    plan = regional_plan(world)
    first, state = first_pass_with_state(world, plan, mode="regional")
    assert isinstance(state.session, RegionalSession)
    plain, plain_rows = counted(world["unet"], lambda: hires(world, first))
    with_concepts, rows = counted(world["unet"], lambda: hires(world, first, (state, plan)))
    assert isinstance(state.session, RegionalSession) and state.session.plan.image_size == (256, 256)
    assert rows == plain_rows == 3 * 2 * 2   # 3 hires steps, cond and uncond, batch 2: no concept rows
    assert with_concepts.shape == plain.shape and torch.isfinite(with_concepts).all()
    change = (with_concepts - plain).abs().mean(dim=(0, 1, 2))   # per latent column (32 wide)
    assert change[:12].mean() > 0.01 and change[19:].mean() > 0.01   # alice left, bob right
    # off: the hires pass is plain, bit for bit; and the host is left as it was
    assert torch.equal(hires(world, first, (state, plan), hires_loras=False), plain)
    assert torch.equal(hires(world, first), plain)
