"""img2img through the A1111 host glue (lib_mc/hosts/webui.py, a1111.py), driven as A1111's
StableDiffusionProcessingImg2Img.sample drives it (tests/a1111like.py: the noise, times the
noise multiplier; process_before_every_sampling; sampler.sample_img2img with the init latent;
the inpainting mask in the CFG denoiser and after sampling): the job's method runs the first
pass, blend replays the same noise, disabled it is plain img2img bit for bit, the inpainting
mask still acts, the init latent reaches the plan as its background, the step count is the
steps img2img runs. Also the script's tabs and the host's picture encoder (ldm's real VAE
encoder at a tiny width). The UNet, k-diffusion and the LoRA files are real."""

import importlib.util
import os
import sys
from types import SimpleNamespace

import pytest
import torch
from k_diffusion import sampling
from modules import shared

import a1111like
from a1111like import A1111Sampler, img2img_processing, img2img_sample
from lib_mc.errors import MultiConceptError
from lib_mc.hosts import a1111, webui
from lib_mc.plan import build_plan
from lib_mc.reference import reference_pixels
from test_a1111_align import TinyFirstStage, png
from test_a1111_flow import IMAGE, column, drawn_plan, host_options, world  # noqa: F401
from test_a1111_regional import counted, unpatched

LATENT = (IMAGE[0] // 8, IMAGE[1] // 8)


def init_latent(batch=2, seed=7):
    """An init latent as img2img's init() encodes it: a VAE latent's scale (SD1: 0.18215 x z)."""
    return torch.randn((batch, 4) + LATENT, generator=torch.Generator().manual_seed(seed)) * 0.8


def job(mode="blend", keep_background=False, concepts=()):
    return SimpleNamespace(save_layout=False, hires_loras=True, mode=mode, keep_background=keep_background,
                           concepts=list(concepts), reference="")


def img2img(world, plan=None, mode="blend", sampler="Euler a", steps=6, strength=0.6, batch=2, seed=3, mask=None,
            noise_multiplier=1.0, keep_background=False, the_job=None, reuse=None):
    """One img2img batch as A1111 runs it. plan None: no job (plain img2img). reuse: a (p, sampler)
    whose sampler object is used again (A1111 makes img2img's sampler once per job, not per batch).
    Returns (latents, p, state)."""
    shared.opts.batch_cond_uncond = True
    p = img2img_processing(init_latent(batch), steps=steps, seed=seed, strength=strength, mask=mask,
                           noise_multiplier=noise_multiplier)
    p.sd_model = SimpleNamespace(model=SimpleNamespace(diffusion_model=world["unet"]), is_sdxl=False)
    p.sampler = reuse if reuse is not None else A1111Sampler(sampler, world["ldm"], shared.opts)
    state = None
    hook = None
    if plan is not None:
        state = webui.JobState(job=the_job or job(mode, keep_background))
        state.prepared = SimpleNamespace(plan=plan, warnings=[])
        p._multi_concept = state
        hook = a1111.process_before_every_sampling
    out = img2img_sample(p, world["cond"].expand(batch, -1, -1), world["uncond"].expand(batch, -1, -1),
                         scripts_hook=hook)
    return out, p, state


# ---- the script --------------------------------------------------------------------------------

def test_the_script_is_shown_in_txt2img_and_img2img(monkeypatch):
    from modules import scripts
    path = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "multi_concept.py")
    spec = importlib.util.spec_from_file_location("multi_concept_script", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "multi_concept_script", module)
    spec.loader.exec_module(module)
    assert module.HOST == "a1111" and module.adapter is a1111
    script = module.MultiConceptScript()
    assert script.show(False) is scripts.AlwaysVisible
    assert script.show(True) is scripts.AlwaysVisible
    # each tab's panel has its own element ids (two panels on one page)
    import gradio as gr
    with gr.Blocks():
        (txt2img_job,) = script.ui(False)
        (img2img_job,) = script.ui(True)
    assert txt2img_job.elem_id == "multi_concept_job" and img2img_job.elem_id == "img2img_multi_concept_job"


# ---- disabled: plain img2img -------------------------------------------------------------------

