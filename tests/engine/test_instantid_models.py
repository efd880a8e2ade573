"""InstantID's models as the package loads them, against the official code: the Resampler against
a copy of IP-Adapter's, the IP-Adapter's layer keys against diffusers' attn_processors order on
the tiny sgm (SDXL) UNet, the IdentityNet against diffusers' own ControlNetModel on files that
diffusers wrote, and the finder on the folder layouts users have."""

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file
from torch import nn

from instantid_files import (TEXT_EMBEDS, TINY_HEAD_CHANNELS, reference_resampler, write_identitynet_file,
                             write_identitynet_folder, write_ip_adapter)
from lib_mc.auto.sam import ModelFileError
from lib_mc.faces.instantid.files import find_instantid, instantid_folders
from lib_mc.faces.instantid.identitynet import load_identitynet
from lib_mc.faces.instantid.ip_adapter import cross_attention_names, load_ip_adapter
from sgm.modules.diffusionmodules.openaimodel import UNetModel
from sgm.modules.diffusionmodules.util import timestep_embedding as sgm_timestep_embedding
from tinyhost import make_unet
from tinyxl import CONTEXT_DIM, make_xl_unet, write_xl_lora


@pytest.fixture(scope="module")
def xl_unet():
    return make_xl_unet()


# ---- Resampler ------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [{}, dict(dim=192, heads=3, depth=3, ff_mult=2, num_queries=4)])
@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_resampler_tokens_match_the_official_resampler(tmp_path, xl_unet, shape, suffix):
    path = tmp_path / f"ip-adapter{suffix}"
    state = write_ip_adapter(path, xl_unet, seed=3, **shape)
    reference = reference_resampler(CONTEXT_DIM, seed=0, **shape)
    reference.load_state_dict(state["image_proj"])
    adapter = load_ip_adapter(str(path), xl_unet)
    embedding = torch.randn(512, generator=torch.Generator().manual_seed(5)) * 20   # raw ArcFace scale
    cond, uncond = adapter.tokens(embedding)
    with torch.no_grad():
        want_cond = reference(embedding.reshape(1, 1, 512))
        want_uncond = reference(torch.zeros(1, 1, 512))   # InstantID's pipeline: zeros as the negative
    assert cond.shape == (1, shape.get("num_queries", 16), CONTEXT_DIM)
    assert torch.allclose(cond, want_cond, atol=1e-5) and torch.allclose(uncond, want_uncond, atol=1e-5)
    assert (cond - uncond).abs().max() > 0.1   # the face changes the tokens
    assert torch.equal(adapter.tokens(embedding[None])[0], cond)


def test_a_float16_ip_adapter_file_loads_as_float32(tmp_path, xl_unet):
    """InstantID's ip-adapter.bin holds float16 tensors."""
    path = tmp_path / "ip-adapter.bin"
    state = write_ip_adapter(path, xl_unet, seed=3)
    half = {part: {k: v.half() for k, v in d.items()} for part, d in state.items()}
    torch.save(half, path)
    reference = reference_resampler(CONTEXT_DIM, seed=0)
    reference.load_state_dict(half["image_proj"])   # the same rounded weights, in float32
    adapter = load_ip_adapter(str(path), xl_unet)
    cond, _ = adapter.tokens(torch.ones(512))
    with torch.no_grad():
        assert cond.dtype == torch.float32 and torch.allclose(cond, reference(torch.ones(1, 1, 512)), atol=1e-5)
    k, v = next(iter(adapter.layers.values()))
    assert k.dtype == v.dtype == torch.float32 and torch.equal(k, half["ip_adapter"]["1.to_k_ip.weight"].float())


# ---- IP-Adapter layers ----------------------------------------------------------------------

class _IPWeights(nn.Module):
    """What InstantID's IPAttnProcessor holds: the only parameters in the file's ip_adapter part."""

    def __init__(self, hidden_size, cross_attention_dim):
        super().__init__()
        self.to_k_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.to_v_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)


def _diffusers_unet():
    """diffusers' SDXL UNet at tinyxl's config (its attn_processors order is the file's key order)."""
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64, 128), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=[1, 1, 2], attention_head_dim=(2, 4, 8), cross_attention_dim=CONTEXT_DIM,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=48)


