"""LoRA files in kohya format, parsed into per-layer deltas the engine can apply to batch rows.

Low-rank LoRA (incl. LoCon convs and a Tucker `lora_mid`) stays low-rank: the engine applies it
as x @ down @ up on the rows that need it. LoHa, LoKr and full `diff` layers become a dense
weight delta, computed once per generation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from ..errors import PlanError


@dataclass
class LowRank:
    down: torch.Tensor          # (r, in) or (r, in, kh, kw)
    up: torch.Tensor            # (out, r) or (out, r, 1, 1)
    mid: torch.Tensor | None    # (r, r, kh, kw) for Tucker-decomposed convs
    scale: float                # alpha / rank

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclass
class Dense:
    weight: torch.Tensor        # delta, reshaped to the layer's weight shape at bind time
    bias: torch.Tensor | None = None


LayerDelta = LowRank | Dense


@dataclass
class Network:
    """One LoRA file: UNet layer deltas keyed by kohya layer key (`lora_unet_...`)."""
    name: str
    unet: dict[str, LayerDelta] = field(default_factory=dict)
    text_encoder_keys: int = 0
    skipped: dict[str, str] = field(default_factory=dict)   # layer key -> why


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise PlanError("lora", f"file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path, device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_network(path: str, name: str | None = None) -> Network:
    name = name or os.path.splitext(os.path.basename(path))[0]
    try:
        state = load_state_dict(path)
    except PlanError:
        raise
    except Exception as exc:
        raise PlanError(f"lora '{name}'", f"cannot read {path}: {exc}") from exc
    return parse_network(state, name)


def _alpha(parts: dict[str, torch.Tensor]) -> float | None:
    alpha = parts.get("alpha")
    return None if alpha is None else float(alpha)


def _lowrank(parts, name, key) -> LowRank:
    down, up = parts["lora_down.weight"].float(), parts["lora_up.weight"].float()
    mid = parts.get("lora_mid.weight")
    if down.shape[0] != up.shape[1]:
        raise PlanError(f"lora '{name}'", f"{key}: rank of down {tuple(down.shape)} and up {tuple(up.shape)} differ")
    alpha = _alpha(parts)
    scale = 1.0 if alpha is None else alpha / down.shape[0]
    return LowRank(down, up, None if mid is None else mid.float(), scale)


def _loha(parts, name, key) -> Dense:
    if "hada_t1" in parts or "hada_t2" in parts:
        raise PlanError(f"lora '{name}'", f"{key}: LoHa with Tucker factors is not supported")
    w1 = parts["hada_w1_a"].float() @ parts["hada_w1_b"].float()
    w2 = parts["hada_w2_a"].float() @ parts["hada_w2_b"].float()
    alpha = _alpha(parts)
    scale = 1.0 if alpha is None else alpha / parts["hada_w1_b"].shape[0]
    return Dense(w1 * w2 * scale)


def _lokr(parts, name, key) -> Dense:
    if "lokr_t2" in parts:
        raise PlanError(f"lora '{name}'", f"{key}: LoKr with a Tucker factor is not supported")
    w1 = parts["lokr_w1"].float() if "lokr_w1" in parts else parts["lokr_w1_a"].float() @ parts["lokr_w1_b"].float()
    w2 = parts["lokr_w2"].float() if "lokr_w2" in parts else parts["lokr_w2_a"].float() @ parts["lokr_w2_b"].float()
    rank = parts["lokr_w1_b"].shape[0] if "lokr_w1_b" in parts else (
        parts["lokr_w2_b"].shape[0] if "lokr_w2_b" in parts else None)
    alpha = _alpha(parts)
    scale = 1.0 if alpha is None or rank is None else alpha / rank
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return Dense(torch.kron(w1, w2) * scale)


def _full(parts, name, key) -> Dense:
    bias = parts.get("diff_b")
    return Dense(parts["diff"].float(), None if bias is None else bias.float())


# (keys that identify the type, parser)
_TYPES = (
    ({"lora_down.weight", "lora_up.weight"}, _lowrank),
    ({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}, _loha),
    ({"lokr_w1"}, _lokr), ({"lokr_w1_a"}, _lokr),
    ({"diff"}, _full),
)


def parse_network(state: dict[str, torch.Tensor], name: str) -> Network:
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for full_key, tensor in state.items():
        layer_key, _, part = full_key.partition(".")
        layers.setdefault(layer_key, {})[part] = tensor
    network = Network(name)
    for layer_key, parts in layers.items():
        if layer_key.startswith("lora_te"):
            network.text_encoder_keys += 1
            continue
        if not layer_key.startswith("lora_unet_"):
            network.skipped[layer_key] = "not a UNet or text-encoder key"
            continue
        for required, parse in _TYPES:
            if required <= parts.keys():
                network.unet[layer_key] = parse(parts, name, layer_key)
                break
        else:
            network.skipped[layer_key] = f"unknown network type (parts: {sorted(parts)})"
    if not network.unet and not network.text_encoder_keys:
        raise PlanError(f"lora '{name}'", "holds no LoRA layers in kohya format")
    return network
