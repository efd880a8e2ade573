"""Forge's routing (lib_mc/hosts/forge_routing.py) on the real ldm UNet, driven the way Forge
drives its own UNet: rows batched [uncond, cond] with `cond_or_uncond`, a `model_function_wrapper`
around `apply_model`, and attention through replace patches `fn(q, k, v, extra_options)` keyed
by (block, number, transformer index). The engine must give the same result as on A1111's path.
"""

import re

import pytest
import torch
import torch.nn.functional as F
from k_diffusion.external import CompVisDenoiser
from torch import nn

from lib_mc.engine import MultiConceptSession, make_session
from lib_mc.hosts.forge_routing import call_options, engine_order, install_attention, make_unet_wrapper, map_control
from lib_mc.patcher import PatchSet
from lib_mc.plan import build_plan
from tinyhost import TinyLDM, merged_copy, two_lora_world

IMAGE = (128, 128)   # latent 16 x 16
BLOCK_NAME = re.compile(r"(input_blocks|middle_block|output_blocks)\.?(\d*)\.?\d*\.transformer_blocks\.(\d+)\.(attn[12])$")


class PatcherOptions:
    """The part of Forge's UnetPatcher that `install_attention` uses: model_options and
    `set_model_patch_replace`, storing patches as Forge does."""

    def __init__(self):
        self.model_options = {"transformer_options": {}}

    def set_model_patch_replace(self, patch, name, block_name, number, transformer_index):
        replace = self.model_options["transformer_options"].setdefault("patches_replace", {})
        replace.setdefault(name, {})[(block_name, number, transformer_index)] = patch

    def set_model_patch(self, patch, name):
        patches = self.model_options["transformer_options"].setdefault("patches", {})
        patches[name] = patches.get(name, []) + [patch]

    def set_model_attn1_output_patch(self, patch):
        self.set_model_patch(patch, "attn1_output_patch")

    def set_model_attn2_output_patch(self, patch):
        self.set_model_patch(patch, "attn2_output_patch")


def host_attention(q, k, v, heads):
    """Forge's attention_function: (B, n, heads*d) in and out."""
    b, n, inner = q.shape
    split = [t.view(b, -1, heads, inner // heads).transpose(1, 2) for t in (q, k, v)]
    return F.scaled_dot_product_attention(*split).transpose(1, 2).reshape(b, n, inner)


def forge_block_attention(unet: nn.Module, patcher: PatcherOptions) -> PatchSet:
    """Forge's BasicTransformerBlock calls a replace patch with projected q, k, v, applies
    to_out to what it returns, then the attention output patches; this puts that convention on
    the ldm attention modules."""
    table = patcher.model_options["transformer_options"]["patches_replace"]
    after = patcher.model_options["transformer_options"].get("patches", {})
    patches = PatchSet()
    for name, module in unet.named_modules():
        m = BLOCK_NAME.search(name)
        if not m:
            continue
        kind = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}[m[1]]
        key = (kind, 0 if kind == "middle" else int(m[2] or 0), int(m[3]))   # Forge: block ("middle", 0)

        def wrap(original, module=module, attn=m[4], key=key):
            def forward(x, context=None, mask=None, **kwargs):
                source = x if attn == "attn1" else context
                q, k, v = module.to_q(x), module.to_k(source), module.to_v(source)
                options = {"n_heads": module.heads, "block": key[:2], "block_index": key[2]}
                out = module.to_out(table[attn][key](q, k, v, options))
                for patch in after.get(f"{attn}_output_patch", []):
                    out = patch(out, options)
                return out
            return forward
        patches.add(module, "forward", wrap)
    return patches


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return two_lora_world(tmp_path_factory.mktemp("loras"))


def plan_of(world, auto=False):
    left, right = torch.zeros(IMAGE), torch.zeros(IMAGE)
    left[:, :48] = 1
    right[:64, 80:] = 1
    alice = dict(name="alice", cond=world["alice_cond"], loras=[(world["alice"], 0.8)])
    alice.update(auto_tokens=[2]) if auto else alice.update(mask=left)
    return build_plan([alice, dict(name="bob", cond=world["bob_cond"], loras=[(world["bob"], 1.0)], mask=right)],
                      IMAGE, start_at=0.0, layout_replay=True, self_attn_replay_until=1.0)


def inputs(world, batch=2, seed=5):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, 4, 16, 16), generator=gen) * 3
    return x, torch.full((batch,), 3.0)