def test_disabled_or_no_job_img2img_is_plain_img2img_bit_for_bit(world):
    plain, _, _ = img2img(world)
    for arg in ({"enabled": False, "concepts": []}, {"enabled": False, "concepts": [
            {"name": "a", "region": {"type": "rect", "w": 0.5}}]}):
        p = img2img_processing(init_latent(), steps=6, seed=3, strength=0.6)
        p.sd_model = SimpleNamespace(model=SimpleNamespace(diffusion_model=world["unet"]), is_sdxl=False)
        p.sampler = A1111Sampler("Euler a", world["ldm"], shared.opts)
        p.sampler_name, p.extra_generation_params = "Euler a", {}
        webui.process(p, arg)
        assert p._multi_concept is None
        out = img2img_sample(p, world["cond"].expand(2, -1, -1), world["uncond"].expand(2, -1, -1),
                             scripts_hook=a1111.process_before_every_sampling)
        assert torch.equal(out, plain)
        unpatched(world, p.sampler)


def test_a_job_leaves_img2img_sampler_plain_for_the_next_batch(world):
    """A1111 keeps img2img's sampler for every batch of a job: after a routed batch, the same
    sampler object samples plain img2img bit for bit."""
    plain, _, _ = img2img(world)
    _, p, state = img2img(world, drawn_plan(world))
    assert state.session.stats.unet_rows > 0
    unpatched(world, p.sampler)
    again, _, _ = img2img(world, reuse=p.sampler)
    assert torch.equal(again, plain)


# ---- the job's method runs img2img's pass ------------------------------------------------------

@pytest.mark.parametrize("multiplier", [1.0, 0.9])
def test_blend_replays_the_hosts_noise_on_the_same_init_latent(world, multiplier):
    """Blend's two stages are two img2img runs from the host's init latent with the same noise
    (the noise multiplier applied again): with start_at 1 the second stage is the plain img2img
    image bit for bit; from half-way the concepts change it."""
    plain, _, _ = img2img(world, noise_multiplier=multiplier)
    again, p, state = img2img(world, drawn_plan(world, start_at=1.0), noise_multiplier=multiplier)
    assert torch.equal(again, plain)
    assert state.session.stats.replayed_calls == 4   # strength 0.6 of 6 steps: t_enc 3, 4 steps
    unpatched(world, p.sampler)
    blended, _, state = img2img(world, drawn_plan(world, start_at=0.5), noise_multiplier=multiplier)
    assert 0 < state.session.stats.replayed_calls < 4 and state.session.stats.unet_rows > 0
    assert not torch.allclose(blended, plain, atol=1e-3)


def test_regional_and_conductor_run_one_img2img_pass_through_the_engine(world):
    (plain, _, _), plain_rows = counted(world["unet"], lambda: img2img(world))
    assert plain_rows == 4 * 2 * 2   # 4 steps, cond and uncond, 2 images
    (out, p, state), rows = counted(world["unet"], lambda: img2img(world, drawn_plan(world, start_at=0.0),
                                                                   mode="regional"))
    assert rows == plain_rows and state.session.stats.unet_rows == rows   # regional: the host's own rows
    assert not torch.allclose(out, plain, atol=1e-3)
    unpatched(world, p.sampler)
    (out, p, state), rows = counted(world["unet"], lambda: img2img(
        world, drawn_plan(world, start_at=0.0, mask_refine=False), mode="conductor"))
    assert rows == 3 * plain_rows and state.session.stats.unet_rows == rows   # base + 2 concepts
    assert not torch.allclose(out, plain, atol=1e-3)
    unpatched(world, p.sampler)


@pytest.fixture
def euler_outputs(monkeypatch):
    """k-diffusion's Euler, keeping every CFG denoiser output (the x0 prediction it steps to)."""
    seen = []

    def euler(model, x, sigmas, **kwargs):
        def watched(x_, sigma, **extra):
            out = model(x_, sigma, **extra)
            seen.append(out.clone())
            return out
        return sampling.sample_euler(watched, x, sigmas, **kwargs)
    monkeypatch.setitem(a1111like.SAMPLERS, "Euler", (euler, False, False, False))
    return seen


