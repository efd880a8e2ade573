"""The engine on SDXL's UNet: the real `sgm` classes A1111 runs for SDXL (CrossAttention with
sgm's forward signature, SpatialTransformer with linear proj_in/out, `y` through label_emb) at a
tiny config (tests/tinyxl.py), with SDXL's conditioning {"crossattn", "vector"} and kohya SDXL
LoRA files. The SD1.5 tier (test_two_stage.py, test_lora.py, ...) checks the same on ldm."""

import pytest
import torch
from k_diffusion.external import CompVisDenoiser

from lib_mc.engine import MultiConceptSession
from lib_mc.errors import LoraMismatchError
from lib_mc.hosts.forge_routing import install_attention, make_unet_wrapper
from lib_mc.lora import load_network
from lib_mc.plan import build_plan
from planted import cells, covers, plant
from tinyhost import count_unet_rows, make_unet, merged_copy, sample, write_lora
from tinyxl import CrossAttention, TinyXL, XLCFGHost, make_xl_unet, write_xl_lora, xl_cond

IMAGE = (128, 128)   # latent 16 x 16: SDXL's attention runs at 8 x 8 and 4 x 4
CTX = "crossattn"    # the engine's context key on A1111's SDXL path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("xl_loras")
    unet = make_xl_unet()
    return dict(unet=unet, ldm=TinyXL(unet),
                alice_parts=write_xl_lora(folder / "xl_alice.safetensors", unet, seed=10),
                bob_parts=write_xl_lora(folder / "xl_bob.safetensors", unet, seed=11, convs=True),
                alice=load_network(str(folder / "xl_alice.safetensors")),
                bob=load_network(str(folder / "xl_bob.safetensors")),
                cond=xl_cond(1), uncond=xl_cond(2), alice_cond=xl_cond(3), bob_cond=xl_cond(4))


def column(lo, hi):
    mask = torch.zeros(IMAGE)
    mask[:, lo:hi] = 1
    return mask


def two_concepts(world, **options):
    return build_plan([
        dict(name="alice", cond=world["alice_cond"], loras=[(world["alice"], 0.8)], mask=column(0, 56)),
        dict(name="bob", cond=world["bob_cond"], loras=[(world["bob"], 1.0)], mask=column(72, 128)),
    ], IMAGE, **options)


def rows_of(cond, uncond, batch):
    return {k: torch.cat([cond[k].expand(batch, *cond[k].shape[1:]), uncond[k].expand(batch, *uncond[k].shape[1:])])
            for k in ("crossattn", "vector")}