def a1111_path(world, plan, x, sigma):
    """Stage 1 then stage 2 through the engine as A1111 calls it: [cond, uncond] rows."""
    batch = x.shape[0]
    session = MultiConceptSession(world["unet"], plan)
    denoiser = CompVisDenoiser(world["ldm"])
    cond = {"c_crossattn": torch.cat([world["cond"].expand(batch, -1, -1), world["uncond"].expand(batch, -1, -1)])}
    x_in, sigma_in = torch.cat([x, x]), torch.cat([sigma, sigma])
    model_fn = lambda xx, ss, cc: denoiser(xx, ss, cond=cc)   # noqa: E731
    with torch.no_grad():
        with session.stage1():
            first = session.denoise(model_fn, x_in, sigma_in, cond, n_cond=batch, step=0, total_steps=1)
        with session.stage2():
            second = session.denoise(model_fn, x_in, sigma_in, cond, n_cond=batch, step=0, total_steps=1)
    return session, first, second


def forge_path(world, plan, x, sigma, control=None, seen=None, stage2_split=False):
    """The same through forge_routing, called as Forge's calc_cond_uncond_batch calls the
    wrapper: rows [uncond, cond], cond_or_uncond [1, 0], options and ControlNet residuals.
    stage2_split: in stage 2 Forge found less free memory and calls cond and uncond apart."""
    batch = x.shape[0]
    session = MultiConceptSession(world["unet"], plan, attention_on_modules=False)
    patcher = PatcherOptions()
    install_attention(patcher, session, host_attention)
    denoiser = CompVisDenoiser(world["ldm"])

    def apply_model(xx, tt, c_crossattn=None, transformer_options=None, control=None, **kwargs):
        if seen is not None:
            seen.append(dict(rows=xx.shape[0], options=transformer_options, control=control))
        return denoiser(xx, tt, cond={"c_crossattn": c_crossattn})

    wrapper = make_unet_wrapper(session, step=lambda: 0, total_steps=lambda: 1)
    args = {"input": torch.cat([x, x]), "timestep": torch.cat([sigma, sigma]), "cond_or_uncond": [1, 0],
            "c": {"c_crossattn": torch.cat([world["uncond"].expand(batch, -1, -1), world["cond"].expand(batch, -1, -1)]),
                  "transformer_options": {"sigmas": sigma}, "control": control}}
    with torch.no_grad(), forge_block_attention(world["unet"], patcher):
        with session.stage1():
            first = wrapper(apply_model, args)
        with session.stage2():
            if not stage2_split:
                second = wrapper(apply_model, args)
            else:
                halves = []
                for flag, rows in ((0, slice(batch, None)), (1, slice(0, batch))):
                    part = {"input": args["input"][rows], "timestep": args["timestep"][rows], "cond_or_uncond": [flag],
                            "c": {"c_crossattn": args["c"]["c_crossattn"][rows],
                                  "transformer_options": {"sigmas": sigma}, "control": control}}
                    halves.append(wrapper(apply_model, part))
                second = torch.cat([halves[1], halves[0]])   # back in Forge's [uncond, cond] order
    return session, first, second


def test_forge_rows_and_attention_patches_give_the_engine_result_of_the_a1111_path(world):
    x, sigma = inputs(world)
    plan = plan_of(world)
    _, first_a, second_a = a1111_path(world, plan, x, sigma)
    _, first_f, second_f = forge_path(world, plan_of(world), x, sigma)
    # Forge's rows are [uncond, cond]; the A1111 path's [cond, uncond]
    assert torch.allclose(torch.cat([first_f[2:], first_f[:2]]), first_a, atol=1e-5)
    assert torch.allclose(torch.cat([second_f[2:], second_f[:2]]), second_a, atol=1e-5)
    # and the concepts changed the picture (replay, key masks and LoRA rows all took part)
    assert (second_a - first_a).abs().max() > 1e-2


