"""Image concepts and a kept background (PnP-MIX) on the real ldm UNet with kohya LoRAs and
k-diffusion's Euler, through `session.sample` as the hosts drive it, in blend and conductor
modes, on A1111's path (attention modules) and Forge's (q, k, v replace patches): the shared
inversion, the kept background outside every region, guided appearance attention in the
concept rows, background dilution of the reference rows, and nothing of it without them."""

import pytest
import torch
from k_diffusion import sampling
from k_diffusion.external import CompVisDenoiser

from lib_mc.engine import make_session
from lib_mc.errors import EngineError, PlanError
from lib_mc.hosts.forge_routing import install_attention, make_unet_wrapper
from lib_mc.methods.base import HostPass
from lib_mc.hooks.attention import sdpa
from lib_mc.methods.images.dilution import expanded_box
from lib_mc.methods.images.inversion import invert_levels
from lib_mc.methods.schedule import SamplerSchedule
from lib_mc.plan import build_plan
from test_forge_routing import PatcherOptions, forge_block_attention, host_attention
from planted import cells, covers, plant
from tinyhost import CFGHost, euler_pass, merged_copy, two_lora_world

IMAGE = (128, 128)   # latent 16 x 16
STEPS = 6


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return two_lora_world(tmp_path_factory.mktemp("loras"))


@pytest.fixture(scope="module")
def calm_world(tmp_path_factory):
    """The UNet's output projection scaled down: a smoother random denoiser, on which DDIM
    inversion's first-order error is small (as in test_conductor_align.py)."""
    world = two_lora_world(tmp_path_factory.mktemp("calm"))
    with torch.no_grad():
        world["unet"].out[-1].weight.mul_(0.1)
        world["unet"].out[-1].bias.mul_(0.1)
    return world


def latent(seed, scale=0.8):
    return torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(seed)) * scale


def box(y0, y1, x0, x1):
    mask = torch.zeros(IMAGE)
    mask[y0:y1, x0:x1] = 1
    return mask


def unpatched(unet):
    return not [n for n, m in unet.named_modules() if "forward" in vars(m)]


def plan_of(world, reference=True, background=True, mode="blend", bob=False, **options):
    """alice (an image concept when `reference`) in the left half; bob (LoRA only) top right."""
    alice = dict(name="alice", cond=world["alice_cond"], loras=[(world["alice"], 0.8)], mask=box(0, 128, 0, 64))
    if reference:
        alice.update(reference=latent(7), reference_mask=box(32, 64, 32, 64))
    concepts = [alice]
    if bob:
        concepts.append(dict(name="bob", cond=world["bob_cond"], loras=[(world["bob"], 1.0)], mask=box(0, 48, 80, 128)))
    if mode == "conductor":
        options.setdefault("mask_refine", False)
    return build_plan(concepts, IMAGE, background=latent(8) if background else None,
                      **{"start_at": 0.3, **options})


class Recording:
    """Wraps a host's inner model: every engine call's input rows, output and row plan."""

    def __init__(self, session, model_fn):
        self.session, self.model_fn, self.calls = session, model_fn, []

    def __call__(self, x, sigma, cond):
        out = self.model_fn(x, sigma, cond)
        call = self.session.run.call
        self.calls.append(dict(x=x.clone(), sigma=sigma.clone(), out=out.clone(), rows=call.rows if call else None))
        return out