def one_call(world, session, batch=2, seed=5, drift=0.0):
    """One A1111-shaped denoiser call ([cond rows, uncond rows]), stage 1 then stage 2; `drift`
    moves stage 2's latent off stage 1's, as blending does after the start step."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, 4, 16, 16), generator=gen) * 3
    x_in, sigma_in = torch.cat([x, x]), torch.full((2 * batch,), 3.0)
    x_stage2 = x_in + drift * torch.randn(x_in.shape, generator=gen)
    cond_in = rows_of(world["cond"], world["uncond"], batch)
    denoiser = CompVisDenoiser(world["ldm"])
    model_fn = lambda xx, ss, cc: denoiser(xx, ss, cond=cc)   # noqa: E731
    with torch.no_grad():
        with session.stage1():
            session.denoise(model_fn, x_in, sigma_in, cond_in, n_cond=batch, step=0, total_steps=1)
        with session.stage2():
            out = session.denoise(model_fn, x_stage2, sigma_in, cond_in, n_cond=batch, step=0, total_steps=1)
    return x_stage2, sigma_in, out


def predict(unet, x_in, sigma_in, cond, uncond, batch):
    denoiser = CompVisDenoiser(TinyXL(unet))
    with torch.no_grad():
        return denoiser(x_in, sigma_in, cond=rows_of(cond, uncond, batch))


def sample_xl(host, sampler="euler_a", steps=6, batch=1, seed=3):
    return sample(host, sampler, steps=steps, batch=batch, seed=seed)


def unpatched(unet):
    return not [n for n, m in unet.named_modules() if "forward" in m.__dict__]


def test_start_at_end_is_bit_identical_to_plain_and_blending_makes_one_call_per_step(world):
    host = XLCFGHost(world["ldm"], world["cond"], world["uncond"])
    plain = sample_xl(host)
    for start_at in (1.0, 0.5):
        session = MultiConceptSession(world["unet"], two_concepts(world, start_at=start_at), context_key=CTX)
        host.route = session.denoise
        with session.stage1():
            first = sample_xl(host)
        rows = count_unet_rows(world["unet"])
        try:
            with session.stage2():
                second = sample_xl(host)
        finally:
            rows.remove()
        assert torch.equal(first, plain)
        if start_at == 1.0:
            assert torch.equal(second, plain) and rows.count == 0 and session.stats.replayed_calls == 6
        else:   # 3 steps replayed, 3 blended: layout 1 + base 2 + 2 concepts x 2 rows, one call each
            assert session.stats.replayed_calls == 3 and rows.calls == 3 and rows.count == 3 * 7
            assert (second - plain).abs().max() > 1e-2
    host.route = None


def test_a_concepts_loras_on_its_rows_equal_a_merged_copy_with_its_prompt_and_vector(world):
    plan = build_plan([dict(name="alice", cond=world["alice_cond"], mask=torch.ones(IMAGE),
                            loras=[(world["alice"], 0.8), (world["bob"], -0.6)])],
                      IMAGE, start_at=0.0, layout_replay=False)
    session = MultiConceptSession(world["unet"], plan, context_key=CTX)
    x_in, sigma_in, out = one_call(world, session)
    merged = merged_copy(world["unet"], [(world["alice_parts"], 0.8), (world["bob_parts"], -0.6)])
    reference = predict(merged, x_in, sigma_in, world["alice_cond"], world["uncond"], 2)
    # float32 rounding of factored vs merged deltas through SDXL's deeper stack (ldm's tier: 2e-5);
    # a wrong or missing layer moves the output by far more (the LoRAs' effect, below, is > 1e-2)
    torch.testing.assert_close(out, reference, atol=1e-4, rtol=1e-3)
    # not vacuous: the LoRAs, and the concept's own pooled vector (SDXL's `y`), both matter
    plain = predict(world["unet"], x_in, sigma_in, world["alice_cond"], world["uncond"], 2)
    other_vector = dict(world["alice_cond"], vector=world["cond"]["vector"])
    wrong_y = predict(merged, x_in, sigma_in, other_vector, world["uncond"], 2)
    assert (reference - plain).abs().max() > 1e-2 and (reference[:2] - wrong_y[:2]).abs().max() > 1e-2
    assert {n for n in world["bob_parts"] if "in_layers" in n} and {n for n in world["alice_parts"] if "proj_in" in n}


class Capture:
    """Inputs and output of one sgm attention module, via a forward hook around whatever forward it has."""

    def __init__(self, module):
        self.module, self.calls = module, []
        self.handle = module.register_forward_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs, output):
        context = kwargs.get("context")
        self.calls.append((args[0].detach(), None if context is None else context.detach(), output.detach()))

    def expected(self, x, context, probs_from):
        """to_out(softmax(q(x[probs_from]) k^T) v) per head: attention with other rows' probabilities."""
        m = self.module
        source = x if context is None else context
        q, k, v = m.to_q(x), m.to_k(source), m.to_v(source)
        b, n, inner = q.shape
        h, d = m.heads, inner // m.heads
        split = lambda t: t.view(t.shape[0], t.shape[1], h, d).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        probs = (q @ k.transpose(-1, -2) * d ** -0.5).softmax(-1)
        return m.to_out((probs[probs_from] @ v).transpose(1, 2).reshape(b, n, inner)), probs


