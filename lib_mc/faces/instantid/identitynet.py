"""InstantID's IdentityNet: diffusers' SDXL ControlNetModel, rebuilt in plain torch (the WebUIs do
not promise diffusers) with diffusers' key names, so the official files load unconverted. Its
cross-attention context is the face tokens; `y` is sgm's vector, which equals diffusers'
cat[text_embeds, time_proj(time_ids)]. Residual i goes with the UNet's input block i (sgm adds
residual N-1-j to output block j's skip input), the last one to the middle block's output."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file
from torch import nn

from ...auto.sam import ModelFileError
from .blocks import ConditioningEmbedding, Downsample, ResnetBlock, TimestepEmbedding, Transformer2D, timestep_embedding
from .netconfig import HEAD_CHANNELS, NetConfig, config_from_state

WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                "diffusion_pytorch_model.bin")


class DownBlock(nn.Module):
    def __init__(self, cin: int, cout: int, i: int, cfg: NetConfig, temb: int, last: bool):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(cin if k == 0 else cout, cout, temb, cfg.groups, cfg.eps)
                                     for k in range(cfg.layers))
        self.attentions = nn.ModuleList(
            Transformer2D(cout, cfg.context_dim, cfg.heads[i], cfg.depths[i], cfg.groups, cfg.linear)
            for _ in range(cfg.layers if cfg.depths[i] else 0))
        self.downsamplers = nn.ModuleList([] if last else [Downsample(cout)])

    def forward(self, h, temb, context):
        outputs = []
        for k, resnet in enumerate(self.resnets):
            h = resnet(h, temb)
            if len(self.attentions):
                h = self.attentions[k](h, context)
            outputs.append(h)
        for down in self.downsamplers:
            h = down(h)
            outputs.append(h)
        return h, outputs


class MidBlock(nn.Module):
    def __init__(self, dim: int, cfg: NetConfig, temb: int):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(dim, dim, temb, cfg.groups, cfg.eps) for _ in range(2))
        self.attentions = nn.ModuleList([Transformer2D(dim, cfg.context_dim, cfg.heads[-1], cfg.mid_depth,
                                                       cfg.groups, cfg.linear)])

    def forward(self, h, temb, context):
        h = self.resnets[0](h, temb)
        return self.resnets[1](self.attentions[0](h, context), temb)


class IdentityNet(nn.Module):
    def __init__(self, cfg: NetConfig):
        super().__init__()
        self.cfg = cfg
        ch, temb = cfg.channels, cfg.channels[0] * 4
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb)
        self.add_embedding = TimestepEmbedding(cfg.adm_dim, temb)
        self.controlnet_cond_embedding = ConditioningEmbedding(ch[0], cfg.hint_channels, cfg.hint_embedding)
        self.down_blocks = nn.ModuleList(DownBlock(ch[max(i - 1, 0)], c, i, cfg, temb, i == len(ch) - 1)
                                         for i, c in enumerate(ch))
        skips = [ch[0]] + [c for i, c in enumerate(ch) for _ in range(cfg.layers + (i < len(ch) - 1))]
        self.controlnet_down_blocks = nn.ModuleList(nn.Conv2d(c, c, 1) for c in skips)
        self.mid_block = MidBlock(ch[-1], cfg, temb)
        self.controlnet_mid_block = nn.Conv2d(ch[-1], ch[-1], 1)

    def forward(self, x, timesteps, context, y, hint) -> list[torch.Tensor]:
        dtype = self.conv_in.weight.dtype
        t = torch.as_tensor(timesteps, device=x.device).reshape(-1).expand(x.shape[0])
        t_emb = timestep_embedding(t, self.cfg.channels[0], self.cfg.flip_sin_to_cos, self.cfg.freq_shift)
        temb = self.time_embedding(t_emb.to(dtype)) + self.add_embedding(y.to(dtype))
        hint = hint.to(dtype).flip(1) if self.cfg.bgr else hint.to(dtype)
        h = self.conv_in(x.to(dtype)) + self.controlnet_cond_embedding(hint)
        context = context.to(dtype)
        skips = [h]
        for block in self.down_blocks:
            h, outputs = block(h, temb, context)
            skips += outputs
        h = self.mid_block(h, temb, context)
        return [conv(s) for conv, s in zip(self.controlnet_down_blocks, skips)] + [self.controlnet_mid_block(h)]


def _weights_of(path: str) -> tuple[str, dict]:
    """(weights file, config.json settings) of a diffusers folder or a single file."""
    if os.path.isdir(path):
        config = os.path.join(path, "config.json")
        weights = next((os.path.join(path, n) for n in WEIGHT_NAMES if os.path.isfile(os.path.join(path, n))), None)
        if weights is None or not os.path.isfile(config):
            raise ModelFileError(f"{path}: not a diffusers ControlNet folder (it needs config.json and one of "
                                 f"{', '.join(WEIGHT_NAMES)})")
        with open(config, encoding="utf-8") as f:
            settings = json.load(f)
        if settings.get("_class_name", "ControlNetModel") != "ControlNetModel":
            raise ModelFileError(f"{config}: a {settings['_class_name']}, not a ControlNetModel")
        return weights, settings
    if not os.path.isfile(path):
        raise ModelFileError(f"{path}: no such file or folder")
    return path, {}


def _take(net: nn.Module, state: dict) -> None:
    """The file's tensors become the (meta) parameters, checked like a strict load_state_dict.
    Set one by one rather than through Module.load_state_dict: A1111 replaces that method while
    it loads a checkpoint (sd_disable_initialization), and its stand-in takes no `assign`."""
    params = dict(net.named_parameters())
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unexpected:
        raise KeyError(f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, param in params.items():
        if tuple(state[name].shape) != tuple(param.shape):
            raise ValueError(f"{name} is {tuple(state[name].shape)}, expected {tuple(param.shape)}")
        owner, _, attr = name.rpartition(".")
        setattr(net.get_submodule(owner), attr, nn.Parameter(state[name], requires_grad=False))


def load_identitynet(path: str, dtype: torch.dtype | None = None, head_channels: int = HEAD_CHANNELS) -> IdentityNet:
    """The official diffusers folder (config.json + diffusion_pytorch_model.safetensors) or one
    .safetensors with the same keys (control_instant_id_sdxl.safetensors; sizes from the tensors,
    `head_channels` wide heads). Weights keep the file's dtype unless `dtype` is given."""
    weights, settings = _weights_of(path)
    try:
        state = load_file(weights) if weights.endswith(".safetensors") else \
            torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:   # a broken or foreign file: say which one
        raise ModelFileError(f"{weights}: cannot be read as a ControlNet ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict) or "controlnet_cond_embedding.conv_in.weight" not in state:
        ldm = isinstance(state, dict) and any(k.startswith(("control_model.", "input_hint_block.")) for k in state)
        raise ModelFileError(f"{weights}: not a ControlNet in diffusers' format" +
                             (" (an ldm-format ControlNet; InstantID's IdentityNet is diffusers' ControlNetModel)"
                              if ldm else ""))
    if "add_embedding.linear_1.weight" not in state:
        raise ModelFileError(f"{weights}: not an SDXL ControlNet (no text_time add_embedding); InstantID's IdentityNet is one")
    try:
        cfg = config_from_state(state, settings, head_channels)
        with torch.device("meta"):   # no random init of ~1.2e9 parameters: the file's tensors become them
            net = IdentityNet(cfg)
        _take(net, state)
    except (KeyError, ValueError, RuntimeError, StopIteration) as exc:
        raise ModelFileError(f"{weights}: its ControlNet weights are incomplete or misshapen ({exc})") from exc
    net.eval()
    return net.to(dtype) if dtype is not None else net
