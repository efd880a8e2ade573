"""The two-stage engine on the real ldm UNet, driven like A1111 drives it."""

import pytest
import torch
from k_diffusion.external import CompVisDenoiser

from lib_mc.engine import MultiConceptSession
from lib_mc.errors import EngineError
from lib_mc.plan import build_plan
from tinyhost import CFGHost, TinyLDM, count_unet_rows, merged_copy, sample, two_lora_world

IMAGE = (128, 128)   # latent 16 x 16


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return two_lora_world(tmp_path_factory.mktemp("loras"))


def column_mask(lo, hi, rows=(0, IMAGE[0])):
    mask = torch.zeros(IMAGE)
    mask[rows[0]:rows[1], lo:hi] = 1
    return mask


def two_concepts(world, **options):
    # alice: left 3/8, bob: top of the right 3/8; the middle and bottom right stay background
    return build_plan([
        dict(name="alice", cond=world["alice_cond"], loras=[(world["alice"], 0.8)], mask=column_mask(0, 48)),
        dict(name="bob", cond=world["bob_cond"], loras=[(world["bob"], 1.0)], mask=column_mask(80, 128, (0, 64))),
    ], IMAGE, **options)


def eps_model(denoiser):
    """An eps-predicting inner model, as A1111's DDIM/PLMS/UniPC timestep wrapper is."""
    return lambda x, sigma, cond: denoiser.get_eps(x, denoiser.sigma_to_t(sigma), cond=cond)


def one_call(world, session, batch=2, seed=5, drift=0.0, output="x0"):
    """One denoiser call shaped like A1111's: [cond rows, uncond rows], stage 1 then stage 2.
    `drift` moves stage 2's latent away from stage 1's, as blending does after the start step."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, 4, 16, 16), generator=gen) * 3
    x_in, sigma_in = torch.cat([x, x]), torch.full((2 * batch,), 3.0)
    x_stage2 = x_in + drift * torch.randn(x_in.shape, generator=gen)
    cond_in = {"c_crossattn": torch.cat([world["cond"].expand(batch, -1, -1), world["uncond"].expand(batch, -1, -1)])}
    host = CFGHost(world["ldm"], world["cond"], world["uncond"])
    model_fn = host.model_fn if output == "x0" else eps_model(host.inner)
    with session.stage1():
        session.denoise(model_fn, x_in, sigma_in, cond_in, n_cond=batch, step=0, total_steps=1)
    with session.stage2():
        out = session.denoise(model_fn, x_stage2, sigma_in, cond_in, n_cond=batch, step=0, total_steps=1)
    return x_stage2, sigma_in, cond_in, out


def padded(context, tokens=12):
    """A context as the engine stacks it beside alice's 12-token prompt: the last vector
    repeated, as A1111's prompt_parser.stack_conds pads prompts of different lengths."""
    return torch.cat([context, context[:, -1:].expand(-1, tokens - context.shape[1], -1)], 1)


def predict(unet, x_in, sigma_in, cond, uncond, batch, output="x0"):
    """A plain run of a (possibly LoRA-merged) UNet, cond and uncond rows each with their own prompt."""
    denoiser = CompVisDenoiser(TinyLDM(unet))
    if output == "eps":
        denoiser = eps_model(denoiser)
    with torch.no_grad():
        c = denoiser(x_in[:batch], sigma_in[:batch], cond={"c_crossattn": cond.expand(batch, -1, -1)})
        u = denoiser(x_in[batch:], sigma_in[batch:], cond={"c_crossattn": uncond.expand(batch, -1, -1)})
    return torch.cat([c, u])