def generate(world, plan, mode="blend", path="a1111", steps=STEPS, on_session=None):
    """One batch through session.sample with k-diffusion's Euler, the CFG denoiser shaped like
    A1111's (path "a1111") or Forge's wrapper and attention replace patches ("forge").
    -> (image, session, recorded engine calls)."""
    session = make_session(mode, world["unet"], plan, attention_on_modules=path == "a1111")
    if on_session is not None:
        on_session(session)
    host = CFGHost(world["ldm"], world["cond"], world["uncond"])
    recording = Recording(session, host.model_fn)
    if path == "a1111":
        host.route = lambda model_fn, *args, **kwargs: session.denoise(recording, *args, **kwargs)
        patches = None
    else:
        patcher = PatcherOptions()
        install_attention(patcher, session, host_attention)
        patches = forge_block_attention(world["unet"], patcher)
        wrapper = make_unet_wrapper(session, step=lambda: host.step, total_steps=lambda: host.total_steps)

        def apply_model(xx, tt, c_crossattn=None, transformer_options=None, **kwargs):
            return recording(xx, tt, {"c_crossattn": c_crossattn})

        def route(model_fn, x_in, sigma_in, cond_in, n_cond, step, total_steps):   # Forge's rows: [uncond, cond]
            order = torch.cat([torch.arange(n_cond, 2 * n_cond), torch.arange(n_cond)])
            out = wrapper(apply_model, {"input": x_in[order], "timestep": sigma_in[order], "cond_or_uncond": [1, 0],
                                        "c": {"c_crossattn": cond_in["c_crossattn"][order], "transformer_options": {}}})
            return out[order]
        host.route = route
    pass_ = euler_pass(host, steps, torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(0)))
    try:
        if patches is not None:
            patches.apply()
        image = session.sample(pass_)
    finally:
        if patches is not None:
            patches.remove()
    assert unpatched(world["unet"])
    return image, session, recording.calls


def test_inversion_over_the_samplers_levels_then_sampling_gives_the_picture_back(calm_world):
    """The shared inversion (images/inversion.py), with no concept: Euler (DDIM in sigma space,
    no CFG) from the top inverted latent comes back to the picture, closer with more steps; the
    session's image concepts use exactly these latents."""
    world, picture = calm_world, latent(7)
    denoiser = CompVisDenoiser(world["ldm"])
    prompt = {"c_crossattn": world["cond"]}
    errors = {}
    for steps in (10, 40):
        sigmas = denoiser.get_sigmas(steps)
        schedule = SamplerSchedule(sigmas)
        with torch.no_grad():
            inverted = invert_levels(lambda x, level, on_path: denoiser(x, torch.tensor([level]), cond=prompt),
                                     picture, schedule, lambda x, out, level: out)
            assert sorted(inverted) == sorted(float(s) for s in sigmas[:-1])
            back = sampling.sample_euler(lambda x, s: denoiser(x, s, cond=prompt), inverted[float(sigmas[0])].clone(),
                                         sigmas, disable=True)
            noise = torch.randn(picture.shape, generator=torch.Generator().manual_seed(2)) * sigmas[0]
            from_noise = sampling.sample_euler(lambda x, s: denoiser(x, s, cond=prompt), noise, sigmas, disable=True)
        errors[steps] = float((back - picture).abs().mean())
        assert errors[steps] < 0.05 * float((from_noise - picture).abs().mean())
    assert errors[40] < 0.2 * float(picture.abs().mean()) and errors[40] < 0.6 * errors[10], errors


def test_the_session_inverts_each_picture_once_per_job_with_the_shared_inversion(world):
    plan = plan_of(world)
    _, session, _ = generate(world, plan)
    assert session.stats.invert_rows == 2 * (STEPS + 1)   # the reference and the background, once each
    entries = list(session.inversions.entries.values())
    assert len(entries) == 2
    # the background's latents are the shared inversion's under the main prompt (as the branch calls pad it)
    denoiser = CompVisDenoiser(world["ldm"])
    sigmas = denoiser.get_sigmas(STEPS)
    prompt = {"c_crossattn": torch.cat([world["cond"], world["cond"][:, -1:].expand(-1, 4, -1)], 1)}
    with torch.no_grad():
        expected = invert_levels(lambda x, level, on_path: denoiser(x, torch.tensor([level]), cond=prompt),
                                 plan.background, SamplerSchedule(sigmas), lambda x, out, level: out)
    background = [e for e in entries if torch.equal(e["clean"], plan.background)][0]
    for level, z in expected.items():
        torch.testing.assert_close(background[level], z, rtol=1e-3, atol=1e-4)
    # a second batch of the same job: nothing inverted again
    session.stats.reset()
    host = CFGHost(world["ldm"], world["cond"], world["uncond"])
    host.route = session.denoise
    session.sample(euler_pass(host, STEPS, latent(3, 1.0)))
    assert session.stats.invert_rows == 0 and session.stats.unet_rows > 0


def outside_cells(plan):
    """Latent cells outside every region of the plan (the background's weight is 1)."""
    regions = plan.image_regions[0] if plan.image_regions else plan.regions
    return regions.latent[0] == 1


