"""sd-webui-controlnet under Multi-Concept in A1111 (issue 13 item 3), driven as A1111 runs it:
the prompts marked by ControlNet's process_sample, its UNet forward hook running a ControlNet
on every UNet call's rows, an IP-Adapter hack on attn2 reading `cond_mark`
(tests/controlnetlike.py reproduces them from the extension's source; the UNet, its blocks and
k-diffusion are real). Each engine row must reach the ControlNet marked as its own kind, with
the hint of its own image, and no marker may reach the attention as a key."""

from types import SimpleNamespace

import pytest
import torch
from modules import shared

from a1111like import A1111Sampler, processing
from controlnetlike import ControlParams, IPAdapter, TinyControlNet, UnetHook, marked_batch
from lib_mc.hosts import a1111, webui
from lib_mc.plan import build_plan
from tinyhost import random_context, two_lora_world

IMAGE = (128, 128)
BATCH = 2


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return dict(two_lora_world(tmp_path_factory.mktemp("loras")), controlnet=TinyControlNet())


@pytest.fixture(autouse=True)
def host_options():
    saved = dict(vars(shared.opts))
    yield shared.opts
    vars(shared.opts).update(saved)


def plan_of(world, alice_cond=None, start_at=0.5):
    left, right = torch.zeros(IMAGE), torch.zeros(IMAGE)
    left[:, :56] = 1
    right[:, 72:] = 1
    return build_plan([
        dict(name="alice", cond=world["alice_cond"] if alice_cond is None else alice_cond,
             loras=[(world["alice"], 0.8)], mask=left),
        dict(name="bob", cond=world["bob_cond"], loras=[(world["bob"], 1.0)], mask=right),
    ], IMAGE, start_at=start_at, self_attn_replay_until=1.0)


def hint_per_row(rows: int) -> torch.Tensor:
    """A batch unit's hint (one image per host row: [cond images, uncond images]); row r is
    filled with r + 1 so the ControlNet's input names the row it came from."""
    return torch.arange(1, rows + 1, dtype=torch.float32)[:, None, None, None].expand(-1, 3, *IMAGE).clone()


def generate(world, plan, hint, split=False, ip_adapter=False, cfg_injection=False):
    """One txt2img batch with a ControlNet unit (and an IP-Adapter unit) hooked as the extension
    hooks them in `process`, before Multi-Concept's process_before_every_sampling."""
    shared.opts.batch_cond_uncond = not split
    p = processing(*IMAGE[::-1], steps=4, batch=BATCH, seed=3)
    p.sd_model = SimpleNamespace(model=SimpleNamespace(diffusion_model=world["unet"]), is_sdxl=False)
    p.sampler = A1111Sampler("Euler", world["ldm"], shared.opts)
    unit = ControlParams(control_model=world["controlnet"], hint_cond=hint, used_hint_cond=None, weight=1.0,
                         cfg_injection=cfg_injection)
    hook = UnetHook(world["unet"], [unit])
    ip = IPAdapter(world["unet"]) if ip_adapter else None
    p.scripts = SimpleNamespace(alwayson_scripts=[SimpleNamespace(latest_network=hook)])
    state = webui.JobState(job=SimpleNamespace(save_layout=False, mode="blend"))
    state.prepared = SimpleNamespace(plan=plan, warnings=[])
    p._multi_concept = state
    hook.hook()
    if ip is not None:
        ip.hook()
    try:
        a1111.process_before_every_sampling(p)
        cond = marked_batch(world["cond"].expand(BATCH, -1, -1), positive=True)
        uncond = marked_batch(world["uncond"].expand(BATCH, -1, -1), positive=False)
        out = p.sampler.sample(p, p.rng.next(), cond, uncond)
    finally:
        hook.restore()
        if ip is not None:
            ip.restore()
    return out, hook, ip, state.session


def stage2_calls(hook):
    """The UNet calls of stage 2 (rows other than the host's 2 x BATCH or BATCH)."""
    return [c for c in hook.calls if c["rows"] not in (BATCH, 2 * BATCH)]


@pytest.mark.parametrize("split", [False, True])
def test_every_row_reaches_controlnet_marked_as_its_kind_and_no_marker_reaches_attention(world, split):
    out, hook, ip, session = generate(world, plan_of(world), hint_per_row(1)[:1], split=split, ip_adapter=True)
    assert torch.isfinite(out).all()
    engine_calls = stage2_calls(hook)
    assert engine_calls, "stage 2 made no engine calls"
    for call in hook.calls:
        assert call["marked"], "a UNet call whose rows were not all marked: ControlNet keeps the marker as a key"
        assert call["context"].abs().max() < 100   # the +-1024 token is gone
    # per stage-2 call, cond_mark must follow the engine's rows: layout cond, base cond/uncond,
    # each concept cond/uncond; with split calls, all cond or all uncond
    groups = [(BATCH, 0), (BATCH, BATCH), (BATCH, BATCH), (BATCH, BATCH)]   # layout, base, alice, bob
    if split:
        cond_call = [1.0] * (4 * BATCH)
        uncond_call = [0.0] * (3 * BATCH)
        assert sorted({tuple(c["cond_mark"]) for c in engine_calls}) == sorted({tuple(cond_call), tuple(uncond_call)})
    else:
        expected = [v for n_c, n_u in groups for v in [1.0] * n_c + [0.0] * n_u]
        assert all(c["cond_mark"] == expected for c in engine_calls)
    # the IP-Adapter hack took the cond image embedding exactly on the cond rows
    for seen, call in zip(ip.seen[-len(engine_calls) * len(ip.modules):],
                          [c for c in engine_calls for _ in ip.modules]):
        assert ((seen != 0).float().tolist()) == call["cond_mark"]


def test_each_row_gets_the_hint_of_its_own_image_and_kind(world):
    out, hook, _, session = generate(world, plan_of(world), hint_per_row(2 * BATCH))
    assert torch.isfinite(out).all()
    engine_calls = stage2_calls(hook)
    assert engine_calls
    # engine rows: layout (cond of images 0, 1), base, alice, bob (cond 0, 1 then uncond 0, 1);
    # host rows are [cond 0, cond 1, uncond 0, uncond 1]: hint values 1, 2, 3, 4
    expected = [1, 2] + [1, 2, 3, 4] * 3
    for call in engine_calls:
        assert call["hints"][0][:, 0, 0, 0].tolist() == expected
    for call in hook.calls:
        if call["rows"] == 2 * BATCH:   # stage 1: the host's own rows
            assert call["hints"][0][:, 0, 0, 0].tolist() == [1, 2, 3, 4]


def test_the_layout_rows_get_stage1s_prediction_back(world):
    """At the first blended evaluation the layout rows are stage 1's rows again (its latent, the
    main prompt, its ControlNet residuals and IP-Adapter embedding): the UNet must predict what
    stage 1 predicted for them. Concept prompts of the main prompt's length (no padding)."""
    plan = plan_of(world, alice_cond=random_context(3))
    out, hook, _, session = generate(world, plan, hint_per_row(1)[:1], ip_adapter=True, cfg_injection=True)
    stage1 = [c for c in hook.calls if c["rows"] == 2 * BATCH]
    first_blended = stage2_calls(hook)[0]
    start = plan.start_step(4)
    torch.testing.assert_close(first_blended["out"][:BATCH], stage1[start]["out"][:BATCH], atol=1e-5, rtol=1e-4)

