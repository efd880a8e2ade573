"""Regional mode (LoRA-Composer's one pass) on the real ldm UNet (and sgm's for SDXL), driven like
A1111 drives it: region-aware LoRA injection, region-aware cross-attention, concept isolation,
automatic regions and latent re-initialisation in the same pass, against per-layer references
computed with merged-LoRA copies of the real modules."""

import math

import pytest
import torch
from k_diffusion import sampling
from k_diffusion.external import CompVisDenoiser

import lib_mc.methods.regional.attention as regional_attention
from lib_mc.conds import pad_context
from lib_mc.engine import CallImages, HostPass, make_session
from lib_mc.lora import load_network
from lib_mc.methods.regional.reinit import box_of, reinitialise, strongest_window
from lib_mc.plan import build_plan
from planted import PlantedQuery, cells, covers, plant
from tinyhost import (CFGHost, TinyLDM, count_unet_rows, euler_pass, make_unet, merged_copy, random_context,
                      sample, two_lora_world)

IMAGE = (128, 128)   # latent 16 x 16; attention at 16 x 16, 8 x 8 and 4 x 4


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return two_lora_world(tmp_path_factory.mktemp("loras"))


def columns(lo, hi):
    mask = torch.zeros(IMAGE)
    mask[:, lo:hi] = 1
    return mask


def two_concepts(world, alice_loras=True, **options):
    # alice: left 3/8 (12-token prompt), bob: right 3/8 (8 tokens, LoCon); the middle is background
    return build_plan([
        dict(name="alice", cond=world["alice_cond"], loras=[(world["alice"], 0.8)] if alice_loras else [],
             mask=columns(0, 48)),
        dict(name="bob", cond=world["bob_cond"], loras=[(world["bob"], 1.0)], mask=columns(80, 128)),
    ], IMAGE, **{"start_at": 0.0, **options})


def model_fn_of(ldm):
    denoiser = CompVisDenoiser(ldm)
    return lambda x, sigma, cond: denoiser(x, sigma, cond=cond)


