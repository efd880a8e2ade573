"""The A1111 host glue (lib_mc/hosts/webui.py, a1111.py) driven the way A1111 calls it: its
`process_before_every_sampling` hook, its sampler object sampling twice, its CFG denoiser calling
the inner model in one batch or split (Batch cond/uncond off, a negative prompt of another
chunk count, Negative Guidance minimum sigma), every sampler family. The UNet, k-diffusion and
the LoRA files are real; A1111's CFG denoiser and RNG are its behaviour in miniature
(tests/a1111like.py, tests/hostlike/modules)."""

from types import SimpleNamespace

import pytest
import torch
from modules import shared

from a1111like import SAMPLERS, A1111Sampler, processing
from lib_mc.engine import MultiConceptSession
from lib_mc.errors import EngineError, MultiConceptError
from lib_mc.hosts import a1111, webui
from lib_mc.plan import build_plan
from planted import cells, covers, plant
from tinyhost import TinyLDM, count_unet_rows, make_unet, random_context, two_lora_world

IMAGE = (128, 128)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return two_lora_world(tmp_path_factory.mktemp("loras"))


@pytest.fixture(autouse=True)
def host_options():
    saved = dict(vars(shared.opts))
    yield shared.opts
    vars(shared.opts).update(saved)


def column(lo, hi):
    mask = torch.zeros(IMAGE)
    mask[:, lo:hi] = 1
    return mask


def drawn_plan(world, start_at=0.5, **options):
    return build_plan([
        dict(name="alice", cond=world["alice_cond"], loras=[(world["alice"], 0.8)], mask=column(0, 56)),
        dict(name="bob", cond=world["bob_cond"], loras=[(world["bob"], 1.0)], mask=column(72, 128)),
    ], IMAGE, start_at=start_at, **options)


def generate(world, plan=None, sampler="Euler a", batch=2, steps=4, seed=3, split=False, long_negative=False,
             s_min_uncond=0.0, between_stages=None, mode="blend"):
    """One txt2img batch as A1111 runs it: process_before_every_sampling, then sampler.sample.
    plan None: a plain generation. Returns (image latents, session)."""
    shared.opts.batch_cond_uncond = not split
    p = processing(*IMAGE[::-1], steps=steps, batch=batch, seed=seed, s_min_uncond=s_min_uncond)
    p.sd_model = SimpleNamespace(model=SimpleNamespace(diffusion_model=world["unet"]), is_sdxl=False)
    p.sampler = A1111Sampler(sampler, world["ldm"], shared.opts)
    state = None
    if plan is not None:
        state = webui.JobState(job=SimpleNamespace(save_layout=False, mode=mode))
        state.prepared = SimpleNamespace(plan=plan, warnings=[])
        p._multi_concept = state
        a1111.process_before_every_sampling(p)
        if between_stages is not None:
            stage2 = state.session.stage2
            state.session.stage2 = lambda: (between_stages(), stage2())[1]
    cond = world["cond"].expand(batch, -1, -1)
    # 2 chunks of negative prompt against 1 of prompt: A1111 makes separate cond and uncond calls
    uncond = (torch.cat([world["uncond"], random_context(9)], 1) if long_negative else world["uncond"]).expand(batch, -1, -1)
    out = p.sampler.sample(p, p.rng.next(), cond, uncond)
    return out, (state.session if state else None)


def test_two_stage_with_start_at_end_is_the_plain_image_for_every_sampler_family(world):
    """The second pass replays the first exactly (initial, ancestral and Brownian noise; every
    model call found in the record) for every sampler A1111 lists that runs here."""
    for name in SAMPLERS:
        plain, _ = generate(world, sampler=name)
        again, session = generate(world, drawn_plan(world, start_at=1.0), sampler=name)
        assert torch.equal(plain, again), name
        assert session.stats.replayed_calls > 0, name


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_family_blends(world, name):
    plain, _ = generate(world, sampler=name, steps=3)
    out, session = generate(world, drawn_plan(world), sampler=name, steps=3)
    assert torch.isfinite(out).all()
    assert not torch.allclose(out, plain, atol=1e-3)
    assert session.stats.unet_calls > 0


@pytest.mark.parametrize("how", [dict(split=True), dict(long_negative=True), dict(long_negative=True, split=True),
                                 dict(s_min_uncond=100.0)])