def test_forge_batching_cond_and_uncond_differently_in_stage_2_gives_the_same_result(world):
    """Forge picks its cond/uncond batching from free memory at every step: stage 1 batched,
    stage 2 in two calls ([cond], then [uncond])."""
    x, sigma = inputs(world)
    _, _, batched = forge_path(world, plan_of(world), x, sigma)
    _, _, split = forge_path(world, plan_of(world), x, sigma, stage2_split=True)
    assert torch.allclose(batched, split, rtol=1e-4, atol=1e-4)


def test_stage1_records_the_same_attention_maps_for_automatic_regions(world):
    x, sigma = inputs(world)
    session_a, _, _ = a1111_path(world, plan_of(world, auto=True), x, sigma)
    session_f, _, _ = forge_path(world, plan_of(world, auto=True), x, sigma)
    assert session_a.recorder.sums and session_a.recorder.sums.keys() == session_f.recorder.sums.keys()
    for n, by_image in session_a.recorder.sums.items():
        assert by_image.keys() == session_f.recorder.sums[n].keys()
        for image, summed in by_image.items():
            assert torch.allclose(summed, session_f.recorder.sums[n][image], atol=1e-5)
    assert torch.equal(session_a.plan.found_masks, session_f.plan.found_masks)


def test_each_call_gets_options_and_controlnet_residuals_of_its_own_rows(world):
    x, sigma = inputs(world)
    batch = x.shape[0]
    # a residual per Forge row that names the row: rows 0-1 uncond, 2-3 cond
    residual = torch.arange(2 * batch, dtype=torch.float32)[:, None, None, None].expand(-1, 32, 16, 16)
    control = {"input": [], "middle": [residual.clone()], "output": []}
    seen = []
    forge_path(world, plan_of(world), x, sigma, control=control, seen=seen)
    stage1, stage2 = seen
    assert stage1["rows"] == 4 and stage1["options"]["cond_or_uncond"] == [0, 1]
    assert stage1["control"]["middle"][0][:, 0, 0, 0].tolist() == [2, 3, 0, 1]   # engine order: cond first
    # stage 2, one call: layout (cond 2) + base (2 + 2) + 2 concepts (2 + 2 each) = 14 rows
    assert stage2["rows"] == 14
    flags = stage2["options"]["cond_mark"].tolist()
    assert flags == [0, 0] + [0, 0, 1, 1] * 3
    assert stage2["options"]["cond_or_uncond"] == [0, 0, 1, 0, 1, 0, 1]
    assert stage2["options"]["cond_indices"] == [i for i, f in enumerate(flags) if f == 0]
    rows_named = stage2["control"]["middle"][0][:, 0, 0, 0].tolist()
    assert rows_named == [2, 3] + [2, 3, 0, 1] * 3
    assert control["middle"][0] is not None and len(control["middle"]) == 1   # Forge's own lists untouched


def test_engine_order_and_options_helpers():
    assert engine_order([1, 0], 2).tolist() == [2, 3, 0, 1]
    assert engine_order([0, 1, 0], 1).tolist() == [0, 2, 1]
    options = {"sigmas": None, "patches": {"x": 1}}
    out = call_options(options, [0, 0, 1, 1], 2, torch.tensor([1.0, 1.0]))
    assert out["cond_or_uncond"] == [0, 1] and out["patches"] is options["patches"] and "cond_or_uncond" not in options
    assert map_control(None, torch.arange(2), 2) is None


