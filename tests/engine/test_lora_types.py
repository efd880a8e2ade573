"""Every LoRA type A1111 loads, applied to one concept's rows on the real tiny ldm UNet.

Each test writes a real file with the key names the trainers write (kohya, LyCORIS), loads it
with `load_network`, runs a concept through the engine, and compares against a deep copy of
the UNet whose weights were changed the way A1111's extensions-builtin/Lora/network_*.py merge
that type (written out here as plain matrix formulas).
"""

import copy

import pytest
import torch
from k_diffusion.external import CompVisDenoiser
from safetensors.torch import save_file
from torch import nn

from lib_mc.engine import MultiConceptSession, make_session
from lib_mc.lora import LoraUse, bind_loras, load_network
from lib_mc.lora.ops import DoraOp
from lib_mc.plan import build_plan
from tinyhost import TinyLDM, make_unet, random_context

IMAGE = (128, 128)   # latent 16 x 16
ATTN = "input_blocks.1.1.transformer_blocks.0.attn1"
LINEARS = [f"{ATTN}.to_q", f"{ATTN}.to_v", "output_blocks.3.1.transformer_blocks.0.ff.net.2"]
CONVS = ["input_blocks.1.0.in_layers.2", "output_blocks.3.0.out_layers.3"]


def kohya_key(name: str, prefix: str = "lora_unet_") -> str:
    return prefix + name.replace(".", "_")


def write(path, layers: dict[str, dict[str, torch.Tensor]]):
    """A file in kohya/LyCORIS layout: `<layer key>.<part>`."""
    save_file({f"{key}.{part}": t.contiguous() for key, parts in layers.items() for part, t in parts.items()},
              str(path))
    return load_network(str(path))


def rand(gen, *shape, scale=0.2):
    return torch.randn(shape, generator=gen) * scale


def merged(unet, changes: dict[str, torch.Tensor], strength: float, bias_changes=None):
    """A1111's merge: W += strength * updown (and bias += strength * ex_bias)."""
    reference = copy.deepcopy(unet)
    modules = dict(reference.named_modules())
    with torch.no_grad():
        for name, updown in changes.items():
            modules[name].weight += strength * updown.reshape(modules[name].weight.shape)
        for name, change in (bias_changes or {}).items():
            modules[name].bias += strength * change
    return reference


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def run_concept(unet, network, strength, warn=None, seed=5, calls=1):
    """One full-image concept through stage 1 and stage 2 of the engine; returns its rows'
    prediction and what the same rows give on `reference(...)`."""
    cond, uncond, concept_cond = random_context(1), random_context(2), random_context(3)
    plan = build_plan([dict(cond=concept_cond, mask=torch.ones(IMAGE), loras=[(network, strength)])],
                      IMAGE, start_at=0.0, layout_replay=False)
    session = make_session(MODE["mode"], unet, plan, warn=warn or (lambda m: None))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((1, 4, 16, 16), generator=gen) * 3
    x_in, sigma_in = torch.cat([x, x]), torch.full((2,), 3.0)
    cond_in = {"c_crossattn": torch.cat([cond, uncond])}
    denoiser = CompVisDenoiser(TinyLDM(unet))
    model_fn = lambda x, sigma, cond: denoiser(x, sigma, cond=cond)  # noqa: E731  (as A1111's CFGDenoiser calls it)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    for _ in range(calls):
        if MODE["mode"] == "regional":   # one pass: the concept's region is the whole image
            with torch.no_grad(), session.single_pass():
                out = session.denoise(model_fn, x_in, sigma_in, cond_in, n_cond=1, step=0, total_steps=1)
            continue
        with torch.no_grad(), session.stage1():
            session.denoise(model_fn, x_in, sigma_in, cond_in, n_cond=1, step=0, total_steps=1)
        with torch.no_grad(), session.stage2():
            out = session.denoise(model_fn, x_in, sigma_in, cond_in, n_cond=1, step=0, total_steps=1)
    after = unet.state_dict()
    assert all(torch.equal(bits(before[k]), bits(after[k])) for k in before), "host weights were changed"

    def reference(ref_unet):
        plain = CompVisDenoiser(TinyLDM(ref_unet))
        with torch.no_grad():
            return torch.cat([plain(x_in[:1], sigma_in[:1], cond={"c_crossattn": concept_cond}),
                              plain(x_in[1:], sigma_in[1:], cond={"c_crossattn": uncond})])
    return out, reference