def _sgm_name(processor: str) -> str:
    """diffusers' SDXL layer name -> sgm's (3 input blocks per level: 2 ResBlocks + downsample;
    3 output blocks per level; the middle block's transformer is its 2nd module)."""
    parts = processor.split(".")
    tail = ".".join(parts[parts.index("transformer_blocks"):-1])
    if parts[0] == "mid_block":
        return f"middle_block.1.{tail}"
    block, attention = int(parts[1]), int(parts[3])
    if parts[0] == "down_blocks":
        return f"input_blocks.{3 * block + attention + 1}.1.{tail}"
    return f"output_blocks.{3 * block + attention}.1.{tail}"


def test_ip_layers_land_on_the_cross_attentions_in_diffusers_order(tmp_path, xl_unet):
    path = tmp_path / "ip-adapter.bin"
    state = write_ip_adapter(path, xl_unet, seed=1, marker=True)
    # InstantID's set_ip_adapter: one processor per attn_processors entry, weights only on attn2
    dunet = _diffusers_unet()
    processors, names = [], list(dunet.attn_processors)
    for name in names:
        channels = dunet.config.block_out_channels
        block = None if name.startswith("mid_block") else int(name.split(".")[1])
        hidden = (channels[-1] if name.startswith("mid_block") else
                  channels[::-1][block] if name.startswith("up_blocks") else channels[block])
        processors.append(nn.Module() if name.endswith("attn1.processor") else _IPWeights(hidden, CONTEXT_DIM))
    official = nn.ModuleList(processors)
    official.load_state_dict(state["ip_adapter"])   # strict: the file is the official layout

    adapter = load_ip_adapter(str(path), xl_unet)
    sgm_attn2 = sorted(n for n, _ in xl_unet.named_modules() if n.endswith(".attn2"))
    assert len(adapter.layers) == len(sgm_attn2) == 17
    assert sorted(adapter.layers) == sgm_attn2
    assert cross_attention_names(xl_unet) == list(adapter.layers)
    for name, proc in zip(names, official):
        if isinstance(proc, _IPWeights):
            k, v = adapter.layers[_sgm_name(name)]
            assert torch.equal(k, proc.to_k_ip.weight), (name, _sgm_name(name), k.flatten()[0].item())
            assert torch.equal(v, proc.to_v_ip.weight), name


def test_sdxl_at_full_size_has_the_70_cross_attentions_in_diffusers_order():
    """SDXL's real network config (configs/inference/sd_xl_base.yaml) built on the meta device (no
    memory): its 70 attn2 modules in the adapter's order are diffusers' SDXL attn2 processors, one by one."""
    with torch.device("meta"):
        unet = UNetModel(adm_in_channels=2816, num_classes="sequential", use_checkpoint=False, in_channels=4,
                         out_channels=4, model_channels=320, attention_resolutions=[4, 2], num_res_blocks=2,
                         channel_mult=[1, 2, 4], num_head_channels=64, use_spatial_transformer=True,
                         use_linear_in_transformer=True, transformer_depth=[1, 2, 10], context_dim=2048,
                         spatial_transformer_attn_type="softmax-xformers", legacy=False)
        dunet = UNet2DConditionModel(
            block_out_channels=(320, 640, 1280), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=[1, 2, 10], attention_head_dim=[5, 10, 20], cross_attention_dim=2048,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816)
    diffusers_attn2 = [n for n in dunet.attn_processors if n.endswith("attn2.processor")]
    assert cross_attention_names(unet) == [_sgm_name(n) for n in diffusers_attn2]
    assert len(diffusers_attn2) == 70


def test_ip_adapter_for_another_unet_is_refused_naming_the_file(tmp_path, xl_unet):
    path = tmp_path / "ip-adapter_instant_id_sdxl.bin"
    write_ip_adapter(path, xl_unet, seed=1)
    with pytest.raises(ModelFileError, match=r"ip-adapter_instant_id_sdxl\.bin.*17 cross-attention layers.*10"):
        load_ip_adapter(str(path), make_unet())   # tinyhost's SD1.5 UNet: 10 cross-attentions of width 32
    state = torch.load(path)
    state["ip_adapter"]["9.to_k_ip.weight"] = torch.zeros(128, 32)   # one layer for a 32-wide context
    torch.save(state, path)
    with pytest.raises(ModelFileError, match=r"ip-adapter_instant_id_sdxl\.bin.*layer 9 is \(128, 32\).*"
                                             r"input_blocks\.8\.1\.transformer_blocks\.0\.attn2 is \(128, 64\)"):
        load_ip_adapter(str(path), xl_unet)