class HostLinear(nn.Module):
    """Shaped like Forge's ForgeOperations.Linear: a plain Module with a 2-D weight, not nn.Linear."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


def test_lora_rows_reach_host_linear_layers_that_are_not_nn_linear(world):
    import copy
    unet = copy.deepcopy(world["unet"])
    for name, module in list(unet.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, child_name, HostLinear(child))
    assert not any(type(m) is nn.Linear for m in unet.modules())
    full = torch.ones(IMAGE)
    plan = build_plan([dict(name="alice", cond=world["cond"], loras=[(world["alice"], 0.8)], mask=full)], IMAGE,
                      start_at=0.0, layout_replay=False)
    session = MultiConceptSession(unet, plan, attention_on_modules=False)
    x, sigma = inputs(world, batch=1)
    denoiser = CompVisDenoiser(TinyLDM(unet))
    cond = {"c_crossattn": torch.cat([world["cond"], world["uncond"]])}
    model_fn = lambda xx, ss, cc: denoiser(xx, ss, cond=cc)   # noqa: E731
    with torch.no_grad():
        with session.stage1():
            session.denoise(model_fn, torch.cat([x, x]), torch.cat([sigma, sigma]), cond, n_cond=1, step=0, total_steps=1)
        with session.stage2():
            out = session.denoise(model_fn, torch.cat([x, x]), torch.cat([sigma, sigma]), cond, n_cond=1,
                                  step=0, total_steps=1)
        merged = CompVisDenoiser(TinyLDM(merged_copy(world["unet"], [(world["alice_parts"], 0.8)])))
        expected = merged(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=cond)
    assert torch.allclose(out, expected, atol=1e-4)


# ---- regional mode: the Forge path (wrapper + replace patches) against the A1111 path (module hooks) ----

def regional_plan(world, isolation=True, aligned=True):
    """aligned: regions on the 2x2 grid's cells, so every attention layer sees them whole (weights 0
    or 1); else plan_of's regions, which the 8x8 and coarser layers see in part."""
    left, right = torch.zeros(IMAGE), torch.zeros(IMAGE)
    if aligned:
        left[:, :64], right[:64, 64:] = 1, 1
    else:
        left[:, :48], right[:64, 80:] = 1, 1
    return build_plan([dict(name="alice", cond=world["alice_cond"], loras=[(world["alice"], 0.8)], mask=left),
                       dict(name="bob", cond=world["bob_cond"], loras=[(world["bob"], 1.0)], mask=right)],
                      IMAGE, start_at=0.0, isolation=isolation)


def a1111_regional(world, plan, x, sigma):
    """One regional call as A1111 makes it: [cond, uncond] rows, the engine's hooks on the modules."""
    batch = x.shape[0]
    session = make_session("regional", world["unet"], plan)
    denoiser = CompVisDenoiser(world["ldm"])
    cond = {"c_crossattn": torch.cat([world["cond"].expand(batch, -1, -1), world["uncond"].expand(batch, -1, -1)])}
    with torch.no_grad(), session.single_pass():
        return session.denoise(lambda xx, ss, cc: denoiser(xx, ss, cond=cc), torch.cat([x, x]),
                               torch.cat([sigma, sigma]), cond, n_cond=batch, step=0, total_steps=1)


def forge_regional(world, plan, x, sigma, split=False, mode="regional"):
    """The same call through forge_routing as Forge makes it: rows [uncond, cond] in one call, or
    ([uncond], [cond]) apart; the attention through the replace patches. -> [cond, uncond] rows."""
    batch = x.shape[0]
    session = make_session(mode, world["unet"], plan, attention_on_modules=False)
    patcher = PatcherOptions()
    install_attention(patcher, session, host_attention)
    denoiser = CompVisDenoiser(world["ldm"])

    def apply_model(xx, tt, c_crossattn=None, transformer_options=None, control=None, **kwargs):
        return denoiser(xx, tt, cond={"c_crossattn": c_crossattn})

    wrapper = make_unet_wrapper(session, step=lambda: 0, total_steps=lambda: 1)
    contexts = torch.cat([world["uncond"].expand(batch, -1, -1), world["cond"].expand(batch, -1, -1)])
    parts = [([1, 0], slice(None))] if not split else [([1], slice(0, batch)), ([0], slice(batch, None))]
    outs = []
    with torch.no_grad(), forge_block_attention(world["unet"], patcher), session.single_pass():
        for flags, rows in parts:
            outs.append(wrapper(apply_model, {
                "input": torch.cat([x, x])[rows], "timestep": torch.cat([sigma, sigma])[rows], "cond_or_uncond": flags,
                "c": {"c_crossattn": contexts[rows], "transformer_options": {"sigmas": sigma}, "control": None}}))
    out = torch.cat(outs)
    return torch.cat([out[batch:], out[:batch]])