def test_drawn_regions_give_the_same_image_whether_the_host_batches_or_splits(world, how):
    batched, _ = generate(world, drawn_plan(world), s_min_uncond=how.get("s_min_uncond", 0.0),
                          long_negative=how.get("long_negative", False))
    split, session = generate(world, drawn_plan(world), **how)
    assert torch.allclose(batched, split, rtol=1e-4, atol=1e-4), (batched - split).abs().max()


def test_stage2_does_not_depend_on_the_call_layout_of_stage1(world):
    """Forge picks its cond/uncond batching from free memory at every step: the passes may
    split their calls differently. Stage 1 batched, stage 2 split (and the other way round)."""
    batched, _ = generate(world, drawn_plan(world))

    def split_now():
        shared.opts.batch_cond_uncond = False

    def batch_now():
        shared.opts.batch_cond_uncond = True
    changed, _ = generate(world, drawn_plan(world), between_stages=split_now)
    assert torch.allclose(batched, changed, rtol=1e-4, atol=1e-4)
    changed_back, _ = generate(world, drawn_plan(world), split=True, between_stages=batch_now)
    assert torch.allclose(batched, changed_back, rtol=1e-4, atol=1e-4)


def test_a_sampler_whose_calls_vary_is_refused_before_the_layout_pass(world):
    p = SimpleNamespace(prompt="a man", sampler_name="DPM adaptive", extra_generation_params={})
    webui.process(p, {"enabled": True, "concepts": [{"name": "a", "region": {"type": "rect", "w": 0.5}}]})
    assert "DPM adaptive" in str(p._multi_concept.error)
    # and the sampler call stops before any UNet work
    rows = count_unet_rows(world["unet"])
    try:
        q = processing(*IMAGE[::-1], steps=3)
        q.sd_model = SimpleNamespace(model=SimpleNamespace(diffusion_model=world["unet"]), is_sdxl=False)
        q.sampler = A1111Sampler("Euler", world["ldm"], shared.opts)
        q._multi_concept = p._multi_concept
        a1111.process_before_every_sampling(q)
        with pytest.raises(MultiConceptError, match="DPM adaptive"):
            q.sampler.sample(q, q.rng.next(), world["cond"], world["uncond"])
    finally:
        rows.remove()
    assert rows.count == 0


def test_stage2_making_calls_stage1_did_not_make_is_named(world):
    plan = drawn_plan(world)
    session = MultiConceptSession(world["unet"], plan)
    x, sigma = torch.zeros(2, 4, 16, 16), torch.full((2,), 1.0)
    cond = {"c_crossattn": torch.cat([world["cond"], world["uncond"]])}
    inner = A1111Sampler("Euler", world["ldm"], shared.opts).model_wrap_cfg.inner_model

    def model(xx, ss, cc):
        return inner(xx, ss, cond=cc)
    with session.stage1():
        session.denoise(model, x, sigma, cond, n_cond=1, step=0, total_steps=2)
    with session.stage2(), pytest.raises(EngineError, match="evaluation 2"):
        session.denoise(model, x, sigma, cond, n_cond=1, step=1, total_steps=2)


def planted_auto_plan():
    """Words A (token 2, left) and B (token 5, right) planted in a fresh UNet; two automatic concepts."""
    unet = plant(make_unet(), [2, 5], [[cells(3, 1, 13, 6), cells(2, 10, 12, 15)],
                                       [cells(2, 10, 12, 15), cells(3, 1, 13, 6)]])
    plan = build_plan([dict(name="a", cond=random_context(3), auto_tokens=[2]),
                       dict(name="b", cond=random_context(4), auto_tokens=[5])], IMAGE, start_at=0.5)
    return unet, plan


@pytest.mark.parametrize("how", [dict(split=True), dict(long_negative=True), dict(s_min_uncond=100.0)])
def test_automatic_regions_when_cond_and_uncond_are_separate_calls(world, how):
    """A1111 calls the UNet with cond rows only and uncond rows only: the attention recorder
    must skip the uncond-only calls and keep what it summed per image."""
    shared.opts.multi_concept_sam_model = "none"
    results = []
    # the same job batched (a 2-chunk negative is never batched: compared with itself split further)
    batched = dict(how, split=False) if how.get("long_negative") else dict(s_min_uncond=how.get("s_min_uncond", 0.0))
    for split in (batched, dict(how, split=True)):
        unet, plan = planted_auto_plan()
        planted_world = dict(world, unet=unet, ldm=TinyLDM(unet))
        out, _ = generate(planted_world, plan, **split)
        results.append((out, plan.found_masks))
    (batched, found_batched), (split_out, found_split) = results
    assert covers(found_split[0, 0], cells(3, 1, 13, 6)) and covers(found_split[1, 0], cells(2, 10, 12, 15))
    assert torch.equal(found_batched, found_split)
    assert torch.allclose(batched, split_out, rtol=1e-4, atol=1e-4)