def test_files_that_are_not_instantids_ip_adapter_are_named(tmp_path, xl_unet):
    lora = tmp_path / "some_lora.safetensors"
    write_xl_lora(lora, xl_unet, seed=0)
    with pytest.raises(ModelFileError, match=r"some_lora\.safetensors: not an IP-Adapter"):
        load_ip_adapter(str(lora), xl_unet)
    plain = tmp_path / "ip-adapter_sdxl.bin"   # a plain IP-Adapter: a linear image projection
    torch.save({"image_proj": {"proj.weight": torch.zeros(4 * 64, 1280)},
                "ip_adapter": {"1.to_k_ip.weight": torch.zeros(64, 64)}}, plain)
    with pytest.raises(ModelFileError, match=r"ip-adapter_sdxl\.bin: not InstantID's IP-Adapter"):
        load_ip_adapter(str(plain), xl_unet)
    clip_plus = tmp_path / "ip-adapter-plus_sdxl.bin"   # a Resampler, but over 1280-d CLIP features
    write_ip_adapter(clip_plus, xl_unet, seed=2, embedding_dim=1280)
    with pytest.raises(ModelFileError, match=r"ip-adapter-plus_sdxl\.bin: not InstantID's.*1280-d"):
        load_ip_adapter(str(clip_plus), xl_unet)
    broken = tmp_path / "ip-adapter.bin"
    broken.write_bytes(b"not a pickle")
    with pytest.raises(ModelFileError, match=r"ip-adapter\.bin: cannot be read as an IP-Adapter"):
        load_ip_adapter(str(broken), xl_unet)


# ---- IdentityNet ----------------------------------------------------------------------------

def _controlnet_inputs(seed: int, batch: int = 2):
    gen = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(batch, 4, 16, 16, generator=gen), t=torch.tensor([801.0, 15.5])[:batch],
                tokens=torch.randn(batch, 16, CONTEXT_DIM, generator=gen),
                text_embeds=torch.randn(batch, TEXT_EMBEDS, generator=gen),
                time_ids=torch.tensor([[128.0, 96, 0, 8, 128, 128]]).repeat(batch, 1),   # size, crop, target
                hint=torch.rand(batch, 3, 128, 128, generator=gen))


def _sgm_vector(text_embeds, time_ids):
    """What sgm's conditioner puts in `y`: the pooled text, then each size/crop number through
    ConcatTimestepEmbedderND (timestep_embedding(number, 4), concatenated)."""
    return torch.cat([text_embeds, sgm_timestep_embedding(time_ids.flatten(), 4).reshape(len(time_ids), -1)], -1)


def _both(reference, net, i):
    with torch.no_grad():
        down, mid = reference(i["x"], i["t"], encoder_hidden_states=i["tokens"], controlnet_cond=i["hint"],
                              added_cond_kwargs={"text_embeds": i["text_embeds"], "time_ids": i["time_ids"]},
                              return_dict=False)
        ours = net(i["x"], i["t"], i["tokens"], _sgm_vector(i["text_embeds"], i["time_ids"]), i["hint"])
    return ours, list(down) + [mid]


def test_identitynet_gives_diffusers_residuals_from_a_save_pretrained_folder(tmp_path, xl_unet):
    reference = write_identitynet_folder(tmp_path / "ControlNetModel", seed=4)
    net = load_identitynet(str(tmp_path / "ControlNetModel"))
    i = _controlnet_inputs(7)
    # sgm's y is diffusers' cat[text_embeds, add_time_proj(time_ids)]
    y = _sgm_vector(i["text_embeds"], i["time_ids"])
    assert torch.allclose(y, torch.cat([i["text_embeds"], reference.add_time_proj(i["time_ids"].flatten()).reshape(2, -1)], -1),
                          atol=1e-6)
    ours, want = _both(reference, net, i)
    assert len(ours) == len(want) == 10
    worst = max((a - b).abs().max().item() for a, b in zip(ours, want))
    print(f"IdentityNet vs diffusers ControlNetModel (float32): max abs difference {worst:.2e}, "
          f"residual scale {min(r.abs().max().item() for r in want):.2f}..{max(r.abs().max().item() for r in want):.2f}")
    assert worst < 1e-4
    assert min(r.abs().max().item() for r in want) > 0.05   # every residual carries something
    # in float64 the two differ by rounding only (an epsilon or a norm off shows here)
    ours64, want64 = _both(reference.double(), net.double(), {k: v.double() for k, v in i.items()})
    worst64 = max((a - b).abs().max().item() for a, b in zip(ours64, want64))
    print(f"float64: max abs difference {worst64:.2e}")
    assert worst64 < 1e-10

    # one residual per sgm input block at its skip's shape, then the middle block's output
    with torch.no_grad():
        emb = xl_unet.time_embed(sgm_timestep_embedding(i["t"], xl_unet.model_channels)) + xl_unet.label_emb(y)
        h, skips = i["x"], []
        for block in xl_unet.input_blocks:
            h = block(h, emb, i["tokens"])
            skips.append(h)
        h = xl_unet.middle_block(h, emb, i["tokens"])
    assert [r.shape for r in ours] == [s.shape for s in skips] + [h.shape]