@pytest.mark.parametrize("split", [False, True], ids=["batched", "split"])
@pytest.mark.parametrize("isolation", [True, False], ids=["isolated", "not-isolated"])
def test_forge_regional_call_gives_the_a1111_result(world, isolation, split):
    x, sigma = inputs(world)
    a1111 = a1111_regional(world, regional_plan(world, isolation), x, sigma)
    forge = forge_regional(world, regional_plan(world, isolation), x, sigma, split=split)
    assert torch.allclose(forge, a1111, rtol=1e-4, atol=1e-4), (forge - a1111).abs().max()
    # the concepts acted: not the plain UNet's output
    batch = x.shape[0]
    with torch.no_grad():
        plain = CompVisDenoiser(world["ldm"])(torch.cat([x, x]), torch.cat([sigma, sigma]), cond={"c_crossattn": torch.cat(
            [world["cond"].expand(batch, -1, -1), world["uncond"].expand(batch, -1, -1)])})
    assert (a1111 - plain).abs().max() > 1e-1


def test_forge_regional_isolation_takes_part(world):
    x, sigma = inputs(world)
    isolated = forge_regional(world, regional_plan(world, True), x, sigma)
    assert (isolated - forge_regional(world, regional_plan(world, False), x, sigma)).abs().max() > 1e-2


@pytest.mark.parametrize("isolation", [True, False], ids=["isolated", "not-isolated"])
def test_forge_regional_call_gives_the_a1111_result_where_regions_cut_through_cells(world, isolation):
    """Fractional region weights (edges the 8x8 and coarser layers see in part): A1111 projects q
    and applies to_out per branch, Forge hands over one q and applies to_out after the patch; the
    concepts' LoRAs on those layers must act alike in both."""
    x, sigma = inputs(world)
    a1111 = a1111_regional(world, regional_plan(world, isolation, aligned=False), x, sigma)
    forge = forge_regional(world, regional_plan(world, isolation, aligned=False), x, sigma)
    assert torch.allclose(forge, a1111, rtol=1e-4, atol=1e-4), (forge - a1111).abs().max()


# ---- conductor mode: the injection through Forge's attention output patches -------------------

def conductor_plan(world, **options):
    left, right = torch.zeros(IMAGE), torch.zeros(IMAGE)
    left[:, :56] = 1
    right[:, 72:] = 1
    return build_plan([dict(name="alice", cond=world["alice_cond"], loras=[(world["alice"], 0.8)], mask=left),
                       dict(name="bob", cond=world["bob_cond"], loras=[(world["bob"], 1.0)], mask=right)],
                      IMAGE, start_at=0.0, mask_refine=False, **options)


@pytest.mark.parametrize("cap", [None, 4], ids=["one-call", "row-cap"])
@pytest.mark.parametrize("split", [False, True], ids=["batched", "split"])
def test_forge_conductor_call_gives_the_a1111_result(world, split, cap):
    x, sigma = inputs(world)
    batch = x.shape[0]
    cond = {"c_crossattn": torch.cat([world["cond"].expand(batch, -1, -1), world["uncond"].expand(batch, -1, -1)])}
    session = make_session("conductor", world["unet"], conductor_plan(world))
    denoiser = CompVisDenoiser(world["ldm"])
    with torch.no_grad(), session.single_pass():
        a1111 = session.denoise(lambda xx, ss, cc: denoiser(xx, ss, cond=cc), torch.cat([x, x]),
                                torch.cat([sigma, sigma]), cond, n_cond=batch, step=0, total_steps=1)
    forge = forge_regional(world, conductor_plan(world, max_rows_per_call=cap), x, sigma, split=split, mode="conductor")
    assert torch.allclose(forge, a1111, rtol=1e-4, atol=1e-4), (forge - a1111).abs().max()
    with torch.no_grad():
        plain = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=cond)
    assert (a1111 - plain).abs().max() > 1e-2   # the concepts were injected