def test_layout_replay_reaches_sgm_attention_modules(world):
    unet = world["unet"]
    session = MultiConceptSession(unet, two_concepts(world, start_at=0.0, self_attn_replay_until=1.0), context_key=CTX)
    modules = {n: m for n, m in unet.named_modules() if isinstance(m, CrossAttention)}
    assert len(modules) == 34
    captures = {name: Capture(m) for name, m in modules.items()}
    try:
        one_call(world, session, drift=1.0)
    finally:
        for c in captures.values():
            c.handle.remove()
    layout, base, uncond = [0, 1], [2, 3], [4, 5]   # rows of the stage-2 call
    low_res = session._self_replay_tokens()
    kinds = {"cross": 0, "self low": 0, "self high": 0}
    with torch.no_grad():
        for name, capture in captures.items():
            x, context, output = capture.calls[-1]
            own, own_probs = capture.expected(x, context, list(range(x.shape[0])))
            torch.testing.assert_close(output[uncond], own[uncond], atol=1e-5, rtol=1e-4)
            if context is None and x.shape[1] > low_res:
                torch.testing.assert_close(output[base], own[base], atol=1e-5, rtol=1e-4)
                kinds["self high"] += 1
                continue
            order = list(range(x.shape[0]))
            order[2:4] = layout
            with_layout, _ = capture.expected(x, context, order)
            assert (own_probs[base] - own_probs[layout]).abs().max() > 1e-3, name   # not vacuous
            torch.testing.assert_close(output[base], with_layout[base], atol=1e-5, rtol=1e-4)
            kinds["cross" if context is not None else "self low"] += 1
    assert kinds == {"cross": 17, "self low": 12, "self high": 5}


def test_automatic_regions_are_found_from_sgm_cross_attention():
    left, right = cells(0, 0, 16, 6), cells(0, 10, 16, 16)
    unet = plant(make_xl_unet(), [2, 5], [[left, right], [right, left]])
    plan = build_plan([dict(name="a", cond=xl_cond(3), auto_tokens=[2]),
                       dict(name="b", cond=xl_cond(4), auto_tokens=[5])], IMAGE, start_at=0.5)
    host = XLCFGHost(TinyXL(unet), xl_cond(1), xl_cond(2))
    session = MultiConceptSession(unet, plan, context_key=CTX)
    host.route = session.denoise
    with session.stage1():
        sample_xl(host, "euler", batch=2)
    with session.stage2():
        sample_xl(host, "euler", batch=2)
    assert set(session.recorder.sums) == {64, 16}   # SDXL's two attention grids
    found = plan.found_masks
    assert covers(found[0, 0], left) and covers(found[0, 1], right)
    assert covers(found[1, 0], right) and covers(found[1, 1], left)
    assert unpatched(unet)


def to_diffusers(name: str) -> str:
    """SD1.5 kohya LoRAs use diffusers block names (SD1.5's 3 input blocks per level)."""
    parts = name.split(".")
    if parts[0] == "input_blocks" and parts[2] == "1":
        n = int(parts[1])
        return f"lora_unet_down_blocks_{(n - 1) // 3}_attentions_{(n - 1) % 3}_" + "_".join(parts[3:])
    if parts[0] == "output_blocks" and parts[2] == "1":
        n = int(parts[1])
        return f"lora_unet_up_blocks_{n // 3}_attentions_{n % 3}_" + "_".join(parts[3:])
    if parts[0] == "middle_block" and parts[1] == "1":
        return "lora_unet_mid_block_attentions_0_" + "_".join(parts[2:])
    return "lora_unet_" + name.replace(".", "_")


def test_sdxl_lora_on_sd15_and_sd15_lora_on_sdxl_are_named_mismatches(world, tmp_path):
    sd15 = make_unet(num_res_blocks=2)   # SD1.5's block layout: its input_blocks_4_1 is SDXL's too
    write_lora(tmp_path / "sd15_bob.safetensors", sd15, seed=2, key_of=to_diffusers)
    on_xl = load_network(str(tmp_path / "sd15_bob.safetensors"))
    assert any(k.startswith("lora_unet_down_blocks_1_attentions_0") for k in on_xl.unet)
    cases = [(sd15, world["alice"], "xl_alice"), (world["unet"], on_xl, "sd15_bob")]
    for unet, network, name in cases:
        plan = build_plan([dict(name="c", cond=xl_cond(3), loras=[(network, 1.0)], mask=column(0, 64))], IMAGE)
        with pytest.raises(LoraMismatchError, match=f"lora '{name}'.*another model type"):
            MultiConceptSession(unet, plan, context_key=CTX)
        assert unpatched(unet)