@pytest.mark.parametrize("mode", ["blend", "conductor"])
def test_outside_every_region_the_image_ends_exactly_on_the_kept_background(world, mode):
    plan = plan_of(world, mode=mode, bob=True)
    image, _, _ = generate(world, plan, mode)
    outside = outside_cells(plan)
    assert 0 < int(outside.sum()) < outside.numel()
    background = plan.background
    torch.testing.assert_close(image[..., outside], background[..., outside], rtol=0, atol=1e-5)
    assert (image - background)[..., ~outside].abs().mean() > 0.1   # inside, the concepts' own
    # without keeping it the outside is the base branch's, not the background
    free, _, _ = generate(world, plan_of(world, mode=mode, bob=True, keep_background=False), mode)
    assert (free - background)[..., outside].abs().mean() > 0.1


def test_an_eps_predicting_host_gets_the_noise_whose_x0_is_the_background(world):
    """A1111's DDIM / PLMS / UniPC predict eps: the kept background goes back through the host's
    own x0 formula (get_pred_x0), here x0 = (x - sqrt(1 - a_t) eps) / sqrt(a_t)."""
    from lib_mc.methods.images.mixing import keep_outside
    alphas = world["ldm"].alphas_cumprod

    def to_x0(x, eps, t):
        a = alphas[t.long()][:, None, None, None]
        return (x - (1 - a).sqrt() * eps) / a.sqrt()
    plan = plan_of(world)
    x = torch.randn((2, 4, 16, 16), generator=torch.Generator().manual_seed(4))
    t = torch.tensor([900.0, 900.0])
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    mixed = keep_outside(plan, to_x0, eps, x, t, [0, 0])
    outside = outside_cells(plan)
    x0 = to_x0(x, mixed, t)
    torch.testing.assert_close(x0[..., outside], plan.background.expand(2, -1, -1, -1)[..., outside], rtol=1e-4, atol=1e-4)
    assert torch.equal(mixed[..., ~outside], eps[..., ~outside])


def guided_layer_io(world, plan, alpha):
    """One decoder self-attention module's input and output in the first engine call that holds
    reference rows (blend, A1111 path) and that call's row plan."""
    module = world["unet"].output_blocks[3][1].transformer_blocks[0].attn1
    seen = []

    def hook(m, args, kwargs, out):
        call = session.run.call
        if call is not None and call.reference_rows and not seen:
            seen.append((args[0] if args else kwargs["x"]).detach().clone())
            seen.append(out.detach().clone())
            seen.append(call.rows)
    plan.options.appearance_alpha = alpha
    session = None

    def keep(made):
        nonlocal session
        session = made
    handle = module.register_forward_hook(hook, with_kwargs=True)
    try:
        generate(world, plan, on_session=keep)
    finally:
        handle.remove()
    return module, seen


@pytest.mark.parametrize("alpha", [0.0, 0.15])
def test_the_concept_rows_self_attention_takes_the_reference_rows_keys_and_guided_values(world, alpha):
    """In the concept's cond and uncond rows: softmax(q_concept k_ref^T) (v_concept + alpha
    (v_concept - v_ref)), q and v through the concept's LoRA, k_ref and v_ref of the reference
    row (no LoRA); every other row as the host computes it."""
    plan = plan_of(world)
    module, (x, out, rows) = guided_layer_io(world, plan, alpha)
    ref = rows.find("reference", 0).start
    concept = rows.find("concept", 0).rows
    merged = merged_copy(world["unet"], [(world["alice_parts"], 0.8)])
    lora_module = dict(merged.named_modules())["output_blocks.3.1.transformer_blocks.0.attn1"]
    with torch.no_grad():
        q, v = lora_module.to_q(x[concept]), lora_module.to_v(x[concept])
        k_ref, v_ref = module.to_k(x[ref:ref + 1]), module.to_v(x[ref:ref + 1])
        guided = v + alpha * (v - v_ref)
        expected = lora_module.to_out(sdpa(q, k_ref.expand_as(q), guided, module.heads))
        unguided = lora_module.to_out(sdpa(q, lora_module.to_k(x[concept]), v, module.heads))
        base = rows.find("base").rows
        plain = module.to_out(sdpa(module.to_q(x[base]), module.to_k(x[base]), module.to_v(x[base]), module.heads))
    torch.testing.assert_close(out[concept], expected, rtol=1e-4, atol=1e-5)
    assert (out[concept] - unguided).abs().max() > 1e-3
    torch.testing.assert_close(out[base], plain, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["blend", "conductor"])