@pytest.mark.parametrize("sampler", ["euler", "euler_a"])
def test_start_at_end_is_bit_identical_and_runs_no_unet_in_stage2(world, sampler):
    host = CFGHost(world["ldm"], world["cond"], world["uncond"])
    plain = sample(host, sampler, steps=6, batch=2, seed=3)
    session = MultiConceptSession(world["unet"], two_concepts(world, start_at=1.0))
    host.route = session.denoise
    with session.stage1():
        first = sample(host, sampler, steps=6, batch=2, seed=3)
    rows = count_unet_rows(world["unet"])
    try:
        with session.stage2():
            second = sample(host, sampler, steps=6, batch=2, seed=3)
    finally:
        rows.remove()
    assert torch.equal(first, plain)
    assert torch.equal(second, plain)
    assert rows.count == 0
    assert session.stats.replayed_calls == 6


def test_stage2_before_start_runs_no_unet_and_after_runs_one_call_per_step(world):
    host = CFGHost(world["ldm"], world["cond"], world["uncond"])
    session = MultiConceptSession(world["unet"], two_concepts(world, start_at=0.5))
    host.route = session.denoise
    with session.stage1():
        first = sample(host, "euler_a", steps=6, seed=4)
    rows = count_unet_rows(world["unet"])
    try:
        with session.stage2():
            second = sample(host, "euler_a", steps=6, seed=4)
    finally:
        rows.remove()
    # 3 steps replayed; 3 steps x (layout 1 + base 2 + 2 concepts x 2) rows in 3 calls
    assert session.stats.replayed_calls == 3
    assert rows.calls == 3 and rows.count == 3 * 7
    assert not torch.allclose(first, second)


@pytest.mark.parametrize("output", ["x0", "eps"])
def test_blend_takes_each_concepts_prediction_inside_its_mask_and_base_outside(world, output):
    session = MultiConceptSession(world["unet"], two_concepts(world, start_at=0.0, layout_replay=False))
    x_in, sigma_in, cond_in, out = one_call(world, session, output=output)
    uncond = padded(world["uncond"])
    alice = predict(merged_copy(world["unet"], [(world["alice_parts"], 0.8)]), x_in, sigma_in,
                    world["alice_cond"], uncond, 2, output)
    bob = predict(merged_copy(world["unet"], [(world["bob_parts"], 1.0)]), x_in, sigma_in,
                  padded(world["bob_cond"]), uncond, 2, output)
    base = predict(world["unet"], x_in, sigma_in, padded(world["cond"]), uncond, 2, output)
    weights = session.plan.regions.latent
    inside_alice, inside_bob, outside = weights[1] == 1, weights[2] == 1, weights[0] == 1
    assert inside_alice.sum() == 16 * 6 and inside_bob.sum() == 8 * 6 and outside.sum() == 256 - 96 - 48
    for region, reference in ((inside_alice, alice), (inside_bob, bob), (outside, base)):
        torch.testing.assert_close(out[..., region], reference[..., region], atol=2e-5, rtol=1e-4)
    # the other concept's LoRA does not reach alice's rows
    both = predict(merged_copy(world["unet"], [(world["alice_parts"], 0.8), (world["bob_parts"], 1.0)]),
                   x_in, sigma_in, world["alice_cond"], uncond, 2, output)
    assert (out[..., inside_alice] - both[..., inside_alice]).abs().max() > 1e-2
    assert (alice - base).abs().max() > 1e-2   # the LoRA and prompt matter at all


def test_concept_with_two_loras_equals_both_merged(world):
    plan = build_plan([dict(cond=world["alice_cond"], mask=torch.ones(IMAGE),
                            loras=[(world["alice"], 0.5), (world["bob"], -0.7)])],
                      IMAGE, start_at=0.0, layout_replay=False)
    session = MultiConceptSession(world["unet"], plan)
    x_in, sigma_in, _, out = one_call(world, session, batch=1)
    reference = predict(merged_copy(world["unet"], [(world["alice_parts"], 0.5), (world["bob_parts"], -0.7)]),
                        x_in, sigma_in, world["alice_cond"], padded(world["uncond"]), 1)
    torch.testing.assert_close(out, reference, atol=2e-5, rtol=1e-4)