class Boom(Exception):
    pass


def test_the_engine_leaves_every_sgm_module_bit_identical(world):
    unet = world["unet"]
    weights = {k: v.clone() for k, v in unet.state_dict().items()}
    class_forward = CrossAttention.forward
    gen = torch.Generator().manual_seed(9)
    probe = (torch.randn((2, 4, 16, 16), generator=gen), torch.tensor([500, 20]))
    probe_c = rows_of(xl_cond(7), xl_cond(8), 1)
    with torch.no_grad():
        before = unet(*probe, context=probe_c["crossattn"], y=probe_c["vector"])
    host = XLCFGHost(world["ldm"], world["cond"], world["uncond"])
    plain = sample_xl(host, steps=4)
    for fail_at in (None, 4 + 2):   # a run that finishes, one interrupted in stage 2
        session = MultiConceptSession(unet, two_concepts(world, start_at=0.25), context_key=CTX)
        calls = []

        def route(*args, **kwargs):
            calls.append(1)
            if len(calls) == fail_at:
                raise Boom("interrupted")
            return session.denoise(*args, **kwargs)
        host.route = route
        with session.stage1():
            sample_xl(host, steps=4)
        assert unpatched(unet)
        try:
            with session.stage2():
                assert not unpatched(unet)   # the hooks were on sgm's modules
                sample_xl(host, steps=4)
        except Boom:
            assert fail_at is not None
        assert unpatched(unet) and session.run.call is None
        assert CrossAttention.forward is class_forward
        with torch.no_grad():
            assert torch.equal(unet(*probe, context=probe_c["crossattn"], y=probe_c["vector"]), before)
        assert all(torch.equal(v, weights[k]) for k, v in unet.state_dict().items())
    host.route = None
    assert torch.equal(sample_xl(host, steps=4), plain)


def test_forge_routing_with_y_gives_the_a1111_result(world):
    """Forge's SDXL conditioning is {"c_crossattn", "y"}, rows [uncond, cond], attention through
    replace patches (test_forge_routing.py's conventions, here on sgm's modules)."""
    from test_forge_routing import PatcherOptions, forge_block_attention, host_attention
    plan = lambda: two_concepts(world, start_at=0.0, self_attn_replay_until=1.0)  # noqa: E731
    gen = torch.Generator().manual_seed(5)
    batch = 2
    x, sigma = torch.randn((batch, 4, 16, 16), generator=gen) * 3, torch.full((batch,), 3.0)
    denoiser = CompVisDenoiser(world["ldm"])

    a1111 = MultiConceptSession(world["unet"], plan(), context_key=CTX)
    cond_in = rows_of(world["cond"], world["uncond"], batch)
    model_fn = lambda xx, ss, cc: denoiser(xx, ss, cond=cc)   # noqa: E731
    with torch.no_grad():
        with a1111.stage1():
            first_a = a1111.denoise(model_fn, torch.cat([x, x]), torch.cat([sigma, sigma]), cond_in, n_cond=batch,
                                    step=0, total_steps=1)
        with a1111.stage2():
            second_a = a1111.denoise(model_fn, torch.cat([x, x]), torch.cat([sigma, sigma]), cond_in, n_cond=batch,
                                     step=0, total_steps=1)

    forge_plan = plan()
    for concept in forge_plan.concepts:   # Forge's encode gives a concept {"c_crossattn", "y"}
        concept.cond = {"c_crossattn": concept.cond["crossattn"], "y": concept.cond["vector"]}
    forge = MultiConceptSession(world["unet"], forge_plan, attention_on_modules=False)
    patcher = PatcherOptions()
    install_attention(patcher, forge, host_attention)

    def apply_model(xx, tt, c_crossattn=None, y=None, transformer_options=None, control=None):
        return denoiser(xx, tt, cond={"crossattn": c_crossattn, "vector": y})
    wrapper = make_unet_wrapper(forge, step=lambda: 0, total_steps=lambda: 1)
    forge_rows = rows_of(world["uncond"], world["cond"], batch)
    args = {"input": torch.cat([x, x]), "timestep": torch.cat([sigma, sigma]), "cond_or_uncond": [1, 0],
            "c": {"c_crossattn": forge_rows["crossattn"], "y": forge_rows["vector"],
                  "transformer_options": {"sigmas": sigma}}}
    with torch.no_grad(), forge_block_attention(world["unet"], patcher):
        with forge.stage1():
            first_f = wrapper(apply_model, args)
        with forge.stage2():
            second_f = wrapper(apply_model, args)
    assert torch.allclose(torch.cat([first_f[2:], first_f[:2]]), first_a, atol=1e-5)
    assert torch.allclose(torch.cat([second_f[2:], second_f[:2]]), second_a, atol=1e-5)
    assert (second_a - first_a).abs().max() > 1e-2