def test_forges_q_k_v_path_gives_the_image_of_a1111s_path(world, mode):
    with_ref, _, _ = generate(world, plan_of(world, mode=mode), mode, "a1111")
    forge, _, _ = generate(world, plan_of(world, mode=mode), mode, "forge")
    torch.testing.assert_close(forge, with_ref, rtol=1e-4, atol=1e-4)
    # and the reference changed the image (the guided attention acted on both paths)
    without, _, _ = generate(world, plan_of(world, mode=mode, reference=False), mode, "a1111")
    assert (with_ref - without).abs().max() > 1e-2


@pytest.mark.parametrize("background", [True, False])
def test_the_reference_row_is_its_inverted_latent_in_its_grown_box_and_beta_times_the_background_outside(
        world, background):
    plan = plan_of(world, background=background, dilution_beta=0.8, dilution_expand=0.1)
    _, session, calls = generate(world, plan)
    cache = session.inversions.entries.values()
    reference = [e for e in cache if torch.equal(e["clean"], plan.concepts[0].reference)][0]
    grown = expanded_box(plan.concepts[0].reference_mask, (16, 16), 0.1).bool()
    # the subject at image px 32-64 grown by 0.1 * 128 px on each side: latent cells 2-10
    expected_box = torch.zeros(16, 16, dtype=torch.bool)
    expected_box[2:10, 2:10] = True
    assert torch.equal(grown, expected_box)
    checked = 0
    for call in calls:
        rows = call["rows"]
        group = rows.find("reference", 0) if rows is not None else None
        if group is None:
            continue
        row = call["x"][group.start]
        level = float(call["sigma"][group.start])
        torch.testing.assert_close(row[:, grown], reference[level][0][:, grown], rtol=1e-5, atol=1e-5)
        if background:
            inpaint = [e for e in cache if torch.equal(e["clean"], plan.background)][0][level][0]
        else:   # the image's current latent (the base cond row of the call)
            inpaint = call["x"][rows.find("base").start]
        torch.testing.assert_close(row[:, ~grown], 0.8 * inpaint[:, ~grown], rtol=1e-5, atol=1e-5)
        checked += 1
    assert checked == STEPS - round(0.3 * STEPS)   # one reference row in every blended call


def test_a_concept_without_a_reference_is_untouched_and_no_picture_means_no_extra_rows(world):
    """bob (LoRA only) beside alice (image concept): bob's rows of the first blended call (the
    same latent in both jobs; later ones differ as alice's prediction differs) are what they
    are in a job where alice has no reference; a job without pictures makes no reference rows."""
    _, plain_session, plain_calls = generate(world, plan_of(world, reference=False, background=False, bob=True))
    assert plain_session.stats.invert_rows == 0
    assert all(c["rows"] is None or c["rows"].find("reference", 0) is None for c in plain_calls)
    _, _, calls = generate(world, plan_of(world, reference=True, background=False, bob=True))
    blended = [c for c in calls if c["rows"] is not None and c["rows"].find("reference", 0) is not None]
    plain_blended = [c for c in plain_calls if c["rows"] is not None and c["rows"].find("concept", 1) is not None]
    assert len(blended) == len(plain_blended) > 0
    a, b = blended[0], plain_blended[0]
    bob_a, bob_b = a["rows"].find("concept", 1).rows, b["rows"].find("concept", 1).rows
    assert torch.equal(a["x"][bob_a], b["x"][bob_b])
    torch.testing.assert_close(a["out"][bob_a], b["out"][bob_b], rtol=1e-4, atol=1e-4)   # other batch sizes: float32 rounding
    alice_a, alice_b = a["rows"].find("concept", 0).rows, b["rows"].find("concept", 0).rows
    assert (a["out"][alice_a] - b["out"][alice_b]).abs().max() > 1e-3   # alice's do change


