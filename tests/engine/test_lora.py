"""kohya LoRA files: names (ldm and diffusers), network types, and clear errors on misfits."""

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from lib_mc.errors import LoraMismatchError, PlanError
from lib_mc.lora import LoraUse, bind_loras, load_network
from lib_mc.lora.names import diffusers_to_ldm
from tinyhost import make_unet, write_lora


@pytest.mark.parametrize("diffusers, ldm", [
    ("down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", "input_blocks_1_1_transformer_blocks_0_attn1_to_q"),
    ("down_blocks_0_attentions_1_proj_in", "input_blocks_2_1_proj_in"),
    ("down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k", "input_blocks_4_1_transformer_blocks_0_attn2_to_k"),
    ("down_blocks_0_resnets_0_conv1", "input_blocks_1_0_in_layers_2"),
    ("down_blocks_2_resnets_1_time_emb_proj", "input_blocks_8_0_emb_layers_1"),
    ("down_blocks_0_downsamplers_0_conv", "input_blocks_3_0_op"),
    ("mid_block_attentions_0_proj_out", "middle_block_1_proj_out"),
    ("mid_block_resnets_1_conv2", "middle_block_2_out_layers_3"),
    ("up_blocks_1_attentions_2_transformer_blocks_0_ff_net_2", "output_blocks_5_1_transformer_blocks_0_ff_net_2"),
    ("up_blocks_0_resnets_2_conv_shortcut", "output_blocks_2_0_skip_connection"),
    ("time_embedding_linear_1", "time_embed_0"),
])
def test_diffusers_names_map_to_ldm(diffusers, ldm):
    assert ldm in diffusers_to_ldm(diffusers)


def to_diffusers(name: str) -> str:
    """The inverse mapping for SD1.5's block layout, written out independently of the engine."""
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


def test_diffusers_named_file_binds_exactly_like_the_ldm_named_one(tmp_path):
    unet = make_unet(num_res_blocks=2)   # SD1.5's block layout: 3 input blocks per level
    parts = write_lora(tmp_path / "ldm.safetensors", unet, seed=1)
    write_lora(tmp_path / "diffusers.safetensors", unet, seed=1, key_of=to_diffusers)
    assert any(to_diffusers(n).startswith("lora_unet_down_blocks") for n in parts)
    by_ldm = bind_loras(unet, [LoraUse(load_network(str(tmp_path / "ldm.safetensors")), 1.0)])
    by_diffusers = bind_loras(unet, [LoraUse(load_network(str(tmp_path / "diffusers.safetensors")), 1.0)])
    modules = dict(unet.named_modules())
    assert set(by_ldm) == set(by_diffusers) == {modules[n] for n in parts}
    x = torch.randn(2, 5, modules[next(iter(parts))].in_features)
    first = modules[next(iter(parts))]
    torch.testing.assert_close(by_ldm[first][0](x), by_diffusers[first][0](x))


def merged_output(module, delta_weight, x, delta_bias=None):
    with torch.no_grad():
        weight = module.weight + delta_weight.reshape(module.weight.shape)
        bias = module.bias if delta_bias is None else module.bias + delta_bias
        if isinstance(module, nn.Conv2d):
            return nn.functional.conv2d(x, weight, bias, module.stride, module.padding)
        return nn.functional.linear(x, weight, bias)


def one_layer_file(path, key, tensors):
    save_file({f"{key}.{k}": v.contiguous() for k, v in tensors.items()}, str(path))
    return load_network(str(path))


NAME = "input_blocks.1.1.transformer_blocks.0.attn1.to_q"
CONV = "input_blocks.1.0.in_layers.2"