def test_row_cap_splits_concepts_into_more_calls_with_the_same_result(world):
    whole = MultiConceptSession(world["unet"], two_concepts(world, start_at=0.0))
    split = MultiConceptSession(world["unet"], two_concepts(world, start_at=0.0, max_rows_per_call=6))
    *_, out_whole = one_call(world, whole)
    *_, out_split = one_call(world, split)
    torch.testing.assert_close(out_whole, out_split, atol=2e-5, rtol=1e-4)
    # stage 1 (1 call) + stage 2: layout+base (6 rows), then one call per concept
    assert (whole.stats.unet_calls, split.stats.unet_calls) == (2, 4)


class Capture:
    """Inputs and outputs of one attention module, via forward hooks around whatever forward it has."""

    def __init__(self, module):
        self.module, self.calls = module, []
        self.handle = module.register_forward_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs, output):
        context = kwargs.get("context", args[1] if len(args) > 1 else None)
        self.calls.append((args[0].detach(), None if context is None else context.detach(), output.detach()))

    def expected(self, x, context, probs_from):
        """to_out(softmax(q(x[probs_from]) k^T) v) per head: attention with another row's probabilities."""
        m = self.module
        source = x if context is None else context
        q, k, v = m.to_q(x), m.to_k(source), m.to_v(source)
        b, n, inner = q.shape
        h, d = m.heads, inner // m.heads
        split = lambda t: t.view(t.shape[0], t.shape[1], h, d).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        probs = (q @ k.transpose(-1, -2) * d ** -0.5).softmax(-1)
        probs = probs[probs_from]
        return m.to_out((probs @ v).transpose(1, 2).reshape(b, n, inner)), probs


def attention_modules(unet, kind):
    return {name: m for name, m in unet.named_modules() if name.endswith(kind)}


def test_layout_replay_gives_base_rows_the_layout_rows_attention_probabilities(world):
    unet, batch = world["unet"], 2
    session = MultiConceptSession(unet, two_concepts(world, start_at=0.0, self_attn_replay_until=1.0))
    cross = attention_modules(unet, "input_blocks.1.1.transformer_blocks.0.attn2")
    selfs = attention_modules(unet, "attn1")
    low_res = session._self_replay_tokens()
    captures = {name: Capture(m) for name, m in {**cross, **selfs}.items()}
    try:
        one_call(world, session, batch=batch, drift=1.0)
    finally:
        for c in captures.values():
            c.handle.remove()
    # rows of the stage-2 call: layout 0-1, base cond 2-3, base uncond 4-5, concepts after
    layout, base = [0, 1], [2, 3]
    replayed = unreplayed = 0
    with torch.no_grad():
        for name, capture in captures.items():
            x, context, output = capture.calls[-1]
            is_cross = context is not None
            if not is_cross and x.shape[1] > low_res:
                own, _ = capture.expected(x, context, list(range(x.shape[0])))
                torch.testing.assert_close(output[base], own[base], atol=1e-5, rtol=1e-4)
                unreplayed += 1
                continue
            order = list(range(x.shape[0]))
            order[2:4] = layout   # base cond rows take the layout rows' probabilities
            with_layout, probs = capture.expected(x, context, order)
            _, own_probs = capture.expected(x, context, list(range(x.shape[0])))
            assert (own_probs[base] - own_probs[layout]).abs().max() > 1e-3, name  # not vacuous
            torch.testing.assert_close(output[base], with_layout[base], atol=1e-5, rtol=1e-4)
            # uncond rows keep their own attention
            own, _ = capture.expected(x, context, list(range(x.shape[0])))
            torch.testing.assert_close(output[4:6], own[4:6], atol=1e-5, rtol=1e-4)
            replayed += 1
    assert replayed >= 2 and unreplayed >= 1