def one_call(world, session, batch=1, seed=5):
    """One A1111-shaped denoiser call ([cond rows, uncond rows]) in the regional pass."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, 4, 16, 16), generator=gen) * 3
    x_in, sigma_in = torch.cat([x, x]), torch.full((2 * batch,), 3.0)
    cond_in = {"c_crossattn": torch.cat([world["cond"].expand(batch, -1, -1), world["uncond"].expand(batch, -1, -1)])}
    with torch.no_grad(), session.single_pass():
        return session.denoise(model_fn_of(world["ldm"]), x_in, sigma_in, cond_in, n_cond=batch, step=0,
                               total_steps=1)


def regional_sample(world_or_ldm, session, cond, uncond, host_cls=CFGHost, **kwargs):
    ldm = world_or_ldm["ldm"] if isinstance(world_or_ldm, dict) else world_or_ldm
    host = host_cls(ldm, cond, uncond)
    host.route = session.denoise
    with session.single_pass():
        return sample(host, **kwargs)


def unpatched(unet):
    return not [n for n, m in unet.named_modules() if "forward" in vars(m)]


def capture_outputs(module, store):
    return module.register_forward_hook(lambda m, args, out: store.append(out.detach().clone()))


# ---- 1. one whole-image concept with the main prompt = its LoRA merged ------------------------

@pytest.mark.parametrize("lora", ["alice", "bob"])   # attention-only LoRA; LoCon (convs, proj_in)
def test_a_whole_image_concept_with_the_main_prompt_equals_its_lora_merged(world, lora):
    weight = 0.8
    plan = build_plan([dict(name=lora, cond=world["cond"], loras=[(world[lora], weight)], mask=torch.ones(IMAGE))],
                      IMAGE, start_at=0.0)
    session = make_session("regional", world["unet"], plan)
    out = regional_sample(world, session, world["cond"], world["uncond"], sampler="euler", steps=4, batch=2, seed=1)
    merged = merged_copy(world["unet"], [(world[f"{lora}_parts"], weight)])
    reference = sample(CFGHost(TinyLDM(merged), world["cond"], world["uncond"]), "euler", steps=4, batch=2, seed=1)
    plain = sample(CFGHost(world["ldm"], world["cond"], world["uncond"]), "euler", steps=4, batch=2, seed=1)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5 * float(reference.abs().max()))
    assert (reference - plain).abs().max() > 1e-2   # the LoRA matters at all
    assert session.stats.unet_rows == 4 * 2 * 2 and unpatched(world["unet"])


def test_sdxl_a_whole_image_concept_with_the_main_prompt_equals_its_lora_merged(tmp_path):
    from tinyxl import TinyXL, XLCFGHost, make_xl_unet, write_xl_lora, xl_cond
    unet = make_xl_unet()
    parts = write_xl_lora(tmp_path / "xl.safetensors", unet, seed=10, convs=True)
    cond, uncond = xl_cond(1), xl_cond(2)
    plan = build_plan([dict(name="x", cond=cond, loras=[(load_network(str(tmp_path / "xl.safetensors")), 0.8)],
                            mask=torch.ones(IMAGE))], IMAGE, start_at=0.0)
    session = make_session("regional", unet, plan, context_key="crossattn")
    out = regional_sample(TinyXL(unet), session, cond, uncond, host_cls=XLCFGHost, sampler="euler", steps=3, seed=2)
    merged = TinyXL(merged_copy(unet, [(parts, 0.8)]))
    reference = sample(XLCFGHost(merged, cond, uncond), "euler", steps=3, seed=2)
    plain = sample(XLCFGHost(TinyXL(unet), cond, uncond), "euler", steps=3, seed=2)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5 * float(reference.abs().max()))
    assert (reference - plain).abs().max() > 1e-2
    assert unpatched(unet)


def write_downsampler_locon(path, unet, seed=12, rank=4, alpha=2.0, strength=0.3):
    """A kohya LoCon's part on the UNet's stride-2 downsampling convs (kohya trains them with
    conv_dim: `down_blocks_N_downsamplers_0_conv`), in the real file format."""
    from safetensors.torch import save_file
    gen = torch.Generator().manual_seed(seed)
    state, parts = {}, {}
    for name, module in unet.named_modules():
        if name.endswith(".op") and isinstance(module, torch.nn.Conv2d):
            down = torch.randn((rank, module.weight.shape[1], 3, 3), generator=gen) * strength
            up = torch.randn((module.weight.shape[0], rank, 1, 1), generator=gen) * strength
            key = "lora_unet_" + name.replace(".", "_")
            state.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(alpha)})
            parts[name] = (down, up, alpha)
    save_file(state, str(path))
    return parts


def test_a_locon_on_the_downsampling_convs_equals_it_merged(world, tmp_path):
    parts = write_downsampler_locon(tmp_path / "down.safetensors", world["unet"])
    assert len(parts) == 3
    plan = build_plan([dict(name="d", cond=world["cond"], loras=[(load_network(str(tmp_path / "down.safetensors")), 1.0)],
                            mask=torch.ones(IMAGE))], IMAGE, start_at=0.0)
    session = make_session("regional", world["unet"], plan)
    try:
        out = regional_sample(world, session, world["cond"], world["uncond"], sampler="euler", steps=2, seed=1)
    finally:
        assert unpatched(world["unet"])
    merged = TinyLDM(merged_copy(world["unet"], [(parts, 1.0)]))
    reference = sample(CFGHost(merged, world["cond"], world["uncond"]), "euler", steps=2, seed=1)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5 * float(reference.abs().max()))


# ---- 2. locality, and each region's own LoRA and prompt -------------------------------------

@pytest.mark.parametrize("lora, layer, cells", [
    ("alice", "input_blocks.1.1.transformer_blocks.0.attn1.to_q", 16 * 6),   # first LoRA'd layer: tokens
    ("bob", "input_blocks.1.0.in_layers.2", 16 * 6),                          # first LoRA'd layer: a 3x3 conv
    ("down", "input_blocks.2.0.op", 8 * 3),   # a stride-2 conv: the region at its output's 8 x 8
])
def test_a_concepts_lora_changes_nothing_outside_its_region_in_the_first_layer_it_touches(world, tmp_path, lora,
                                                                                          layer, cells):
    if lora == "down":
        write_downsampler_locon(tmp_path / "down.safetensors", world["unet"])
        network, cond = load_network(str(tmp_path / "down.safetensors")), world["cond"]
    else:
        network, cond = world[lora], world[f"{lora}_cond"]
    module = dict(world["unet"].named_modules())[layer]
    outputs = {}
    for with_lora in (True, False):
        plan = build_plan([dict(name=lora, cond=cond, mask=columns(0, 48), loras=[(network, 1.0)] if with_lora else [])],
                          IMAGE, start_at=0.0)
        store = []
        handle = capture_outputs(module, store)
        try:
            one_call(world, make_session("regional", world["unet"], plan))
        finally:
            handle.remove()
        assert len(store) == 1
        outputs[with_lora] = store[0]
    with_lora, without = outputs[True], outputs[False]
    grid = tuple(with_lora.shape[-2:]) if with_lora.dim() == 4 else (math.isqrt(with_lora.shape[1]),) * 2
    region = plan.regions.at_grid(grid)[1] > 0                       # at this layer's (output) resolution
    assert region.sum() == cells
    if with_lora.dim() == 3:                                         # (rows, tokens, channels)
        inside, outside = with_lora[:, region.flatten()], with_lora[:, ~region.flatten()]
        inside_ref, outside_ref = without[:, region.flatten()], without[:, ~region.flatten()]
    else:                                                            # (rows, channels, h, w)
        inside, outside = with_lora[..., region], with_lora[..., ~region]
        inside_ref, outside_ref = without[..., region], without[..., ~region]
    assert torch.equal(outside, outside_ref)
    assert (inside - inside_ref).abs().min() > 0 and (inside - inside_ref).abs().max() > 1e-2


def sdpa_heads(q, k, v, heads):
    """ldm's attention on projected q, k, v: (rows, n, heads * d)."""
    b, n, inner = q.shape
    split = [t.reshape(b, -1, heads, inner // heads).transpose(1, 2) for t in (q, k, v)]
    return torch.nn.functional.scaled_dot_product_attention(*split).transpose(1, 2).reshape(b, n, inner)


def overlapping(world):
    # alice (in front, z) over bob where they overlap, feathered edges: fractional weights everywhere near
    # them; bob with a negative prompt of his own, longer than every prompt
    return build_plan([
        dict(name="alice", cond=world["alice_cond"], loras=[(world["alice"], 0.8)], mask=columns(0, 80), z=1.0),
        dict(name="bob", cond=world["bob_cond"], uncond=random_context(8, tokens=16), loras=[(world["bob"], 1.0)],
             mask=columns(40, 128), z=0.0),
    ], IMAGE, start_at=0.0, feather=12.0)


# three cross-attention layers at each of 16 x 16, 8 x 8, 4 x 4: both concepts' whole cells
@pytest.mark.parametrize("plan_of, whole_cells", [(two_concepts, 3 * (2 * 96 + 2 * 24 + 2 * 4)), (overlapping, None)],
                         ids=["disjoint", "overlapping, feathered"])
def test_each_concept_gets_its_own_lora_and_prompt_in_every_layer_it_touches(world, plan_of, whole_cells):
    unet = world["unet"]
    plan = plan_of(world)
    names = [n for n, _ in unet.named_modules() if n.endswith("attn2")]
    calls = {}

    def hook(name):
        def store(module, args, kwargs, out):
            calls[name] = (args[0].detach().clone(), kwargs["context"].detach().clone(), out.detach().clone())
        return store
    # and the layers LoRAs act on by region: self-attention projections and the ResBlocks' convs
    spatial = [n for n, _ in unet.named_modules() if n.endswith(("attn1.to_q", "in_layers.2"))]

    def spatial_hook(name):
        def store(module, args, out):
            calls[name] = (args[0].detach().clone(), out.detach().clone())
        return store
    modules = dict(unet.named_modules())
    handles = [modules[n].register_forward_hook(hook(n), with_kwargs=True) for n in names]
    handles += [modules[n].register_forward_hook(spatial_hook(n)) for n in spatial]
    try:
        one_call(world, make_session("regional", unet, plan))
    finally:
        for h in handles:
            h.remove()
    # references: each concept's merged-LoRA copy of the module on its own (padded) prompt
    # cond rows: the concept's prompt; uncond rows: its negative, else the host's; every concept
    # context padded to the longest of them (alice's 12 tokens, or bob's 16-token negative)
    negatives = {"alice": world["uncond"], "bob": world["uncond"] if plan.concepts[1].uncond is None
                 else plan.concepts[1].uncond["c_crossattn"]}
    length = max(t.shape[1] for t in [world["alice_cond"], *negatives.values()])
    references = [(modules, None, 1.0)]
    for concept, weight in (("alice", 0.8), ("bob", 1.0)):
        copy = dict(merged_copy(unet, [(world[f"{concept}_parts"], weight)]).named_modules())
        references.append((copy, torch.cat([pad_context(world[f"{concept}_cond"], length),
                                            pad_context(negatives[concept], length)]), weight))
    checked_exact = 0
    with torch.no_grad():
        for name in names:
            x, context, out = calls[name]
            side = int(math.isqrt(x.shape[1]))
            weights = plan.regions.at_grid((side, side)).flatten(1)         # (3, tokens)
            per_source = [copy[name](x, context=context if own_context is None else own_context)
                          for copy, own_context, _ in references]
            # q and to_out are image-token layers: every concept's LoRA under its weights (the plain
            # layer and each merged copy mixed by the weights, which sum to 1); keys and values: the
            # branch's own prompt through its LoRA; the attention outputs mixed by the weights
            w = [weights[k][None, :, None] for k in range(len(references))]
            q = sum(w[k] * copy[name].to_q(x) for k, (copy, _, _) in enumerate(references))
            heads = modules[name].heads
            mixed = 0
            for k, (copy, own_context, _) in enumerate(references):
                ctx = context if own_context is None else own_context
                mixed = mixed + w[k] * sdpa_heads(q, copy[name].to_k(ctx), copy[name].to_v(ctx), heads)
            expected = sum(w[k] * copy[name].to_out(mixed) for k, (copy, _, _) in enumerate(references))
            torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4, msg=name)
            for k in (1, 2):
                exact = weights[k] == 1
                checked_exact += int(exact.sum())
                # not vacuous: the concept's LoRA and prompt change these tokens (none whole at 2 x 2)
                assert not exact.any() or (per_source[k][:, exact] - per_source[0][:, exact]).abs().max() > 1e-3, name
    assert checked_exact == whole_cells or whole_cells is None
    if whole_cells is None:   # the front-to-back weights: alice in front where both are, the sum 1
        weights = plan.regions.latent
        assert weights[1, 0, 7] == 1 and weights[2, 0, 7] == 0 and 0 < weights[2, 0, 9] < 1
        assert ((weights > 0) & (weights < 1)).any(0).sum() >= 16 * 4
    with torch.no_grad():
        for name in spatial:   # y + sum_i w_i delta_i(x) = sum_k w_k * layer_k(x), layer_0 the plain one
            x, out = calls[name]
            grid = tuple(x.shape[-2:]) if x.dim() == 4 else (math.isqrt(x.shape[1]),) * 2
            weights = plan.regions.at_grid(grid)
            weights = weights[:, None, None] if x.dim() == 4 else weights.flatten(1)[:, None, :, None]
            expected = sum(weights[k] * copy[name](x) for k, (copy, _, _) in enumerate(references))
            torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4, msg=name)
            assert (out - modules[name](x)).abs().max() > 1e-3, name   # hooks are off now: the plain layer