def assert_applied(unet, out, reference, ref_unet):
    expected = reference(ref_unet)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)
    assert (expected - reference(unet)).abs().max() > 1e-2   # the LoRA changes the output at all


MODE = {"mode": "blend"}


@pytest.fixture(autouse=True, params=["blend", "regional"])
def mode(request):
    """Every LoRA type through both methods: blend's per-row deltas and regional's region-weighted
    ones (a whole-image region, so the merged weights are the reference for both)."""
    MODE["mode"] = request.param
    yield request.param
    MODE["mode"] = "blend"


@pytest.fixture
def unet():
    return make_unet()


def modules_of(unet):
    return dict(unet.named_modules())


# ---- DoRA ----------------------------------------------------------------------------------

def dora_merge(weight, updown, magnitude, per_output):
    """W' - W for DoRA. Per input channel: A1111 network.py apply_weight_decompose; per output
    channel: LyCORIS wd_on_out (the norm of W + dW along each output row)."""
    w = weight + updown
    if per_output:
        norm = w.flatten(1).norm(dim=1).reshape(-1, *[1] * (w.dim() - 1))
    else:
        norm = w.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, -1, *[1] * (w.dim() - 2))
    return w * (magnitude / norm) - weight


@pytest.mark.parametrize("per_output", [False, True])
def test_dora_lora_and_locon_follow_weight_decomposition(tmp_path, unet, per_output):
    gen = torch.Generator().manual_seed(1)
    modules = modules_of(unet)
    layers, changes = {}, {}
    for name in LINEARS + CONVS:
        weight = modules[name].weight.detach()
        out_ch, in_ch = weight.shape[:2]
        kernel = tuple(weight.shape[2:])
        down, up = rand(gen, 4, in_ch, *kernel), rand(gen, out_ch, 4, *[1] * len(kernel))
        mshape = (out_ch,) + (1,) * (weight.dim() - 1) if per_output else (1, in_ch) + (1,) * (weight.dim() - 2)
        # magnitudes near the weight's own norms, as training starts from them
        magnitude = torch.rand(mshape, generator=gen) + 0.5
        layers[kohya_key(name)] = {"lora_down.weight": down, "lora_up.weight": up, "alpha": torch.tensor(2.0),
                                   "dora_scale": magnitude}
        updown = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape) * (2.0 / 4)
        changes[name] = dora_merge(weight, updown, magnitude, per_output)
    network = write(tmp_path / "dora.safetensors", layers)
    out, reference = run_concept(unet, network, 0.8)
    assert_applied(unet, out, reference, merged(unet, changes, 0.8))


def test_dora_scales_are_computed_once_per_layer_for_the_session(tmp_path, unet, monkeypatch):
    gen = torch.Generator().manual_seed(2)
    modules = modules_of(unet)
    layers = {}
    for name in LINEARS:
        out_ch, in_ch = modules[name].weight.shape
        layers[kohya_key(name)] = {"lora_down.weight": rand(gen, 4, in_ch), "lora_up.weight": rand(gen, out_ch, 4),
                                   "dora_scale": torch.rand(1, in_ch, generator=gen) + 0.5}
    network = write(tmp_path / "dora.safetensors", layers)
    computed = []
    original = DoraOp._scale
    monkeypatch.setattr(DoraOp, "_scale", lambda self, device: computed.append(self) or original(self, device))
    run_concept(unet, network, 1.0, calls=3)
    assert len(computed) == len(LINEARS)


# ---- OFT / BOFT ----------------------------------------------------------------------------

def cayley(blocks, constraint):
    """kohya/LyCORIS OFT: R = (I + Q)(I - Q)^-1 with Q the skew part, its norm clamped."""
    q = blocks - blocks.transpose(-1, -2)
    norm = q.flatten().norm()
    if constraint:
        q = q * ((torch.clamp(norm, max=constraint) + 1e-8) / (norm + 1e-8))
    eye = torch.eye(blocks.shape[-1])
    return (eye + q) @ torch.linalg.inv(eye - q)


