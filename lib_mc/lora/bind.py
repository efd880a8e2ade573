"""Bind a concept's LoRA set to UNet layers: one delta op per layer, applied to that concept's rows.

No weights are merged. Several low-rank LoRAs on the same layer are stacked into one wider
low-rank pair, so a concept costs two thin matmuls per layer whatever its LoRA count. A layer
whose type cannot be applied to rows (GLoRA on a conv, a norm change on a linear layer, a type
nobody knows) is named in one warning per LoRA, never dropped without a word.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ..errors import LoraMismatchError
from .deltas import Decomposed, Dense, Glora, Ia3, LowRank, Norm, Oft, type_name
from .names import is_linear, is_norm, layer_modules, resolve
from .network import Network
from .ops import (ConvLowRank, DenseDelta, DoraOp, GloraOp, Ia3Op, Layer, LinearLowRank, NormOp, OftOp,
                  RowOp)

@dataclass
class LoraUse:
    network: Network
    weight: float


class NotApplicable(Exception):
    """This layer's type cannot be applied to one concept's rows (the message says why)."""


def _mismatch(use: LoraUse, module_name: str, detail: str) -> LoraMismatchError:
    return LoraMismatchError(
        f"lora '{use.network.name}'",
        f"does not fit layer {module_name} ({detail}); was it made for another model type "
        f"(SDXL vs SD1.5)?")


def _lowrank(use, name, module, delta: LowRank, strength: float) -> RowOp:
    weight = module.weight
    out_features, in_features = weight.shape[0], weight.shape[1]
    up = delta.up.reshape(delta.up.shape[0], delta.rank) * (delta.scale * strength)
    if up.shape[0] != out_features or delta.down.shape[1] != in_features:
        raise _mismatch(use, name, f"weight {tuple(weight.shape)}, LoRA down {tuple(delta.down.shape)} "
                                   f"up {tuple(delta.up.shape)}")
    if is_linear(module):
        if delta.down.dim() == 4 and delta.down.shape[2:] != (1, 1) or delta.mid is not None:
            raise _mismatch(use, name, "conv LoRA on a linear layer")
        return LinearLowRank(delta.down.reshape(delta.rank, in_features), up)
    down = delta.down if delta.down.dim() == 4 else delta.down[:, :, None, None]
    if delta.mid is None and down.shape[2:] != weight.shape[2:]:
        raise _mismatch(use, name, f"kernel {tuple(weight.shape[2:])}, LoRA down kernel {tuple(down.shape[2:])}")
    return ConvLowRank(module, down, delta.mid, up[:, :, None, None])


def _rotation(use, name, delta: Oft, out_channels: int) -> torch.Tensor:
    """The orthogonal blocks, as A1111 network_oft.py builds them (Cayley transform of the
    skew-symmetric part, its norm clamped to alpha * out channels)."""
    blocks = delta.blocks
    if delta.butterfly:
        steps, count, size = blocks.shape[0], blocks.shape[1], blocks.shape[2]
        fits = count * size == out_channels and size % 2 == 0 and \
            all(out_channels % (2 ** (i + 1) * (size // 2)) == 0 for i in range(steps))
    else:
        count, size = blocks.shape[0], blocks.shape[1]
        fits = count * size == out_channels and blocks.shape[2] == size
    if not fits:
        raise _mismatch(use, name, f"{out_channels} output channels, {type_name(delta)} blocks {tuple(blocks.shape)}")
    if delta.rescale is not None and delta.rescale.numel() != out_channels:
        raise _mismatch(use, name, f"{out_channels} output channels, OFT rescale {tuple(delta.rescale.shape)}")
    if delta.stored_rotation:
        return blocks
    eye = torch.eye(size)
    q = blocks - blocks.transpose(-1, -2)
    constraint = (delta.alpha or 0.0) * out_channels
    if constraint != 0:
        norm = torch.norm(q.flatten())
        q = q * ((torch.clamp(norm, max=constraint) + 1e-8) / (norm + 1e-8))
    return torch.matmul(eye + q, (eye - q).inverse())


def _dora(use, name, module, delta: Decomposed, strength: float) -> RowOp:
    if isinstance(delta.delta, (Norm, Decomposed)):
        raise NotApplicable(f"DoRA on a {type_name(delta.delta)} layer")
    bias = None
    inner = delta.delta
    if isinstance(inner, Dense) and inner.bias is not None:   # A1111: the bias change is not rescaled
        bias, inner = inner.bias, Dense(inner.weight, None, inner.kind)
    parts = [_op(use, name, module, inner, 1.0)]
    weight, magnitude = module.weight, delta.magnitude
    in_channels, out_channels = weight.shape[1], weight.shape[0]
    if magnitude.numel() == in_channels and (magnitude.dim() == 1 or magnitude.shape[0] == 1):
        per_output = False   # A1111's apply_weight_decompose: one magnitude per input channel
    elif magnitude.numel() == out_channels and magnitude.shape[0] == out_channels:
        per_output = True    # LyCORIS wd_on_out
    else:
        raise _mismatch(use, name, f"weight {tuple(weight.shape)}, dora_scale {tuple(magnitude.shape)}")
    return DoraOp(Layer(module), parts, magnitude, per_output, strength, bias)


def _op(use: LoraUse, name: str, module: nn.Module, delta, strength: float) -> RowOp:
    if is_norm(module) != isinstance(delta, Norm):
        raise NotApplicable(f"{type_name(delta)} on a {type(module).__name__} layer")
    if isinstance(delta, Norm):
        size = module.num_channels if isinstance(module, nn.GroupNorm) else \
            int(torch.tensor(module.normalized_shape).prod())
        if delta.weight.numel() != size or delta.bias is not None and delta.bias.numel() != size:
            raise _mismatch(use, name, f"{size} channels, w_norm {tuple(delta.weight.shape)}")
        bias = None if delta.bias is None else delta.bias.reshape(-1) * strength
        return NormOp(module, delta.weight.reshape(-1) * strength, bias)
    if isinstance(delta, (Decomposed, Oft, Ia3, Glora)) and not module.weight.dtype.is_floating_point:
        # these read the layer's own weight; a quantized one (Forge's NF4/GGUF) is not a matrix to use
        raise NotApplicable(f"{type_name(delta)} needs the layer's weight, stored as {module.weight.dtype}")
    if isinstance(delta, Decomposed):
        return _dora(use, name, module, delta, strength)
    if isinstance(delta, LowRank):
        return _lowrank(use, name, module, delta, strength)
    weight = module.weight
    if isinstance(delta, Dense):
        if delta.weight.numel() != weight.numel():
            raise _mismatch(use, name, f"weight {tuple(weight.shape)}, file {tuple(delta.weight.shape)}")
        bias = None if delta.bias is None else (delta.bias * strength).reshape(-1)
        return DenseDelta(module, (delta.weight * strength).reshape(weight.shape), bias)
    if isinstance(delta, Oft):
        return OftOp(Layer(module), _rotation(use, name, delta, weight.shape[0]), delta.butterfly,
                     delta.rescale, strength)
    if isinstance(delta, Ia3):
        channels = weight.shape[1] if delta.on_input else weight.shape[0]
        if delta.weight.numel() != channels:
            raise _mismatch(use, name, f"weight {tuple(weight.shape)}, IA3 {tuple(delta.weight.shape)}")
        return Ia3Op(Layer(module), delta.weight * strength, delta.on_input)
    assert isinstance(delta, Glora)
    if not is_linear(module):
        raise NotApplicable("GLoRA on a conv layer (A1111 cannot apply it either)")
    out_features, in_features = weight.shape
    r = delta.a1.shape[0]
    if (delta.a1.shape != (r, in_features) or delta.a2.shape != (in_features, r)
            or delta.b1.shape[1] != in_features or delta.b2.shape != (out_features, delta.b1.shape[0])):
        raise _mismatch(use, name, f"weight {tuple(weight.shape)}, GLoRA a1 {tuple(delta.a1.shape)} "
                                   f"b2 {tuple(delta.b2.shape)}")
    return GloraOp(Layer(module), delta.a1 * strength, delta.a2, delta.b1, delta.b2 * strength)


def _listed(items: list[str], limit: int = 6) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def bind_loras(unet: nn.Module, uses: Sequence[LoraUse], warn=print) -> dict[nn.Module, list]:
    """Delta ops per UNet module for one concept's LoRA set. Raises LoraMismatchError."""
    table = layer_modules(unet)
    ops: dict[nn.Module, list] = {}
    for use in uses:
        network = use.network
        unmatched, not_applied = [], []
        for key, delta in network.unet.items():
            found = resolve(key, table)
            if found is None:
                unmatched.append(key)
                continue
            name, module = found
            try:
                op = _op(use, name, module, delta, use.weight)
            except NotApplicable as exc:
                not_applied.append(f"{name} ({exc})")
                continue
            ops.setdefault(module, []).append(op)
        if network.unet and len(unmatched) == len(network.unet):
            raise LoraMismatchError(
                f"lora '{network.name}'",
                f"none of its {len(unmatched)} UNet layers exist in this model (e.g. {unmatched[0]}); "
                f"was it made for another model type (SDXL vs SD1.5)?")
        prefix = f"[Multi-Concept] LoRA '{network.name}'"
        if unmatched:
            warn(f"{prefix}: {len(unmatched)} of {len(network.unet)} "
                 f"UNet layers not found in this model and skipped (e.g. {unmatched[0]})")
        skipped = not_applied + [f"{key} ({why})" for key, why in network.skipped.items()]
        if skipped:
            warn(f"{prefix}: {len(skipped)} UNet layers not applied: {_listed(skipped)}")
        if network.ignored_parts:
            parts = [f"{key}: {', '.join(p)}" for key, p in network.ignored_parts.items()]
            warn(f"{prefix}: parts of unknown meaning not applied ({_listed(parts)})")
    return {module: _stack(module_ops) for module, module_ops in ops.items()}


def _stack(module_ops: list) -> list:
    """Merge stackable low-rank ops of one layer into one."""
    merged: list = []
    for op in module_ops:
        if merged and type(op) is type(merged[-1]) and hasattr(op, "stack"):
            stacked = merged[-1].stack(op)
            if stacked is not None:
                merged[-1] = stacked
                continue
        merged.append(op)
    return merged