# ---- 3. concept isolation -------------------------------------------------------------------

def dense_isolated(q, k, v, heads, labels):
    """Reference: softmax(q k^T / sqrt(d) + bias) v per head, bias -inf from a concept's queries to
    another concept's keys (background queries and keys take part everywhere)."""
    b, n, inner = q.shape
    d = inner // heads
    split = lambda t: t.view(b, n, heads, d).transpose(1, 2)   # noqa: E731
    logits = split(q) @ split(k).transpose(-1, -2) * d ** -0.5
    lq, lk = labels[:, :, None], labels[:, None, :]
    blocked = (lq > 0) & (lk > 0) & (lq != lk)
    logits = logits.masked_fill(blocked[:, None], float("-inf"))
    return (logits.softmax(-1) @ split(v)).transpose(1, 2).reshape(b, n, inner)


@pytest.fixture(params=["boolean mask", "segments"])
def formulation(request, monkeypatch):
    if request.param == "segments":
        monkeypatch.setattr(regional_attention, "MASK_MAX_TOKENS", 0)
    return request.param


def test_isolated_attention_gives_no_mass_from_one_concepts_queries_to_anothers_keys(formulation):
    gen = torch.Generator().manual_seed(3)
    rows, n, heads, d = 4, 36, 2, 8
    q, k, v = (torch.randn((rows, n, heads * d), generator=gen) for _ in range(3))
    labels = torch.randint(0, 4, (rows, n), generator=gen)
    labels[2] = labels[0]                              # rows sharing a label map (cond and uncond of one image)
    labels[3] = torch.randint(1, 3, (n,), generator=gen)   # a row with no background at all
    out = regional_attention.isolated_attention(q, k, v, heads, labels)
    torch.testing.assert_close(out, dense_isolated(q, k, v, heads, labels), atol=1e-5, rtol=1e-5)
    # the mass itself: changing concept 2's keys and values moves nothing at other concepts' queries
    k2, v2 = k.clone(), v.clone()
    moved = labels == 2
    k2[moved] += 5 * torch.randn((int(moved.sum()), heads * d), generator=gen)
    v2[moved] += 5 * torch.randn((int(moved.sum()), heads * d), generator=gen)
    out2 = regional_attention.isolated_attention(q, k2, v2, heads, labels)
    others = (labels == 1) | (labels == 3)
    torch.testing.assert_close(out2[others], out[others], atol=1e-6, rtol=0)
    # while the background's and concept 2's own queries do see them
    for label in (0, 2):
        assert (out2[labels == label] - out[labels == label]).abs().max() > 1e-2