def test_refinement_reads_sgm_decoder_self_attention():
    """test_refine.py's planted subject on SDXL: the first decoder self-attention at latent / 4
    (output_blocks.0.1's first attn1, an sgm CrossAttention) is where the masks are re-fitted."""
    from test_refine import box, plant_self
    subject, off = box(8, 16, 24, 28), box(10, 8, 26, 20)   # latent cells at 32 x 32
    unet = plant_self(plant(make_xl_unet(), [2], [[off]]), subject)
    image = (256, 256)
    plan = build_plan([dict(name="auto", cond=xl_cond(3), auto_tokens=[2]),
                       dict(name="drawn", cond=xl_cond(4), mask=box(0, 0, 256, 40, size=256))],
                      image, start_at=0.34, refine_every=1, refine_until=0.7, refine_clusters=3)
    # 3 segments: the subject, the drawn concept's strip, the rest (with the default 4, k-means
    # splits this random tiny UNet's planted subject in two and refinement takes one part)
    host = XLCFGHost(TinyXL(unet), xl_cond(1), xl_cond(2))
    session = MultiConceptSession(unet, plan, context_key=CTX)
    host.route = session.denoise
    with session.stage1():
        sample(host, "euler", steps=6, latent_hw=(32, 32))
    before = session.find_regions()[0, 0].clone()
    with session.stage2():
        sample(host, "euler", steps=6, latent_hw=(32, 32))
    after = plan.found_masks[0, 0]
    target = torch.nn.functional.adaptive_avg_pool2d(subject[None, None], after.shape)[0, 0] >= 0.5

    def iou(mask):
        mask = torch.nn.functional.adaptive_avg_pool2d(mask[None, None].float(), after.shape)[0, 0] > 0.5
        return float((mask & target).sum()) / float((mask | target).sum())
    assert iou(after) > iou(before) and iou(after) >= 0.75
    assert [label for label, _ in plan.mask_steps][-2:] == ["refined at step 3", "refined at step 4"]
    assert unpatched(unet)


def test_sgm_extra_keyword_arguments_go_to_the_hosts_attention_as_they_are():
    """sgm's video models pass `additional_tokens` (a tensor) and a crossframe count; the engine
    leaves such a call to the host's attention instead of failing on the tensor's truth value."""
    from lib_mc.hooks.attention import make_attention_forward
    from lib_mc.hooks.state import CallState, RunState
    from lib_mc.rows import RowPlan
    module = CrossAttention(query_dim=16, heads=2, dim_head=8)
    x = torch.randn(2, 4, 16)
    seen = []

    def original(x_, context=None, mask=None, **kwargs):
        seen.append(kwargs)
        return x_ * 2
    run = RunState()
    rows = RowPlan()
    rows.add("layout", 1, 0)
    rows.add("base", 1, 0)
    run.call = CallState(rows, replay_cross=True, replay_self_max_tokens=64)
    forward = make_attention_forward(module, original, run)
    extra = torch.zeros(2, 1, 16)
    assert torch.equal(forward(x, additional_tokens=extra), x * 2)
    assert seen[-1]["additional_tokens"] is extra
    replayed = forward(x, additional_tokens=None, n_times_crossframe_attn_in_self=0)
    # defaults: the engine acts (self-attention replay of 4 tokens recomputes the base row)
    assert torch.equal(replayed[0], x[0] * 2) and not torch.allclose(replayed[1], x[1] * 2)