def test_identitynet_single_file_and_the_face_tokens_matter(tmp_path):
    folder_model = write_identitynet_folder(tmp_path / "ControlNetModel", seed=4)
    write_identitynet_file(tmp_path / "control_instant_id_sdxl.safetensors", seed=4)
    from_folder = load_identitynet(str(tmp_path / "ControlNetModel"))
    single = load_identitynet(str(tmp_path / "control_instant_id_sdxl.safetensors"), head_channels=TINY_HEAD_CHANNELS)
    assert single.cfg.heads == tuple(folder_model.config.attention_head_dim) == from_folder.cfg.heads
    i = _controlnet_inputs(8)
    y = _sgm_vector(i["text_embeds"], i["time_ids"])
    with torch.no_grad():
        a = from_folder(i["x"], i["t"], i["tokens"], y, i["hint"])
        b = single(i["x"], i["t"], i["tokens"], y, i["hint"])
        other_face = from_folder(i["x"], i["t"], i["tokens"].flip(0), y, i["hint"])
        half = load_identitynet(str(tmp_path / "ControlNetModel"), dtype=torch.bfloat16)(
            i["x"], i["t"], i["tokens"], y, i["hint"])
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert (a[4] - other_face[4]).abs().max() > 1e-3   # cross-attention reads the face tokens
    assert torch.equal(a[0], other_face[0])            # the first residual comes before any attention
    assert half[-1].dtype == torch.bfloat16 and torch.allclose(half[-1].float(), a[-1], atol=0.1, rtol=0.05)
    # InstantID publishes float16 weights: they load as such, or converted on request
    fp16 = tmp_path / "fp16.safetensors"
    save_file({k: v.half() for k, v in folder_model.state_dict().items()}, str(fp16))
    assert load_identitynet(str(fp16), head_channels=TINY_HEAD_CHANNELS).conv_in.weight.dtype == torch.float16
    as_float = load_identitynet(str(fp16), dtype=torch.float32, head_channels=TINY_HEAD_CHANNELS)
    with torch.no_grad():
        c = as_float(i["x"], i["t"], i["tokens"], y, i["hint"])
    assert c[-1].dtype == torch.float32 and all(torch.allclose(p, q, atol=0.02, rtol=0.02) for p, q in zip(a, c))


def test_files_that_are_not_an_sdxl_controlnet_are_named(tmp_path, xl_unet):
    with pytest.raises(ModelFileError, match=r"nowhere: no such file or folder"):
        load_identitynet(str(tmp_path / "nowhere"))
    empty = tmp_path / "ControlNetModel"
    empty.mkdir()
    with pytest.raises(ModelFileError, match=r"ControlNetModel: not a diffusers ControlNet folder.*config\.json"):
        load_identitynet(str(empty))
    lora = tmp_path / "lora.safetensors"
    write_xl_lora(lora, xl_unet, seed=0)
    with pytest.raises(ModelFileError, match=r"lora\.safetensors: not a ControlNet in diffusers' format"):
        load_identitynet(str(lora))
    sd15 = write_identitynet_folder(tmp_path / "sd15_controlnet", seed=1).state_dict()   # no text_time embedding
    save_file({k: v for k, v in sd15.items() if not k.startswith("add_embedding")}, str(tmp_path / "sd15.safetensors"))
    with pytest.raises(ModelFileError, match=r"sd15\.safetensors: not an SDXL ControlNet"):
        load_identitynet(str(tmp_path / "sd15.safetensors"))
    save_file({k: v for k, v in sd15.items() if "mid_block.resnets.1" not in k}, str(tmp_path / "cut.safetensors"))
    with pytest.raises(ModelFileError, match=r"cut\.safetensors: its ControlNet weights are incomplete"):
        load_identitynet(str(tmp_path / "cut.safetensors"), head_channels=TINY_HEAD_CHANNELS)


# ---- where the files are found ----------------------------------------------------------------