def test_isolation_in_a_session_equals_the_isolated_reference_in_self_attention(world, formulation):
    unet = world["unet"]
    attn = dict(unet.named_modules())["input_blocks.1.1.transformer_blocks.0.attn1"]   # 16 x 16 tokens
    results = {}
    for isolation in (True, False):
        seen = {}
        handles = [getattr(attn, p).register_forward_hook(lambda m, a, o, p=p: seen.__setitem__(p, o.detach().clone()))
                   for p in ("to_q", "to_k", "to_v")]
        handles.append(attn.to_out.register_forward_pre_hook(lambda m, a: seen.__setitem__("out", a[0].detach().clone())))
        try:
            final = one_call(world, make_session("regional", unet, two_concepts(world, isolation=isolation)))
        finally:
            for h in handles:
                h.remove()
        results[isolation] = final, seen
    plan = two_concepts(world)
    labels = plan.regions.at_grid((16, 16)).flatten(1).argmax(0)[None].expand(2, -1)   # cond and uncond rows
    assert set(labels.unique().tolist()) == {0, 1, 2}
    for isolation, (_, seen) in results.items():
        q, k, v = seen["to_q"], seen["to_k"], seen["to_v"]
        isolated = dense_isolated(q, k, v, attn.heads, labels)
        free = dense_isolated(q, k, v, attn.heads, torch.zeros_like(labels))
        torch.testing.assert_close(seen["out"], isolated if isolation else free, atol=1e-5, rtol=1e-4)
        assert (isolated - free).abs().max() > 1e-3
    assert (results[True][0] - results[False][0]).abs().max() > 1e-3


