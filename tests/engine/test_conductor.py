"""Conductor mode (Concept Conductor's concept injection) on the real ldm UNet with kohya LoRAs,
driven as A1111 drives it: base rows and each concept's rows in one call, the base rows' decoder
attention outputs taken from the concepts inside their regions, the base rows' prediction returned."""

import pytest
import torch
from k_diffusion.external import CompVisDenoiser

from lib_mc.conds import pad_context
from lib_mc.engine import make_session
from lib_mc.methods.conductor.layers import alignment_layer, decoder_attention, refinement_layer
from lib_mc.plan import build_plan
from tinyhost import CFGHost, count_unet_rows, make_unet, sample, two_lora_world

IMAGE = (128, 128)   # latent 16 x 16; attention at 16 x 16, 8 x 8 and 4 x 4


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return two_lora_world(tmp_path_factory.mktemp("loras"))


def columns(lo, hi):
    mask = torch.zeros(IMAGE)
    mask[:, lo:hi] = 1
    return mask


def alice(world, mask, weight=0.8):
    return dict(name="alice", cond=world["alice_cond"], loras=[(world["alice"], weight)], mask=mask)


def bob(world, mask):
    return dict(name="bob", cond=world["bob_cond"], loras=[(world["bob"], 1.0)], mask=mask)


def plan_of(concepts, **options):
    return build_plan(concepts, IMAGE, **{"start_at": 0.0, "mask_refine": False, **options})


class Recorded:
    """Every call of model_fn (rows in, rows out) and every decoder attention output."""

    def __init__(self, world):
        self.denoiser = CompVisDenoiser(world["ldm"])
        self.outputs: list[torch.Tensor] = []
        self.attention: dict[str, list[torch.Tensor]] = {}
        self.handles = [module.register_forward_hook(
            lambda m, args, out, name=name: self.attention.setdefault(name, []).append(out.detach().clone()))
            for module, name in decoder_attention(world["unet"]).items()]

    def model_fn(self, x, sigma, cond):
        out = self.denoiser(x, sigma, cond=cond)
        self.outputs.append(out.detach().clone())
        return out

    def remove(self):
        for handle in self.handles:
            handle.remove()


def inputs(world, batch=1, seed=5):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, 4, 16, 16), generator=gen) * 3
    cond = {"c_crossattn": torch.cat([world["cond"].expand(batch, -1, -1), world["uncond"].expand(batch, -1, -1)])}
    return torch.cat([x, x]), torch.full((2 * batch,), 3.0), cond


def one_call(world, session, recorded, batch=1):
    x, sigma, cond = inputs(world, batch)
    with torch.no_grad(), session.single_pass():
        return session.denoise(recorded.model_fn, x, sigma, cond, n_cond=batch, step=0, total_steps=1)


def unpatched(unet):
    return not [n for n, m in unet.named_modules() if "forward" in vars(m)]


def test_a_whole_image_concept_gives_every_decoder_attention_output_and_keeps_the_base_prediction(world):
    session = make_session("conductor", world["unet"], plan_of([alice(world, torch.ones(IMAGE))]))
    recorded = Recorded(world)
    try:
        out = one_call(world, session, recorded)
    finally:
        recorded.remove()
    assert unpatched(world["unet"])
    # one call: base rows [cond, uncond] then alice's [cond, uncond]
    assert len(recorded.outputs) == 1 and recorded.outputs[0].shape[0] == 4
    assert len(recorded.attention) == len(decoder_attention(world["unet"])) > 0
    for name, (layer,) in recorded.attention.items():
        assert torch.equal(layer[:2], layer[2:]), name
    # the prediction is the base rows', which differs from the concept branch's own
    assert torch.equal(out, recorded.outputs[0][:2])
    assert (recorded.outputs[0][:2] - recorded.outputs[0][2:]).abs().max() > 1e-3


def test_outside_its_region_the_base_rows_are_untouched_at_the_first_decoder_layer(world):
    plan = plan_of([alice(world, columns(0, 48))])
    session = make_session("conductor", world["unet"], plan)
    recorded = Recorded(world)
    try:
        one_call(world, session, recorded)
        x, sigma, cond = inputs(world)
        # the plain UNet on the base rows, their context padded as in the branch call (alice's prompt is longer)
        padded = {"c_crossattn": pad_context(cond["c_crossattn"], world["alice_cond"].shape[1])}
        with torch.no_grad():
            recorded.model_fn(x, sigma, padded)
    finally:
        recorded.remove()
    name = min(recorded.attention, key=lambda n: (int(n.split(".")[1]), n))   # output_blocks.N...attn1 first
    assert name.endswith("attn1")
    conducted, plain = recorded.attention[name]
    weights = plan.regions.at_tokens(conducted.shape[1])
    outside, inside = weights[0] == 1, weights[0] == 0
    assert outside.any() and inside.any()
    torch.testing.assert_close(conducted[:2, outside], plain[:, outside], rtol=1e-5, atol=1e-5)
    assert (conducted[:2, inside] - plain[:, inside]).abs().max() > 1e-3
    torch.testing.assert_close(conducted[:2, inside], conducted[2:, inside])   # = alice's branch there