LAYOUTS = {   # (IP-Adapter, IdentityNet), relative to the WebUI root
    "A1111 ControlNet extension / Forge": ("models/ControlNet/ip-adapter_instant_id_sdxl.bin",
                                           "models/ControlNet/control_instant_id_sdxl.safetensors"),
    "the extension's own models folder": ("extensions/sd-webui-controlnet/models/ip-adapter_instant_id_sdxl.bin",
                                          "extensions/sd-webui-controlnet/models/control_instant_id_sdxl.safetensors"),
    "InstantID's checkpoints folder": ("models/instantid/checkpoints/ip-adapter.bin",
                                       "models/instantid/checkpoints/ControlNetModel"),
    "ComfyUI's habit": ("models/instantid/ip-adapter.safetensors", "models/controlnet/control_instant_id_sdxl.safetensors"),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_find_instantid_in_each_folder_layout_and_load_what_it_finds(tmp_path, xl_unet, layout):
    adapter_rel, net_rel = LAYOUTS[layout]
    adapter_path, net_path = tmp_path / adapter_rel, tmp_path / net_rel
    adapter_path.parent.mkdir(parents=True, exist_ok=True)
    write_ip_adapter(adapter_path, xl_unet, seed=1)
    if net_rel.endswith("ControlNetModel"):
        write_identitynet_folder(net_path, seed=2)
    else:
        net_path.parent.mkdir(parents=True, exist_ok=True)
        write_identitynet_file(net_path, seed=2)
    (tmp_path / "models" / "ControlNet").mkdir(parents=True, exist_ok=True)
    (tmp_path / "models" / "ControlNet" / "control_sd15_canny.safetensors").write_bytes(b"other ControlNets live here")
    folders = instantid_folders(str(tmp_path / "models"), str(tmp_path / "extensions"))
    found = find_instantid(folders)
    assert found == (str(adapter_path), str(net_path))
    assert len(load_ip_adapter(found[0], xl_unet).layers) == 17
    assert len(load_identitynet(found[1], head_channels=TINY_HEAD_CHANNELS).controlnet_down_blocks) == 9


def test_instantids_own_adapter_name_wins_over_a_generic_ip_adapter(tmp_path, xl_unet):
    models = tmp_path / "models"
    for rel in ("instantid/ip-adapter.bin", "ControlNet/ip-adapter_instant_id_sdxl.bin"):
        (models / rel).parent.mkdir(parents=True, exist_ok=True)
        write_ip_adapter(models / rel, xl_unet, seed=1)
    write_identitynet_file(models / "ControlNet" / "control_instant_id_sdxl.safetensors", seed=2)
    adapter, _ = find_instantid(instantid_folders(str(models)))
    assert adapter == str(models / "ControlNet" / "ip-adapter_instant_id_sdxl.bin")


def test_missing_files_are_named_with_every_folder_searched(tmp_path, xl_unet):
    models = tmp_path / "models"
    folders = instantid_folders(str(models), str(tmp_path / "extensions"))
    with pytest.raises(ModelFileError) as missing:
        find_instantid(folders)
    message = str(missing.value)
    for expected in ["ip-adapter_instant_id_sdxl.bin", "ip-adapter.bin", "control_instant_id_sdxl.safetensors",
                     "ControlNetModel", *folders]:
        assert expected in message
    (models / "ControlNet").mkdir(parents=True)
    write_ip_adapter(models / "ControlNet" / "ip-adapter_instant_id_sdxl.bin", xl_unet, seed=1)
    with pytest.raises(ModelFileError) as only_net:
        find_instantid(folders)
    assert "IdentityNet" in str(only_net.value) and "IP-Adapter (" not in str(only_net.value)


def test_the_identitynet_loads_while_a1111_has_replaced_load_state_dict(tmp_path, monkeypatch):
    """A1111 swaps torch.nn.Module.load_state_dict for a stand-in without `assign` while it loads
    a checkpoint (sd_disable_initialization.LoadStateDictOnMeta); a job prepared meanwhile (or
    after a failed checkpoint switch left it swapped) must still load the IdentityNet."""
    write_identitynet_file(tmp_path / "control_instant_id_sdxl.safetensors", seed=3)
    reference = load_identitynet(str(tmp_path / "control_instant_id_sdxl.safetensors"))
    original = nn.Module.load_state_dict

    def stand_in(module, state_dict, strict=True):   # A1111's signature: no assign
        return original(module, state_dict, strict=strict)
    monkeypatch.setattr(nn.Module, "load_state_dict", stand_in)
    net = load_identitynet(str(tmp_path / "control_instant_id_sdxl.safetensors"))
    for (name, a), (_, b) in zip(net.named_parameters(), reference.named_parameters()):
        assert torch.equal(a, b), name
    assert not any(p.is_meta for p in net.parameters())