# ---- conductor mode on sgm's attention --------------------------------------------------------------

def test_conductor_injects_every_decoder_attention_output_on_sgm(world):
    """A whole-image concept: every decoder attention output of the base rows is the concept
    branch's (sgm's CrossAttention, linear proj_in/out, the vector conditioning per row), the
    prediction is the base rows' own."""
    from lib_mc.engine import make_session
    from lib_mc.methods.conductor.layers import decoder_attention
    plan = build_plan([dict(name="alice", cond=world["alice_cond"], loras=[(world["alice"], 0.8)],
                            mask=torch.ones(IMAGE))], IMAGE, start_at=0.0, mask_refine=False)
    session = make_session("conductor", world["unet"], plan, context_key=CTX)
    seen, outputs = {}, []
    handles = [m.register_forward_hook(lambda m, a, out, name=name: seen.setdefault(name, out.detach().clone()))
               for m, name in decoder_attention(world["unet"]).items()]
    denoiser = CompVisDenoiser(world["ldm"])

    def model_fn(xx, ss, cc):
        outputs.append(denoiser(xx, ss, cond=cc))
        return outputs[-1]
    x = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(5)) * 3
    try:
        with torch.no_grad(), session.single_pass():
            out = session.denoise(model_fn, torch.cat([x, x]), torch.full((2,), 3.0),
                                  rows_of(world["cond"], world["uncond"], 1), n_cond=1, step=0, total_steps=1)
    finally:
        for handle in handles:
            handle.remove()
    assert len(seen) == len(decoder_attention(world["unet"])) > 0
    for name, layer in seen.items():
        assert layer.shape[0] == 4 and torch.equal(layer[:2], layer[2:]), name
    assert torch.equal(out, outputs[0][:2]) and (outputs[0][:2] - outputs[0][2:]).abs().max() > 1e-3
    assert not [n for n, m in world["unet"].named_modules() if "forward" in vars(m)]


def test_conductor_layout_alignment_on_sgm_takes_the_papers_sdxl_step(world):
    """A reference inverted and the latent moved through sgm's UNet (crossattn and vector per
    branch), the keys taken at output_blocks.1.1 (transformer 4 of 10 in the full SDXL, the last
    of this tiny one's); align_step 0 means the paper's SDXL step, 40 (SD1.5: 10)."""
    from k_diffusion import sampling
    from lib_mc.engine import make_session
    from lib_mc.methods.base import HostPass
    from lib_mc.methods.schedule import SamplerSchedule
    steps = 4
    initial = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(0))
    reference = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(7)) * 0.8

    def first_move(**options):
        session = make_session("conductor", world["unet"], two_concepts(world, start_at=0.0, mask_refine=False,
                                                                        **options), context_key=CTX)
        host = XLCFGHost(world["ldm"], world["cond"], world["uncond"])
        host.route = session.denoise
        sigmas = host.inner.get_sigmas(steps)
        moved = []

        def run(noise):
            host.step, host.total_steps = 0, steps
            with torch.no_grad():
                return sampling.sample_euler(host, noise * sigmas[0], sigmas, disable=True)
        out = session.sample(HostPass(sample=run, initial=initial, replay_noise=None, reference=reference,
                                      schedule=SamplerSchedule(sigmas), latent_moved=moved.append))
        assert torch.isfinite(out).all()
        assert session.stats.invert_rows == steps + 1 and session.stats.align_rows == 3   # 1 step: base + 2
        return moved[0][0] - initial[0] * sigmas[0]
    default, ten = first_move(), first_move(align_step=10.0)
    assert default.abs().max() > 1e-4
    torch.testing.assert_close(default, 4 * ten, rtol=1e-4, atol=1e-5)   # x ~ 15: float32 cancellation
    assert not [n for n, m in world["unet"].named_modules() if "forward" in vars(m)]