def test_the_encoder_is_not_injected(world):
    session = make_session("conductor", world["unet"], plan_of([alice(world, torch.ones(IMAGE))]))
    seen = []
    encoder = [m for n, m in world["unet"].named_modules() if n.startswith("input_blocks") and n.endswith("attn1")][0]
    handle = encoder.register_forward_hook(lambda m, args, out: seen.append(out.detach().clone()))
    try:
        one_call(world, session, Recorded(world))
    finally:
        handle.remove()
    (out,) = seen
    assert (out[:2] - out[2:]).abs().max() > 1e-4   # the base rows' encoder is their own


def test_overlapping_concepts_split_by_front_to_back_order(world):
    # bob (later, in front) over alice where they overlap: the base takes bob's output there
    plan = plan_of([alice(world, columns(0, 96)), bob(world, columns(48, 128))])
    session = make_session("conductor", world["unet"], plan)
    recorded = Recorded(world)
    try:
        one_call(world, session, recorded)
    finally:
        recorded.remove()
    name = min(recorded.attention, key=lambda n: (int(n.split(".")[1]), n))
    (layer,) = recorded.attention[name]
    weights = plan.regions.at_tokens(layer.shape[1])
    only_alice, bob_front = weights[1] == 1, weights[2] == 1
    assert only_alice.any() and bob_front.any()
    torch.testing.assert_close(layer[:2, only_alice], layer[2:4, only_alice])
    torch.testing.assert_close(layer[:2, bob_front], layer[4:6, bob_front])


def test_split_calls_under_a_row_cap_give_the_one_call_result(world):
    concepts = [alice(world, columns(0, 48)), bob(world, columns(80, 128))]
    whole = one_call(world, make_session("conductor", world["unet"], plan_of(concepts)), Recorded(world), batch=2)
    recorded = Recorded(world)
    try:
        split = one_call(world, make_session("conductor", world["unet"], plan_of(concepts, max_rows_per_call=4)),
                         recorded, batch=2)
    finally:
        recorded.remove()
    assert [o.shape[0] for o in recorded.outputs] == [4, 4, 4]   # alice, bob, then the base rows
    # other row counts pick other BLAS blockings: float32 rounding only
    torch.testing.assert_close(split, whole, rtol=1e-4, atol=1e-4)


def conductor_run(world, plan, steps=6, mode="conductor"):
    session = make_session(mode, world["unet"], plan)
    host = CFGHost(world["ldm"], world["cond"], world["uncond"])
    host.route = session.denoise
    counter = count_unet_rows(world["unet"])
    try:
        if mode == "blend":
            with session.stage1():
                sample(host, steps=steps)
            host.route = session.denoise
            with session.stage2():
                out = sample(host, steps=steps)
        else:
            with session.single_pass():
                out = sample(host, steps=steps)
    finally:
        counter.remove()
    return out, counter.count, session


def test_steps_before_the_start_are_plain_and_cost_no_more_than_blend(world):
    concepts = [alice(world, columns(0, 48)), bob(world, columns(80, 128))]
    out, rows, session = conductor_run(world, plan_of(concepts, start_at=0.5))
    assert rows == 3 * 2 + 3 * 2 * 3   # 3 plain steps, then base + 2 concepts, cond and uncond
    plain_host = CFGHost(world["ldm"], world["cond"], world["uncond"])
    plain = sample(plain_host, steps=6)
    assert (out - plain).abs().max() > 1e-3
    _, blend_rows, _ = conductor_run(world, plan_of(concepts, start_at=0.5), mode="blend")
    assert rows <= blend_rows
    assert unpatched(world["unet"])


def test_automatic_regions_are_found_at_the_start_step(world):
    auto = dict(name="alice", cond=world["alice_cond"], loras=[(world["alice"], 0.8)], auto_tokens=[2])
    plan = plan_of([auto, bob(world, columns(80, 128))], start_at=0.5)
    out, _, session = conductor_run(world, plan)
    assert plan.image_regions is not None and plan.found_masks.shape[:2] == (1, 1)
    assert torch.isfinite(out).all()


def test_paper_layers_on_sd15_and_sdxl_shaped_unets():
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    sd15 = UNetModel(image_size=32, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[4, 2, 1],
                     num_res_blocks=2, channel_mult=(1, 2, 4, 4), num_heads=2, use_spatial_transformer=True,
                     transformer_depth=1, context_dim=16, legacy=False)
    assert alignment_layer(sd15)[0] == "output_blocks.3.1.transformer_blocks.0.attn1"
    assert refinement_layer(sd15)[0] == "output_blocks.8.1.transformer_blocks.0.attn1"
    from tinyxl import make_xl_unet
    xl = make_xl_unet()
    assert alignment_layer(xl)[0].startswith("output_blocks.1.1.transformer_blocks.")
    assert refinement_layer(xl)[0] == "output_blocks.5.1.transformer_blocks.0.attn1"
    tiny = make_unet()   # one res block per level
    assert alignment_layer(tiny)[0] == "output_blocks.2.1.transformer_blocks.0.attn1"