# ---- 4. never acting is plain; the UNet is left unpatched whatever happens ------------------

class Boom(Exception):
    pass


class Interrupted(BaseException):
    """Like a user's interrupt: not an Exception at all."""


def test_start_at_end_is_bit_identical_to_plain_and_failures_leave_the_unet_unpatched(world):
    unet = world["unet"]
    host = CFGHost(world["ldm"], world["cond"], world["uncond"])
    plain = sample(host, "euler_a", steps=6, batch=2, seed=3)
    session = make_session("regional", unet, two_concepts(world, start_at=1.0))
    assert torch.equal(regional_sample(world, session, world["cond"], world["uncond"], sampler="euler_a",
                                       steps=6, batch=2, seed=3), plain)
    assert unpatched(unet) and session.run.call is None and session.phase is None

    blocks = {}

    def fail_in_the_middle_block(error):
        def hook(module, args):
            blocks["calls"] = blocks.get("calls", 0) + 1
            if blocks["calls"] == 3:   # the third step's UNet call, hooks installed and the call in flight
                assert session.run.call is not None
                raise error("inside the UNet")
        return hook
    for error in (Boom, Interrupted):
        blocks.clear()
        session = make_session("regional", unet, two_concepts(world, start_at=0.0))
        handle = unet.middle_block.register_forward_pre_hook(fail_in_the_middle_block(error))
        try:
            with pytest.raises(error):
                regional_sample(world, session, world["cond"], world["uncond"], sampler="euler_a", steps=6, seed=3)
        finally:
            handle.remove()
        assert blocks["calls"] == 3
        assert unpatched(unet) and session.run.call is None and session.phase is None
    # interrupted between calls, by the host's denoiser
    session = make_session("regional", unet, two_concepts(world, start_at=0.0))
    host = CFGHost(world["ldm"], world["cond"], world["uncond"])

    def route(*args, **kwargs):
        if kwargs["step"] == 2:
            raise Interrupted("the user pressed Interrupt")
        return session.denoise(*args, **kwargs)
    host.route = route
    with pytest.raises(Interrupted), session.single_pass():
        sample(host, "euler_a", steps=6, batch=2, seed=3)
    assert unpatched(unet) and session.run.call is None and session.phase is None
    assert torch.equal(sample(CFGHost(world["ldm"], world["cond"], world["uncond"]), "euler_a", steps=6, batch=2,
                              seed=3), plain)