def butterfly_matrix(rotations, channels):
    """BOFT's output-channel map as one matrix: per step, a permutation that pairs channels
    2^i * b/2 apart, the block-diagonal rotation, and the permutation back."""
    block = rotations.shape[-1]
    total = torch.eye(channels)
    for i, step in enumerate(rotations):
        k = 2 ** i * (block // 2)
        perm = torch.arange(channels).reshape(-1, 2, k).transpose(1, 2).reshape(-1)
        p = torch.eye(channels)[perm]
        total = p.T @ torch.block_diag(*step) @ p @ total
    return total


def test_kohya_oft_rotates_output_channels(tmp_path, unet):
    gen = torch.Generator().manual_seed(3)
    modules = modules_of(unet)
    layers, changes = {}, {}
    diffusers = {f"{ATTN}.to_q": "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
                 "input_blocks.1.0.in_layers.2": "down_blocks_0_resnets_0_conv1"}
    for name, key in diffusers.items():
        weight = modules[name].weight.detach()
        blocks = rand(gen, 4, weight.shape[0] // 4, weight.shape[0] // 4, scale=0.3)
        layers["oft_unet_" + key] = {"oft_blocks": blocks, "alpha": torch.tensor(1e-3)}   # kohya's trainer names
        rotation = torch.block_diag(*cayley(blocks, 1e-3 * weight.shape[0]))
        changes[name] = (rotation.T @ weight.flatten(1)).reshape(weight.shape) - weight
    network = write(tmp_path / "oft.safetensors", layers)
    out, reference = run_concept(unet, network, 0.7)
    assert_applied(unet, out, reference, merged(unet, changes, 0.7))


def test_lycoris_boft_and_old_oft_diag(tmp_path, unet):
    gen = torch.Generator().manual_seed(4)
    modules = modules_of(unet)
    layers, changes = {}, {}
    boft_name, diag_name = f"{ATTN}.to_v", CONVS[1]
    weight = modules[boft_name].weight.detach()
    blocks = rand(gen, 2, weight.shape[0] // 4, 4, 4, scale=0.3)   # (m, blocks, b, b)
    rescale = torch.rand(weight.shape[0], 1, generator=gen) + 0.5
    layers[kohya_key(boft_name)] = {"oft_blocks": blocks, "alpha": torch.tensor(0.0), "rescale": rescale}
    changes[boft_name] = rescale * (butterfly_matrix(cayley(blocks, 0), weight.shape[0]) @ weight) - weight
    weight = modules[diag_name].weight.detach()
    rotation = cayley(rand(gen, weight.shape[0] // 8, 8, 8), 0)   # old LyCORIS stores R itself
    layers[kohya_key(diag_name)] = {"oft_diag": rotation}
    changes[diag_name] = (torch.block_diag(*rotation).T @ weight.flatten(1)).reshape(weight.shape) - weight
    network = write(tmp_path / "boft.safetensors", layers)
    out, reference = run_concept(unet, network, 1.0)
    assert_applied(unet, out, reference, merged(unet, changes, 1.0))


# ---- IA3, GLoRA, norms -----------------------------------------------------------------------

def test_ia3_scales_input_or_output_channels(tmp_path, unet):
    gen = torch.Generator().manual_seed(5)
    modules = modules_of(unet)
    layers, changes = {}, {}
    for name, on_input in ((f"{ATTN}.to_q", 0), (LINEARS[2], 1), (CONVS[0], 0)):
        weight = modules[name].weight.detach()
        w = rand(gen, weight.shape[1] if on_input else weight.shape[0], scale=0.5)
        layers[kohya_key(name)] = {"weight": w, "on_input": torch.tensor(on_input)}
        shape = [1] * weight.dim()
        shape[1 if on_input else 0] = -1
        changes[name] = weight * w.reshape(shape)
    network = write(tmp_path / "ia3.safetensors", layers)
    out, reference = run_concept(unet, network, 0.9)
    assert_applied(unet, out, reference, merged(unet, changes, 0.9))


def test_glora_adds_weight_through_its_factors(tmp_path, unet):
    gen = torch.Generator().manual_seed(6)
    modules = modules_of(unet)
    layers, changes = {}, {}
    for name in LINEARS:
        weight = modules[name].weight.detach()
        out_f, in_f = weight.shape
        t = {"a1.weight": rand(gen, 4, in_f), "a2.weight": rand(gen, in_f, 4),
             "b1.weight": rand(gen, 4, in_f), "b2.weight": rand(gen, out_f, 4), "alpha": torch.tensor(4.0)}
        layers[kohya_key(name)] = t
        changes[name] = t["b2.weight"] @ t["b1.weight"] + weight @ t["a2.weight"] @ t["a1.weight"]
    network = write(tmp_path / "glora.safetensors", layers)
    out, reference = run_concept(unet, network, 0.6)
    assert_applied(unet, out, reference, merged(unet, changes, 0.6))


def test_norm_layers_change_weight_and_bias(tmp_path, unet):
    gen = torch.Generator().manual_seed(7)
    modules = modules_of(unet)
    names = {"down_blocks_0_resnets_0_norm1": "input_blocks.1.0.in_layers.0",       # GroupNorm
             "down_blocks_0_attentions_0_norm": "input_blocks.1.1.norm",              # GroupNorm
             "down_blocks_0_attentions_0_transformer_blocks_0_norm1": f"{ATTN[:-6]}.norm1"}   # LayerNorm
    layers, changes, bias_changes = {}, {}, {}
    for key, name in names.items():
        size = modules[name].weight.numel()
        layers["lora_unet_" + key] = {"w_norm": rand(gen, size), "b_norm": rand(gen, size)}
        changes[name], bias_changes[name] = layers["lora_unet_" + key]["w_norm"], layers["lora_unet_" + key]["b_norm"]
    assert {type(modules[n]).__name__ for n in names.values()} == {"GroupNorm32", "GroupNorm", "LayerNorm"}
    network = write(tmp_path / "norm.safetensors", layers)
    out, reference = run_concept(unet, network, 0.5)
    assert_applied(unet, out, reference, merged(unet, changes, 0.5, bias_changes))


# ---- Tucker LoHa / LoKr ----------------------------------------------------------------------

def tucker(t, wa, wb):
    """LyCORIS CP rebuild: t (r, r, kh, kw), wa (r, out), wb (r, in) -> (out, in, kh, kw)."""
    return torch.einsum("abhw,ao,bi->oihw", t, wa, wb)


def test_loha_and_lokr_with_tucker_factors(tmp_path, unet):
    gen = torch.Generator().manual_seed(8)
    modules = modules_of(unet)
    loha_name, lokr_name = CONVS
    weight = modules[loha_name].weight.detach()
    out_ch, in_ch = weight.shape[:2]
    t = {"hada_t1": rand(gen, 4, 4, 3, 3), "hada_w1_a": rand(gen, 4, out_ch), "hada_w1_b": rand(gen, 4, in_ch),
         "hada_t2": rand(gen, 4, 4, 3, 3), "hada_w2_a": rand(gen, 4, out_ch), "hada_w2_b": rand(gen, 4, in_ch),
         "alpha": torch.tensor(2.0)}
    layers = {kohya_key(loha_name): t}
    changes = {loha_name: tucker(t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"])
               * tucker(t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"]) * (2.0 / 4)}
    weight = modules[lokr_name].weight.detach()
    out_ch, in_ch = weight.shape[:2]
    k = {"lokr_w1": rand(gen, 4, 4), "lokr_t2": rand(gen, 2, 2, 3, 3),
         "lokr_w2_a": rand(gen, 2, out_ch // 4), "lokr_w2_b": rand(gen, 2, in_ch // 4), "alpha": torch.tensor(1.0)}
    layers[kohya_key(lokr_name)] = k
    w2 = tucker(k["lokr_t2"], k["lokr_w2_a"], k["lokr_w2_b"])
    changes[lokr_name] = torch.kron(k["lokr_w1"][:, :, None, None], w2.contiguous()) * (1.0 / 2)
    network = write(tmp_path / "tucker.safetensors", layers)
    out, reference = run_concept(unet, network, 0.8)
    assert_applied(unet, out, reference, merged(unet, changes, 0.8))


# ---- float8 weight storage -------------------------------------------------------------------

def store_in_float8(module: nn.Linear):
    """A1111's 'FP8 weight': the weight is stored as float8_e4m3fn and cast to the input's
    dtype for every forward."""
    module.weight = nn.Parameter(module.weight.detach().to(torch.float8_e4m3fn), requires_grad=False)
    module.forward = lambda x: nn.functional.linear(x, module.weight.to(x.dtype), module.bias)


@pytest.mark.parametrize("dora", [False, True])
def test_deltas_are_computed_in_the_compute_dtype_not_in_float8(tmp_path, unet, dora):
    gen = torch.Generator().manual_seed(9)
    modules = modules_of(unet)
    reference_unet = copy.deepcopy(unet)
    ref_modules = modules_of(reference_unet)
    layers, changes = {}, {}
    for name in LINEARS:
        store_in_float8(modules[name])
        with torch.no_grad():   # the reference computes with the same (float8-rounded) weight in fp32
            ref_modules[name].weight.copy_(modules[name].weight.float())
        weight = ref_modules[name].weight.detach()
        out_f, in_f = weight.shape
        parts = {"lora_down.weight": rand(gen, 4, in_f, scale=0.5), "lora_up.weight": rand(gen, out_f, 4, scale=0.5),
                 "alpha": torch.tensor(4.0)}
        updown = parts["lora_up.weight"] @ parts["lora_down.weight"]
        if dora:
            parts["dora_scale"] = weight.norm(dim=0, keepdim=True) * 1.3
            updown = dora_merge(weight, updown, parts["dora_scale"], per_output=False)
        layers[kohya_key(name)] = parts
        changes[name] = updown
    network = write(tmp_path / "lora.safetensors", layers)
    out, reference = run_concept(unet, network, 1.0)
    expected = reference(merged(reference_unet, changes, 1.0))
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)
    assert (expected - reference(reference_unet)).abs().max() > 1e-2


# ---- what cannot be applied is named -----------------------------------------------------------

def test_layers_that_cannot_be_applied_are_named_in_the_warnings(tmp_path, unet):
    gen = torch.Generator().manual_seed(10)
    modules = modules_of(unet)
    conv = modules[CONVS[0]].weight
    linear = modules[LINEARS[0]].weight
    layers = {
        # GLoRA on a conv layer: A1111's formula (W @ a2 @ a1) has no meaning for a 4-D weight
        kohya_key(CONVS[0]): {"a1.weight": rand(gen, 4, conv.shape[1], 3, 3), "a2.weight": rand(gen, 4, 4, 1, 1),
                              "b1.weight": rand(gen, 4, conv.shape[1], 3, 3),
                              "b2.weight": rand(gen, conv.shape[0], 4, 1, 1), "alpha": torch.tensor(4.0)},
        # a type nobody knows
        kohya_key(LINEARS[1]): {"mystery_w": rand(gen, 4, 4)},
        # a norm change on a linear layer
        kohya_key(LINEARS[2]): {"w_norm": rand(gen, 8), "b_norm": rand(gen, 8)},
        # and one layer that is applied
        kohya_key(LINEARS[0]): {"lora_down.weight": rand(gen, 4, linear.shape[1]),
                                "lora_up.weight": rand(gen, linear.shape[0], 4)},
    }
    network = write(tmp_path / "mixed.safetensors", layers)
    warnings = []
    out, reference = run_concept(unet, network, 1.0, warn=warnings.append)
    text = "\n".join(warnings)
    assert "'mixed'" in text and "3 UNet layers not applied" in text
    assert f"{CONVS[0]} (GLoRA on a conv layer" in text
    assert kohya_key(LINEARS[1]) in text and "mystery_w" in text
    assert f"{LINEARS[2]} (norm on a Linear layer)" in text
    applied = layers[kohya_key(LINEARS[0])]
    changes = {LINEARS[0]: applied["lora_up.weight"] @ applied["lora_down.weight"]}
    assert_applied(unet, out, reference, merged(unet, changes, 1.0))


def test_types_that_read_a_quantised_weight_are_named_not_misapplied(tmp_path, unet):
    gen = torch.Generator().manual_seed(11)
    modules = modules_of(unet)
    quantised, plain = modules[LINEARS[0]], modules[LINEARS[1]]
    out_f, in_f = quantised.weight.shape
    # Forge's NF4/GGUF layers hold their weight as packed bytes, not as a matrix DoRA could normalise
    quantised.weight = nn.Parameter(torch.zeros(out_f, in_f, dtype=torch.uint8), requires_grad=False)
    layers = {kohya_key(LINEARS[0]): {"lora_down.weight": rand(gen, 4, in_f), "lora_up.weight": rand(gen, out_f, 4),
                                      "dora_scale": torch.ones(1, in_f)},
              kohya_key(LINEARS[1]): {"lora_down.weight": rand(gen, 4, plain.weight.shape[1]),
                                      "lora_up.weight": rand(gen, plain.weight.shape[0], 4)}}
    warnings = []
    bound = bind_loras(unet, [LoraUse(write(tmp_path / "q.safetensors", layers), 1.0)], warn=warnings.append)
    assert set(bound) == {plain}
    assert len(warnings) == 1
    assert f"{LINEARS[0]} (DoRA LoRA needs the layer's weight, stored as torch.uint8)" in warnings[0]
