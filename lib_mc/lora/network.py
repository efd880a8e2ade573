"""LoRA files in kohya/LyCORIS format, parsed into per-layer deltas the engine applies to batch rows.

Every type A1111's Lora extension loads is read (see `formats.py`): LoRA and LoCon (incl. a
Tucker `lora_mid`) stay low-rank, LoHa, LoKr and full `diff` become a dense delta, OFT/BOFT,
IA3, GLoRA and norm layers keep their factors, and a `dora_scale` wraps any of them as DoRA.
A layer of a type nobody knows is kept in `skipped` with its parts, for the warnings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from ..errors import PlanError
from .deltas import Decomposed, Dense, LayerDelta, LowRank
from .formats import COMMON_PARTS, TYPES

__all__ = ["Dense", "LowRank", "Network", "load_network", "parse_network"]

# kohya's OFT trainer writes `oft_unet_...`; the layer names after the prefix are the same
_UNET_PREFIXES = ("lora_unet_", "oft_unet_")


@dataclass
class Network:
    """One LoRA file: UNet layer deltas keyed by kohya layer key (`lora_unet_...`)."""
    name: str
    unet: dict[str, LayerDelta] = field(default_factory=dict)
    text_encoder_keys: int = 0
    skipped: dict[str, str] = field(default_factory=dict)        # UNet layer key -> why
    ignored_parts: dict[str, list[str]] = field(default_factory=dict)   # layer key -> parts not read


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


def _parse_layer(network: Network, layer_key: str, parts: dict[str, torch.Tensor]) -> None:
    for required, reads, parse in TYPES:
        if required <= parts.keys():
            break
    else:
        network.skipped[layer_key] = f"unknown network type (parts: {', '.join(sorted(parts))})"
        return
    try:
        delta = parse(parts, network.name, layer_key)
    except NotImplementedError as exc:
        network.skipped[layer_key] = str(exc)
        return
    if "dora_scale" in parts:
        delta = Decomposed(delta, parts["dora_scale"].float())
    network.unet[layer_key] = delta
    ignored = sorted(parts.keys() - reads - COMMON_PARTS)
    if ignored:
        network.ignored_parts[layer_key] = ignored


def parse_network(state: dict[str, torch.Tensor], name: str) -> Network:
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for full_key, tensor in state.items():
        layer_key, _, part = full_key.partition(".")
        layers.setdefault(layer_key, {})[part] = tensor
    network = Network(name)
    for layer_key, parts in layers.items():
        if layer_key.startswith("lora_te"):
            network.text_encoder_keys += 1
        elif layer_key.startswith(_UNET_PREFIXES):
            _parse_layer(network, "lora_unet_" + layer_key.split("_unet_", 1)[1], parts)
    if not network.unet and not network.text_encoder_keys:
        if network.skipped:
            key, why = next(iter(network.skipped.items()))
            raise PlanError(f"lora '{name}'", f"none of its {len(network.skipped)} UNet layers is of a type "
                                              f"Multi-Concept can apply (e.g. {key}: {why})")
        raise PlanError(f"lora '{name}'", "holds no LoRA layers in kohya format")
    return network