def hires(world, first, plan_job=None, hires_loras=True, scale=2, strength=0.5, seed=3):
    """A1111's hires pass after `generate`: a new sampler, is_hr_pass, the hook, sample_img2img."""
    batch = first.shape[0]
    p = processing(*(v * scale for v in IMAGE[::-1]), steps=4, batch=batch, seed=seed)
    p.is_hr_pass, p.denoising_strength = True, strength
    p.sd_model = SimpleNamespace(model=SimpleNamespace(diffusion_model=world["unet"]), is_sdxl=False)
    p.sampler = A1111Sampler("Euler", world["ldm"], shared.opts)
    if plan_job is not None:
        state, plan = plan_job
        state.job.hires_loras = hires_loras
        state.routed_sampler = None
        p._multi_concept = state
    upscaled = torch.nn.functional.interpolate(first, scale_factor=scale, mode="nearest")
    a1111.process_before_every_sampling(p, x=upscaled)
    noise = torch.randn(upscaled.shape, generator=torch.Generator().manual_seed(seed))
    return p.sampler.sample_img2img(p, upscaled, noise, world["cond"].expand(batch, -1, -1),
                                    world["uncond"].expand(batch, -1, -1))


def first_pass_with_state(world, plan, mode="blend"):
    shared.opts.batch_cond_uncond = True
    p = processing(*IMAGE[::-1], steps=4, batch=2, seed=3)
    p.sd_model = SimpleNamespace(model=SimpleNamespace(diffusion_model=world["unet"]), is_sdxl=False)
    p.sampler = A1111Sampler("Euler a", world["ldm"], shared.opts)
    state = webui.JobState(job=SimpleNamespace(save_layout=False, hires_loras=True, mode=mode))
    state.prepared = SimpleNamespace(plan=plan, warnings=[])
    p._multi_concept = state
    a1111.process_before_every_sampling(p)
    first = p.sampler.sample(p, p.rng.next(), world["cond"].expand(2, -1, -1), world["uncond"].expand(2, -1, -1))
    return first, state


def test_hires_pass_applies_each_concepts_loras_in_its_upscaled_region(world):
    plan = drawn_plan(world)
    first, state = first_pass_with_state(world, plan)
    plain = hires(world, first)
    rows = count_unet_rows(world["unet"])
    try:
        with_concepts = hires(world, first, (state, plan))
    finally:
        rows.remove()
    # 3 hires steps (strength 0.5 of 4 steps: t_enc 2, as A1111 runs t_enc + 1): base + 2 concepts,
    # cond and uncond, batch 2, each step
    assert rows.count == 3 * (1 + 2) * 2 * 2
    assert with_concepts.shape == plain.shape and torch.isfinite(with_concepts).all()
    change = (with_concepts - plain).abs().mean(dim=(0, 1, 2))   # per latent column (32 wide)
    assert change[:12].mean() > 0.01 and change[19:].mean() > 0.01   # alice left, bob right
    # off: the hires pass is plain, bit for bit; and the host is left as it was
    assert torch.equal(hires(world, first, (state, plan), hires_loras=False), plain)
    assert torch.equal(hires(world, first), plain)


def test_hires_pass_blending_is_exact(world):
    """Concepts with no LoRA and the main prompt blend identical predictions: the plain pass."""
    plan = build_plan([dict(name="a", cond=world["cond"], loras=[], mask=column(0, 56)),
                       dict(name="b", cond=world["cond"], loras=[], mask=column(72, 128))],
                      IMAGE, start_at=0.5)
    first, state = first_pass_with_state(world, plan)
    plain = hires(world, first)
    assert torch.allclose(hires(world, first, (state, plan)), plain, rtol=1e-4, atol=1e-4)