# ---- 5. UNet sample-evaluations -------------------------------------------------------------

@pytest.mark.parametrize("n_concepts", [1, 2, 4])
def test_regional_runs_as_many_unet_rows_as_plain_for_any_number_of_concepts(world, n_concepts):
    unet = world["unet"]
    host = CFGHost(world["ldm"], world["cond"], world["uncond"])
    rows = count_unet_rows(unet)
    try:
        plain = sample(host, "euler", steps=4, batch=2, seed=6)
        plain_rows, plain_calls = rows.count, rows.calls
        width = 128 // n_concepts
        concepts = [dict(name=f"c{i}", cond=world["alice_cond"] if i % 2 else world["bob_cond"],
                         loras=[(world["alice"] if i % 2 else world["bob"], 0.8)],
                         mask=columns(i * width, (i + 1) * width - 8)) for i in range(n_concepts)]
        session = make_session("regional", unet, build_plan(concepts, IMAGE, start_at=0.0, isolation=True))
        out = regional_sample(world, session, world["cond"], world["uncond"], sampler="euler", steps=4, batch=2, seed=6)
    finally:
        rows.remove()
    assert plain_rows == 4 * 2 * 2
    assert (rows.count - plain_rows, rows.calls - plain_calls) == (plain_rows, plain_calls)
    assert session.stats.unet_rows == plain_rows and session.stats.probe_rows == 0
    assert (out - plain).abs().max() > 1e-2   # the concepts acted


def test_concepts_act_from_start_at_and_isolation_stops_at_isolation_until(world):
    unet = world["unet"]
    session = make_session("regional", unet, two_concepts(world, start_at=0.25, isolation_until=0.75))
    seen = []
    handle = unet.register_forward_pre_hook(
        lambda m, args: seen.append(None if session.run.call is None else session.run.call.isolate))
    try:
        regional_sample(world, session, world["cond"], world["uncond"], sampler="euler", steps=4, seed=2)
    finally:
        handle.remove()
    # step 0 plain (no regional call in flight); steps 1-2 isolated; step 3 not
    assert seen == [None, True, True, False]


# ---- 6. automatic regions in the same pass ---------------------------------------------------

class GridQuery(PlantedQuery):
    """The planted queries, on a full attention grid only: a concept's cross-attention branch
    projects only its region's tokens (no square grid to plant on)."""

    def forward(self, x):
        n = x.shape[1]
        return super().forward(x) if math.isqrt(n) ** 2 == n else self.inner(x)


def test_automatic_regions_are_found_at_the_start_step_in_the_same_pass():
    left, right = cells(3, 1, 13, 6), cells(2, 10, 12, 15)
    # image 0: word A (token 2) on the left, word B (token 5) on the right; image 1 the other way round
    unet = plant(make_unet(), [2, 5], [[left, right], [right, left]])
    for name, module in unet.named_modules():
        if name.endswith("attn2"):
            planted = module.to_q
            module.to_q = GridQuery(planted.inner, planted.cells, planted.directions)
    plan = build_plan([dict(name="a", cond=random_context(3), auto_tokens=[2]),
                       dict(name="b", cond=random_context(4), auto_tokens=[5])], IMAGE, start_at=0.5)
    ldm = TinyLDM(unet)
    host = CFGHost(ldm, random_context(1), random_context(2))
    rows = count_unet_rows(unet)
    plain = sample(host, "euler", steps=6, batch=2, seed=0)
    plain_rows = rows.count
    session = make_session("regional", unet, plan)
    host.route = session.denoise
    found_at = []

    def find_regions(latents):
        found_at.append((host.step, tuple(latents.shape)))
        session.find_regions()
    initial = torch.randn((2, 4, 16, 16), generator=torch.Generator().manual_seed(0))
    try:
        out = session.sample(euler_pass(host, 6, initial, find_regions=find_regions))
    finally:
        rows.remove()
    assert found_at == [(3, (2, 4, 16, 16))]   # at the start step (0.5 of 6), from the x0 predictions
    assert rows.count == 2 * plain_rows and session.stats.unet_rows == plain_rows   # no second pass
    found = plan.found_masks
    assert found.shape == (2, 2, 16, 16)
    assert covers(found[0, 0], left) and covers(found[0, 1], right)
    assert covers(found[1, 0], right) and covers(found[1, 1], left)
    assert (out - plain).abs().max() > 1e-2 and unpatched(unet)