def test_without_a_mask_the_subject_is_found_by_its_class_words_attention_while_the_reference_inverts(tmp_path):
    """alice's class word (position 2 of her prompt) planted to dominate cells 4-9 x 3-7 in
    every cross-attention: the subject found in the reference covers them, alike on A1111's and
    Forge's paths, and the reference row is diluted outside that subject's grown box."""
    planted = cells(4, 3, 9, 7)
    found = {}
    for path in ("a1111", "forge"):
        (tmp_path / path).mkdir()
        world = two_lora_world(tmp_path / path)
        plant(world["unet"], [2], [[planted]])
        alice = dict(name="alice", cond=world["alice_cond"], loras=[(world["alice"], 0.8)], mask=box(0, 128, 0, 64),
                     reference=latent(7), own_class_tokens=[2])
        plan = build_plan([alice], IMAGE, background=latent(8), start_at=0.3)
        _, session, calls = generate(world, plan, path=path)
        entries = list(session.inversions.entries.values())
        found[path] = [e for e in entries if torch.equal(e["clean"], plan.concepts[0].reference)][0]["subject"]
        grown = expanded_box(found[path], (16, 16), 0.1).bool()
        assert 0 < int(grown.sum()) < 256
        background = [e for e in entries if torch.equal(e["clean"], plan.background)][0]
        call = [c for c in calls if c["rows"] is not None and c["rows"].find("reference", 0) is not None][0]
        row = call["x"][call["rows"].find("reference", 0).start]
        level = float(call["sigma"][0])
        torch.testing.assert_close(row[:, ~grown], 0.8 * background[level][0][:, ~grown], rtol=1e-5, atol=1e-5)
    assert covers(found["a1111"], planted)
    assert torch.equal(found["a1111"], found["forge"])


def test_sdxl_keeps_the_background_and_its_reference_rows_guide_the_concept():
    """The same on SDXL's sgm UNet (A1111's path, {"crossattn", "vector"} conditioning)."""
    from lib_mc.lora import load_network
    from tinyxl import TinyXL, XLCFGHost, make_xl_unet, write_xl_lora, xl_cond
    import tempfile, pathlib
    unet = make_xl_unet()
    with tempfile.TemporaryDirectory() as folder:
        path = pathlib.Path(folder) / "xl_alice.safetensors"
        write_xl_lora(path, unet, seed=10)
        alice = load_network(str(path))
    ldm = TinyXL(unet)

    def run_xl(reference):
        concept = dict(name="alice", cond=xl_cond(3), loras=[(alice, 0.8)], mask=box(0, 128, 0, 64))
        if reference:
            concept.update(reference=latent(7), reference_mask=box(32, 64, 32, 64))
        plan = build_plan([concept], IMAGE, background=latent(8), start_at=0.3)
        session = make_session("blend", unet, plan, context_key="crossattn")
        host = XLCFGHost(ldm, xl_cond(1), xl_cond(2))
        host.route = session.denoise
        image = session.sample(euler_pass(host, STEPS, latent(0, 1.0)))
        assert unpatched(unet)
        return image, plan, session
    image, plan, session = run_xl(True)
    outside = outside_cells(plan)
    torch.testing.assert_close(image[..., outside], plan.background[..., outside], rtol=0, atol=1e-5)
    assert session.stats.invert_rows == 2 * (STEPS + 1)
    without, _, _ = run_xl(False)
    assert (image - without)[..., ~outside].abs().max() > 1e-2


def test_bad_pictures_are_named(world):
    with pytest.raises(PlanError, match=r"concepts\[0\]\.reference"):
        build_plan([dict(name="a", cond=world["cond"], mask=box(0, 128, 0, 64), reference=torch.zeros(1, 4, 8, 8))],
                   IMAGE)
    with pytest.raises(PlanError, match="background"):
        build_plan([dict(name="a", cond=world["cond"], mask=box(0, 128, 0, 64))], IMAGE, background="picture.png")
    plan = plan_of(world)
    session = make_session("blend", world["unet"], plan)
    with pytest.raises(EngineError, match="noise levels"):
        session.sample(HostPass(sample=lambda noise: noise, initial=latent(1), replay_noise=lambda: latent(1)))
    assert unpatched(world["unet"])