@pytest.mark.parametrize("mode", ["blend", "regional", "conductor"])
def test_inpainting_keeps_the_webuis_own_mask_around_the_engine(world, euler_outputs, mode):
    """A1111 puts the init latent back outside the inpainting mask after CFG, inside its CFG
    denoiser (which the engine's routing wraps): every prediction of the pass is the init latent
    there, while the concepts change the repainted part."""
    repaint = torch.zeros(LATENT)
    repaint[:, : LATENT[1] // 2] = 1   # the left half is repainted
    plan = drawn_plan(world, start_at=0.0 if mode != "blend" else 0.5, mask_refine=False)
    plain, _, _ = img2img(world, sampler="Euler", mask=repaint)
    plain_outputs = list(euler_outputs)
    euler_outputs.clear()
    (out, p, state), rows = counted(world["unet"], lambda: img2img(world, plan, mode=mode, sampler="Euler",
                                                                  mask=repaint))
    assert rows > 0 and state.session.stats.unet_rows > 0
    routed = euler_outputs[-len(plain_outputs):]   # blend: stage 2's
    kept = p.mask.bool()[None].expand_as(out)
    for denoised in routed:
        assert torch.equal(denoised[kept], p.init_latent[kept])
    assert torch.equal(out[kept], p.init_latent[kept])
    assert not torch.allclose(out[~kept], plain[~kept], atol=1e-3)
    unpatched(world, p.sampler)


# ---- the init latent as the plan's background ---------------------------------------------------

def test_the_init_latent_is_the_plans_background_when_the_job_keeps_it(world):
    def background(the_job, plan=None, init=True):
        plan = plan or drawn_plan(world)
        p = img2img_processing(init_latent(), steps=6, seed=3, strength=0.6)
        if not init:   # txt2img: no init latent
            del p.init_latent
        p.sd_model = SimpleNamespace(model=SimpleNamespace(diffusion_model=world["unet"]), is_sdxl=False)
        p.sampler = A1111Sampler("Euler", world["ldm"], shared.opts)
        state = webui.JobState(job=the_job)
        state.prepared = SimpleNamespace(plan=plan, warnings=[])
        p._multi_concept = state
        a1111.process_before_every_sampling(p, x=getattr(p, "init_latent", None))
        p.sampler.__dict__.clear()   # not sampled here
        assert state.error is None, state.error
        assert state.session.plan is plan
        return plan.background, p

    kept, p = background(job("blend", keep_background=True))
    assert torch.equal(kept, p.init_latent) and kept is not p.init_latent and kept.shape == (2, 4) + LATENT
    kept, p = background(job("conductor", keep_background=True), drawn_plan(world, start_at=0.0, mask_refine=False))
    assert torch.equal(kept, p.init_latent)
    # an image concept dilutes its reference with the background: the init latent, kept or not
    image_concept = job("blend", keep_background=False, concepts=[SimpleNamespace(reference=png())])
    kept, p = background(image_concept)
    assert torch.equal(kept, p.init_latent)
    assert background(job("blend", keep_background=False))[0] is None
    assert background(job("regional", keep_background=True), drawn_plan(world, start_at=0.0))[0] is None
    assert background(job("blend", keep_background=True), init=False)[0] is None


@pytest.mark.parametrize("mode", ["blend", "conductor"])
def test_with_the_kept_background_img2img_ends_on_the_init_latent_outside_every_region(world, mode):
    """The engine's mask-guided mixing with the init latent as the background: outside both
    concepts' columns (latent columns 7 and 8) Euler's last step lands on the init latent;
    without keeping it, img2img changes the outside as plain img2img does."""
    plan = drawn_plan(world, start_at=0.5 if mode == "blend" else 0.0, mask_refine=False)
    out, p, state = img2img(world, plan, mode=mode, sampler="Euler", keep_background=True)
    outside = plan.regions.latent[0] > 0.999
    assert int(outside.sum()) == 2 * LATENT[0]
    torch.testing.assert_close(out[..., outside], p.init_latent[..., outside], rtol=0, atol=1e-6)
    assert (out - p.init_latent)[..., ~outside].abs().mean() > 0.1
    free, _, _ = img2img(world, drawn_plan(world, start_at=0.5 if mode == "blend" else 0.0, mask_refine=False),
                         mode=mode, sampler="Euler", keep_background=False)
    assert (free - p.init_latent)[..., outside].abs().mean() > 0.1
    unpatched(world, p.sampler)


def image_concept_job(world, mode):
    """alice an image concept (a reference latent), bob a LoRA concept; the job keeps the
    background (img2img: the init latent) -> (plan, job)."""
    reference = torch.randn((1, 4) + LATENT, generator=torch.Generator().manual_seed(5))
    plan = build_plan([
        dict(name="alice", cond=world["alice_cond"], loras=[], mask=column(0, 56), reference=reference),
        dict(name="bob", cond=world["bob_cond"], loras=[(world["bob"], 1.0)], mask=column(72, 128)),
    ], IMAGE, start_at=0.5 if mode == "blend" else 0.0, mask_refine=False)
    the_job = job(mode, keep_background=True, concepts=[SimpleNamespace(reference="<png>"), SimpleNamespace(reference="")])
    return plan, the_job


@pytest.mark.parametrize("mode", ["blend", "conductor"])
def test_an_image_concept_and_the_init_latent_are_inverted_over_the_levels_img2img_runs(world, mode):
    """An image concept (its reference latent) in img2img: the host hands the method the
    levels img2img samples (4 of 6 steps at strength 0.6), over which the reference and the
    init latent (the background) are inverted: levels + 1 evaluations of one row each."""
    plan, the_job = image_concept_job(world, mode)
    out, p, state = img2img(world, plan, mode=mode, sampler="Euler", the_job=the_job)
    levels = len(webui.sampler_schedule(p, None, img2img=True).levels)
    assert levels == 4 and torch.isfinite(out).all()
    assert state.session.stats.invert_rows == 2 * (levels + 1)
    unpatched(world, p.sampler)


def test_an_init_latent_of_another_size_is_named_before_sampling(world):
    p = img2img_processing(torch.zeros((1, 4, 8, 8)), steps=6, seed=3)
    p.sd_model = SimpleNamespace(model=SimpleNamespace(diffusion_model=world["unet"]), is_sdxl=False)
    p.sampler = A1111Sampler("Euler", world["ldm"], shared.opts)
    state = webui.JobState(job=job("blend", keep_background=True))
    state.prepared = SimpleNamespace(plan=drawn_plan(world), warnings=[])
    p._multi_concept = state
    a1111.process_before_every_sampling(p)
    with pytest.raises(MultiConceptError, match="background"):
        p.sampler.sample_img2img(p, p.init_latent, p.rng.next(), world["cond"], world["uncond"])
    unpatched(world, p.sampler)


@pytest.mark.parametrize("strength, fix_steps, levels", [(0.6, False, 7), (0.35, False, 4), (0.5, True, 10)])
def test_the_schedule_is_the_levels_img2img_samples(world, monkeypatch, strength, fix_steps, levels):
    """img2img runs the tail of a schedule (setup_img2img_steps): the levels handed to a method
    that inverts pictures are the sigmas the sampler really calls its denoiser with."""
    monkeypatch.setattr(shared.opts, "img2img_fix_steps", fix_steps)
    called = []

    def euler(model, x, sigmas, **kwargs):
        return sampling.sample_euler(lambda x_, s, **extra: (called.append(float(s[0])), model(x_, s, **extra))[1],
                                     x, sigmas, **kwargs)
    monkeypatch.setitem(a1111like.SAMPLERS, "Euler", (euler, False, False, False))
    p = img2img_processing(init_latent(1), steps=10, seed=3, strength=strength)
    p.sampler = A1111Sampler("Euler", world["ldm"], shared.opts)
    with torch.no_grad():
        p.sampler.sample_img2img(p, p.init_latent, p.rng.next(), world["cond"], world["uncond"])
    schedule = webui.sampler_schedule(p, None, img2img=True)
    assert len(called) == levels   # t_enc + 1 of 10 steps (fixed steps: the last 10 of a 20-step schedule)
    torch.testing.assert_close(schedule.levels, torch.tensor(called, dtype=torch.float64), rtol=1e-6, atol=0)


# ---- step counting ---------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler, evaluations", [("Euler", 4), ("Heun", 7), ("DPM++ 2S a", 7)])
def test_the_step_count_is_the_evaluations_img2img_makes(world, sampler, evaluations):
    """strength 0.6 of 6 steps: img2img runs 4 steps; a second-order sampler evaluates twice a
    step (Heun's last step once), and the CFG denoiser's total_steps already counts both, as
    A1111's launch_sampling sets it: fractions of the steps (start_at, isolation_until) are of
    these evaluations, not of txt2img's steps, nor counted twice."""
    totals = []

    def hook(p, **kwargs):
        a1111.process_before_every_sampling(p, **kwargs)
        session = p._multi_concept.session
        denoise = session.denoise

        def counted_denoise(*args, **kw):
            totals.append((kw["step"], kw["total_steps"]))
            return denoise(*args, **kw)
        session.denoise = counted_denoise

    shared.opts.batch_cond_uncond = True
    p = img2img_processing(init_latent(1), steps=6, seed=3, strength=0.6)
    p.sd_model = SimpleNamespace(model=SimpleNamespace(diffusion_model=world["unet"]), is_sdxl=False)
    p.sampler = A1111Sampler(sampler, world["ldm"], shared.opts)
    state = webui.JobState(job=job("regional"))
    state.prepared = SimpleNamespace(plan=drawn_plan(world, start_at=0.5), warnings=[])
    p._multi_concept = state
    img2img_sample(p, world["cond"], world["uncond"], scripts_hook=hook)
    assert [step for step, _ in totals] == list(range(evaluations))
    assert {total for _, total in totals} == {8 if sampler != "Euler" else 4}


def test_txt2img_second_order_step_count_is_not_doubled_twice(world):
    """A1111's CFG denoiser's total_steps is 2 x steps for Heun already (txt2img too)."""
    cfg = SimpleNamespace(step=0, total_steps=12)
    p = SimpleNamespace(steps=6, sampler_name="Heun")
    assert webui.StepCount(cfg, p).total == 12
    cfg.total_steps = None   # before sampling starts: the steps times the evaluations per step
    assert webui.StepCount(cfg, p).total == 12


# ---- the host's picture encoder ----------------------------------------------------------------------

def services_for(model, monkeypatch):
    monkeypatch.setitem(sys.modules, "networks", SimpleNamespace(available_networks={}, available_network_aliases={}))
    p = SimpleNamespace(sd_model=model, width=IMAGE[1], height=IMAGE[0])
    return a1111.A1111Services(p)


def test_encode_picture_is_the_hosts_vae_latent_of_the_cropped_picture(monkeypatch):
    first_stage = TinyFirstStage()
    model = SimpleNamespace(encode_first_stage=first_stage.encode_first_stage,
                            get_first_stage_encoding=first_stage.get_first_stage_encoding, is_sdxl=False)
    services = services_for(model, monkeypatch)
    latent = services.encode_picture(png(300, 100), (64, 96))
    (pixels,) = first_stage.encoded
    torch.testing.assert_close(pixels, reference_pixels(png(300, 100), (64, 96)))
    with torch.no_grad():
        expected = 0.18215 * first_stage.encode_first_stage(pixels).mode()
    assert latent.shape == (1, 4, 8, 12) and latent.dtype == torch.float32
    assert torch.equal(latent, expected)
    with pytest.raises(MultiConceptError, match=r"concepts\[1\].reference: cannot be decoded"):
        services.encode_picture("bm90IGEgcGljdHVyZQ==", (64, 96), "concepts[1].reference")


def test_encode_picture_of_a_vae_under_inference_mode_is_a_plain_tensor(monkeypatch):
    """Forge encodes under torch.inference_mode and returns the latent itself (no posterior): the
    latent must still be usable where gradients flow (conductor's alignment, inversions)."""
    class ForgeLike:
        is_sdxl = False

        @torch.inference_mode()
        def encode_first_stage(self, x):
            return torch.nn.functional.avg_pool2d(x, 8).repeat(1, 2, 1, 1)[:, :4] * 0.5

        def get_first_stage_encoding(self, x):
            return x
    latent = services_for(ForgeLike(), monkeypatch).encode_picture(png(), (64, 64))
    assert latent.shape == (1, 4, 8, 8) and not latent.is_inference()
    moved = torch.zeros_like(latent, requires_grad=True)
    (latent * moved).sum().backward()   # an inference tensor cannot be saved for backward
    assert torch.equal(moved.grad, latent)


@pytest.mark.parametrize("mode", ["blend", "conductor"])
def test_a_second_batch_of_the_job_inverts_nothing_again(world, mode):
    """A1111 makes a session per batch; the job's inverted pictures (the image concept's
    reference, the init latent as background) are kept on the job, so batch 2 of the same job
    inverts nothing (batch 1: levels + 1 rows per picture)."""
    plan, the_job = image_concept_job(world, mode)
    state = webui.JobState(job=the_job)
    state.prepared = SimpleNamespace(plan=plan, warnings=[])
    inverted = []
    for batch in range(2):
        shared.opts.batch_cond_uncond = True
        p = img2img_processing(init_latent(2), steps=6, seed=3, strength=0.6)
        p.sd_model = SimpleNamespace(model=SimpleNamespace(diffusion_model=world["unet"]), is_sdxl=False)
        p.sampler = A1111Sampler("Euler", world["ldm"], shared.opts)
        p._multi_concept = state
        out = img2img_sample(p, world["cond"].expand(2, -1, -1), world["uncond"].expand(2, -1, -1),
                             scripts_hook=a1111.process_before_every_sampling)
        assert torch.isfinite(out).all()
        inverted.append(state.session.stats.invert_rows)
    levels = len(webui.sampler_schedule(p, None, img2img=True).levels)
    assert inverted == [2 * (levels + 1), 0]