# ---- 7. latent re-initialisation ---------------------------------------------------------------

def test_box_of_and_strongest_window():
    weights = torch.zeros(16, 16)
    weights[2:6, 3:9] = 1.0
    weights[12, 12] = 0.4          # a weak edge: not the concept's
    assert box_of(weights) == (2, 3, 4, 6)
    assert box_of(torch.full((16, 16), 0.5)) is None
    attention = torch.rand(16, 16, generator=torch.Generator().manual_seed(0)) * 0.1
    attention[9:12, 4:8] += 1.0
    assert strongest_window(attention, 3, 4) == (9, 4)
    attention[0:2, 14:16] += 5.0   # a hot corner: the 2 x 2 window goes there
    assert strongest_window(attention, 2, 2) == (0, 14)


def affine_fit(moved, original):
    """(a, c) with moved = a * original + c (least squares) and the largest residual."""
    design = torch.stack([original.flatten().double(), torch.ones(original.numel(), dtype=torch.double)], 1)
    solution = torch.linalg.lstsq(design, moved.flatten().double()[:, None]).solution.flatten()
    a, c = float(solution[0]), float(solution[1])
    return a, c, float((moved.double() - (a * original.double() + c)).abs().max())


def check_reinitialised(final, initial, box, source):
    """final = the initial with the source window pasted into the box, then one affine map
    (renormalised to the initial's mean and std)."""
    top, left, h, w = box
    src_top, src_left = source
    inside = torch.zeros(final.shape[-2:], dtype=torch.bool)
    inside[top:top + h, left:left + w] = True
    a, c, residual = affine_fit(final[:, ~inside], initial[:, ~inside])
    assert residual < 1e-4 and abs(a - 1) > 1e-4   # renormalisation moved it
    pasted = initial[:, src_top:src_top + h, src_left:src_left + w]
    torch.testing.assert_close(final[:, top:top + h, left:left + w].double(), a * pasted.double() + c,
                               atol=1e-4, rtol=0)
    assert (final[:, inside] - initial[:, inside]).abs().max() > 0.5
    torch.testing.assert_close(final.mean(), initial.mean(), atol=1e-5, rtol=0)
    torch.testing.assert_close(final.std(), initial.std(), atol=1e-5, rtol=1e-5)


def test_reinitialise_moves_the_strongest_patch_into_the_box_and_renormalises():
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn((2, 4, 16, 16), generator=gen)
    maps = torch.rand((2, 2, 16, 16), generator=gen) * 0.1
    maps[0, 0, 10:14, 9:14] += 1.0
    maps[0, 1, 0:3, 0:3] += 1.0
    boxes = [[(2, 3, 4, 5), None], [None, None]]
    out = reinitialise(noise, maps, boxes)
    check_reinitialised(out[0], noise[0], (2, 3, 4, 5), (10, 9))
    assert torch.equal(out[1], noise[1])   # nothing moved: not renormalised either


def test_reinit_in_a_session_probes_the_first_step_and_samples_from_the_moved_noise():
    # the class word (token 3) attends to a 4 x 4 block of cells at (8, 8) in image 0, at (8, 0) in image 1
    unet = plant(make_unet(), [3], [[cells(8, 8, 12, 12)], [cells(8, 0, 12, 4)]])
    box = torch.zeros(IMAGE)
    box[16:48, 16:48] = 1   # cells (2, 2) to (6, 6)
    plan = build_plan([dict(name="a", cond=random_context(3), mask=box, class_tokens=[3])], IMAGE,
                      start_at=0.0, reinit=True)
    session = make_session("regional", unet, plan)
    host = CFGHost(TinyLDM(unet), random_context(1), random_context(2))
    host.route = session.denoise
    sigmas = host.inner.get_sigmas(4)
    initial = torch.randn((2, 4, 16, 16), generator=torch.Generator().manual_seed(2))
    starts, replays = [], []

    def sample_from(noise):
        starts.append(noise.clone())
        host.step, host.total_steps = 0, 4
        with torch.no_grad():
            return sampling.sample_euler(host, noise * sigmas[0], sigmas, disable=True)
    rows = count_unet_rows(unet)
    try:
        session.sample(HostPass(sample=sample_from, initial=initial, replay_noise=lambda: replays.append(1)))
    finally:
        rows.remove()
    assert session.stats.probe_rows == 2                   # the probe: the first call's cond rows only
    assert rows.count == 2 + 4 * 2 * 2 and len(replays) == 1
    assert len(starts) == 2 and torch.equal(starts[0], initial)
    for b, source in enumerate([(8, 8), (8, 0)]):
        check_reinitialised(starts[1][b], initial[b], (2, 2, 4, 4), source)
    assert unpatched(unet)