@pytest.mark.parametrize("kind", ["loha", "lokr", "full", "locon_tucker"])
def test_other_network_types_equal_their_merged_weights(tmp_path, kind):
    unet = make_unet()
    modules = dict(unet.named_modules())
    gen = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(shape, generator=gen) * 0.2  # noqa: E731
    name = CONV if kind == "locon_tucker" else NAME
    module = modules[name]
    out_f, in_f = module.weight.shape[:2]
    key = "lora_unet_" + name.replace(".", "_")
    if kind == "loha":
        t = dict(hada_w1_a=r(out_f, 4), hada_w1_b=r(4, in_f), hada_w2_a=r(out_f, 4), hada_w2_b=r(4, in_f),
                 alpha=torch.tensor(2.0))
        delta = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]) * 0.5
    elif kind == "lokr":
        t = dict(lokr_w1=r(4, 4), lokr_w2_a=r(out_f // 4, 2), lokr_w2_b=r(2, in_f // 4), alpha=torch.tensor(1.0))
        delta = torch.kron(t["lokr_w1"], t["lokr_w2_a"] @ t["lokr_w2_b"]) * 0.5
    elif kind == "full":
        t = dict(diff=r(out_f, in_f))
        delta = t["diff"]
    else:  # LoCon with a Tucker mid: 1x1 down, 3x3 mid, 1x1 up
        t = {"lora_down.weight": r(4, in_f, 1, 1), "lora_mid.weight": r(4, 4, 3, 3),
             "lora_up.weight": r(out_f, 4, 1, 1), "alpha": torch.tensor(4.0)}
        delta = torch.einsum("or,rmhw,mi->oihw", t["lora_up.weight"].flatten(1), t["lora_mid.weight"],
                             t["lora_down.weight"].flatten(1))
    network = one_layer_file(tmp_path / f"{kind}.safetensors", key, t)
    ops = bind_loras(unet, [LoraUse(network, 0.7)])[module]
    x = torch.randn(2, in_f, 8, 8) if isinstance(module, nn.Conv2d) else torch.randn(2, 5, in_f)
    with torch.no_grad():
        got = module(x) + sum(op(x) for op in ops)
    torch.testing.assert_close(got, merged_output(module, delta * 0.7, x), atol=1e-5, rtol=1e-4)


def test_lora_for_another_model_is_named_in_the_error(tmp_path):
    unet = make_unet()
    other = make_unet()
    bigger = dict(other.named_modules())
    for m in bigger.values():   # widen one layer's shapes, like SDXL's 2048-wide context on SD1.5
        if isinstance(m, nn.Linear) and m.in_features == 32:
            m.weight = nn.Parameter(torch.zeros(m.out_features, 64))
    write_lora(tmp_path / "xl_style.safetensors", other, seed=2)
    with pytest.raises(LoraMismatchError, match="lora 'xl_style'.*another model type"):
        bind_loras(unet, [LoraUse(load_network(str(tmp_path / "xl_style.safetensors")), 1.0)])
    save_file({"lora_unet_input_blocks_7_1_transformer_blocks_9_attn1_to_q.lora_down.weight": torch.zeros(2, 8),
               "lora_unet_input_blocks_7_1_transformer_blocks_9_attn1_to_q.lora_up.weight": torch.zeros(8, 2)},
              str(tmp_path / "elsewhere.safetensors"))
    with pytest.raises(LoraMismatchError, match="lora 'elsewhere'.*none of its 1 UNet layers"):
        bind_loras(unet, [LoraUse(load_network(str(tmp_path / "elsewhere.safetensors")), 1.0)])


def test_partly_matching_lora_warns_and_binds_the_rest(tmp_path):
    unet = make_unet()
    parts = write_lora(tmp_path / "a.safetensors", unet, seed=3)
    network = load_network(str(tmp_path / "a.safetensors"))
    network.unet["lora_unet_not_a_layer"] = next(iter(network.unet.values()))
    warnings = []
    bound = bind_loras(unet, [LoraUse(network, 1.0)], warn=warnings.append)
    assert len(bound) == len(parts)
    assert len(warnings) == 1 and "'a'" in warnings[0] and "1 of" in warnings[0]


def test_unreadable_or_missing_files_are_plan_errors(tmp_path):
    with pytest.raises(PlanError, match="file not found"):
        load_network(str(tmp_path / "nope.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(PlanError, match="lora 'junk': cannot read"):
        load_network(str(tmp_path / "junk.safetensors"))
    save_file({"something.weight": torch.zeros(2)}, str(tmp_path / "empty.safetensors"))
    with pytest.raises(PlanError, match="lora 'empty': holds no LoRA layers"):
        load_network(str(tmp_path / "empty.safetensors"))