def test_self_attention_replay_stops_after_its_fraction_of_steps(world):
    unet = world["unet"]
    session = MultiConceptSession(unet, two_concepts(world, start_at=0.0, self_attn_replay_until=0.5))
    low = [m for m in attention_modules(unet, "attn1").values()]
    captures = [Capture(m) for m in low]
    host = CFGHost(world["ldm"], world["cond"], world["uncond"])
    host.route = session.denoise
    try:
        with session.stage1():
            sample(host, "euler", steps=6)
        with session.stage2():
            sample(host, "euler", steps=6)
    finally:
        for c in captures:
            c.handle.remove()
    low_res = session._self_replay_tokens()
    checked = 0
    with torch.no_grad():
        for capture in captures:
            stage2 = capture.calls[6:]
            assert len(stage2) == 6
            for step, (x, context, output) in enumerate(stage2):
                # at step 0 both stages share the latent, so replay is invisible there
                if x.shape[1] > low_res or step == 0:
                    continue
                own, _ = capture.expected(x, None, list(range(x.shape[0])))
                replayed = not torch.allclose(output[1:2], own[1:2], atol=1e-5, rtol=1e-4)
                assert replayed == (step < 3), (step, x.shape)
                checked += 1
    assert checked >= 5


class Boom(Exception):
    pass


def test_exception_in_the_middle_of_stage2_leaves_the_unet_exactly_as_before(world):
    unet = world["unet"]
    gen = torch.Generator().manual_seed(9)
    probe_x, probe_t = torch.randn((2, 4, 16, 16), generator=gen), torch.tensor([500, 20])
    probe_c = torch.randn((2, 8, 32), generator=gen)
    with torch.no_grad():
        before = unet(probe_x, probe_t, context=probe_c)
    host = CFGHost(world["ldm"], world["cond"], world["uncond"])
    plain = sample(host, "euler_a", steps=6, seed=7)
    session = MultiConceptSession(unet, two_concepts(world, start_at=0.2))
    calls = []

    def route(*args, **kwargs):
        calls.append(kwargs["step"])
        if session.phase == "blend" and len(calls) == 6 + 4:
            raise Boom("interrupted in the middle of stage 2")
        return session.denoise(*args, **kwargs)
    host.route = route
    with session.stage1():
        sample(host, "euler_a", steps=6, seed=7)
    with pytest.raises(Boom):
        with session.stage2():
            sample(host, "euler_a", steps=6, seed=7)
    assert session.run.call is None and session.phase is None
    assert not [n for n, m in unet.named_modules() if "forward" in m.__dict__]
    with torch.no_grad():
        after = unet(probe_x, probe_t, context=probe_c)
    assert torch.equal(before, after)
    host.route = None
    assert torch.equal(sample(host, "euler_a", steps=6, seed=7), plain)


def test_exception_inside_the_unet_call_also_cleans_up(world):
    unet = world["unet"]
    session = MultiConceptSession(unet, two_concepts(world, start_at=0.0))

    def failing_model(x, sigma, cond):
        unet(x, torch.zeros(x.shape[0]), context=cond["c_crossattn"])
        raise Boom("out of memory, say")
    x = torch.randn(2, 4, 16, 16)
    cond = {"c_crossattn": torch.cat([world["cond"], world["uncond"]])}
    with session.stage1():
        session.denoise(CFGHost(world["ldm"], world["cond"], world["uncond"]).model_fn, x,
                        torch.full((2,), 2.0), cond, n_cond=1, step=0, total_steps=1)
    with pytest.raises(Boom), session.stage2():
        session.denoise(failing_model, x, torch.full((2,), 2.0), cond, n_cond=1, step=0, total_steps=1)
    assert session.run.call is None
    assert not [n for n, m in unet.named_modules() if "forward" in m.__dict__]


def test_stage2_that_leaves_stage1_path_is_reported(world):
    host = CFGHost(world["ldm"], world["cond"], world["uncond"])
    session = MultiConceptSession(world["unet"], two_concepts(world, start_at=0.5))
    host.route = session.denoise
    with session.stage1():
        sample(host, "euler_a", steps=4, seed=1)
    with pytest.raises(EngineError, match="noise was not replayed"), session.stage2():
        sample(host, "euler_a", steps=4, seed=2)
    assert not [n for n, m in world["unet"].named_modules() if "forward" in m.__dict__]