# ---- 8. split and batched host calls ---------------------------------------------------------

def test_split_cond_and_uncond_calls_give_the_batched_calls_rows(world):
    long_negative = random_context(8, tokens=16)   # bob's negative: longer than every prompt
    plan = build_plan([
        dict(name="alice", cond=world["alice_cond"], loras=[(world["alice"], 0.8)], mask=columns(0, 48)),
        dict(name="bob", cond=world["bob_cond"], uncond=long_negative, loras=[(world["bob"], 1.0)],
             mask=columns(80, 128)),
    ], IMAGE, start_at=0.0)
    assert {world["alice_cond"].shape[1], world["bob_cond"].shape[1], world["cond"].shape[1]} == {12, 8}
    session = make_session("regional", world["unet"], plan)
    fn = model_fn_of(world["ldm"])
    gen = torch.Generator().manual_seed(4)
    x, sigma = torch.randn((2, 4, 16, 16), generator=gen) * 3, torch.full((2,), 3.0)
    cond, uncond = world["cond"].expand(2, -1, -1), world["uncond"].expand(2, -1, -1)
    with torch.no_grad(), session.single_pass():
        batched = session.denoise(fn, torch.cat([x, x]), torch.cat([sigma, sigma]),
                                  {"c_crossattn": torch.cat([cond, uncond])}, n_cond=2, step=0, total_steps=4)
        c = session.denoise(fn, x, sigma, {"c_crossattn": cond}, n_cond=2, step=0, total_steps=4,
                            images=CallImages((0, 1), ()))
        u = session.denoise(fn, x, sigma, {"c_crossattn": uncond}, n_cond=0, step=0, total_steps=4,
                            images=CallImages((), (0, 1)))
    torch.testing.assert_close(torch.cat([c, u]), batched, atol=1e-4, rtol=1e-4)
    plain = model_fn_of(world["ldm"])(torch.cat([x, x]), torch.cat([sigma, sigma]),
                                      {"c_crossattn": torch.cat([cond, uncond])})
    assert (batched - plain).abs().max() > 1e-2


# ---- Forge's routing: the same regional result as A1111's path ------------------------------------

def forge_regional_call(world, plan, x, sigma):
    """One call through forge_routing as Forge makes it (test_forge_routing's helper), in the
    engine's [cond, uncond] order; the UNet left unpatched."""
    from test_forge_routing import forge_regional
    out = forge_regional(world, plan, x, sigma)
    assert unpatched(world["unet"])
    return out


def quadrants(world, **options):
    # every region edge on a cell edge of every grid (16, 8, 4 and 2): no cell is shared
    top_right = torch.zeros(IMAGE)
    top_right[:64, 64:] = 1
    return build_plan([dict(name="alice", cond=world["alice_cond"], loras=[(world["alice"], 0.8)], mask=columns(0, 64)),
                       dict(name="bob", cond=world["bob_cond"], loras=[(world["bob"], 1.0)], mask=top_right)],
                      IMAGE, start_at=0.0, **options)


@pytest.mark.parametrize("plan_of", [
    quadrants,
    two_concepts,
], ids=["edges on every grid", "fractional cells"])
def test_forge_routing_gives_the_a1111_paths_regional_result(world, plan_of):
    gen = torch.Generator().manual_seed(5)
    x, sigma = torch.randn((2, 4, 16, 16), generator=gen) * 3, torch.full((2,), 3.0)
    cond = {"c_crossattn": torch.cat([world["cond"].expand(2, -1, -1), world["uncond"].expand(2, -1, -1)])}
    session = make_session("regional", world["unet"], plan_of(world))
    with torch.no_grad(), session.single_pass():
        a1111 = session.denoise(model_fn_of(world["ldm"]), torch.cat([x, x]), torch.cat([sigma, sigma]), cond,
                                n_cond=2, step=0, total_steps=1)
    forge = forge_regional_call(world, plan_of(world), x, sigma)
    torch.testing.assert_close(forge, a1111, atol=1e-4, rtol=1e-4)
    plain = model_fn_of(world["ldm"])(torch.cat([x, x]), torch.cat([sigma, sigma]), cond)
    assert (a1111 - plain).abs().max() > 1e-2
