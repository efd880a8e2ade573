"""Bind a concept's LoRA set to UNet layers: one delta op per layer, applied to that concept's rows.

No weights are merged. Several low-rank LoRAs on the same layer are stacked into one wider
low-rank pair, so a concept costs two thin matmuls per layer whatever its LoRA count.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LoraMismatchError
from .names import is_linear, layer_modules, resolve
from .network import Dense, LowRank, Network


@dataclass
class LoraUse:
    network: Network
    weight: float


class LinearLowRank:
    def __init__(self, down: torch.Tensor, up: torch.Tensor):
        self.down, self.up = down, up          # (R, in), (out, R); weight and scale are in up

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.down), self.up)

    def to(self, device, dtype) -> "LinearLowRank":
        return LinearLowRank(self.down.to(device=device, dtype=dtype), self.up.to(device=device, dtype=dtype))

    def stack(self, other: "LinearLowRank") -> "LinearLowRank":
        return LinearLowRank(torch.cat([self.down, other.down]), torch.cat([self.up, other.up], dim=1))


class ConvLowRank:
    def __init__(self, module: nn.Conv2d, down, mid, up):
        self.down, self.mid, self.up = down, mid, up
        self.stride, self.padding, self.dilation = module.stride, module.padding, module.dilation

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.mid is None:
            h = F.conv2d(x, self.down, None, self.stride, self.padding, self.dilation)
        else:
            h = F.conv2d(x, self.down)
            h = F.conv2d(h, self.mid, None, self.stride, self.padding, self.dilation)
        return F.conv2d(h, self.up)

    def to(self, device, dtype) -> "ConvLowRank":
        move = dict(device=device, dtype=dtype)
        return ConvLowRank(_ConvGeometry(self), self.down.to(**move),
                           None if self.mid is None else self.mid.to(**move), self.up.to(**move))

    def stack(self, other: "ConvLowRank") -> "ConvLowRank | None":
        if self.mid is not None or other.mid is not None or self.down.shape[2:] != other.down.shape[2:]:
            return None
        return ConvLowRank(_ConvGeometry(self), torch.cat([self.down, other.down]), None,
                           torch.cat([self.up, other.up], dim=1))


class _ConvGeometry:
    def __init__(self, op: ConvLowRank):
        self.stride, self.padding, self.dilation = op.stride, op.padding, op.dilation


class DenseDelta:
    def __init__(self, module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None):
        self.weight, self.bias = weight, bias
        self.conv = isinstance(module, nn.Conv2d)
        if self.conv:
            self.stride, self.padding, self.dilation, self.groups = (
                module.stride, module.padding, module.dilation, module.groups)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv:
            return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return F.linear(x, self.weight, self.bias)

    def to(self, device, dtype) -> "DenseDelta":
        moved = copy.copy(self)
        moved.weight = self.weight.to(device=device, dtype=dtype)
        moved.bias = None if self.bias is None else self.bias.to(device=device, dtype=dtype)
        return moved


def _mismatch(use: LoraUse, module_name: str, detail: str) -> LoraMismatchError:
    return LoraMismatchError(
        f"lora '{use.network.name}'",
        f"does not fit layer {module_name} ({detail}); was it made for another model type "
        f"(SDXL vs SD1.5)?")


def _make_op(use: LoraUse, name: str, module: nn.Module, delta):
    weight = module.weight
    cast = dict(device=weight.device, dtype=weight.dtype)
    if isinstance(delta, Dense):
        if delta.weight.numel() != weight.numel():
            raise _mismatch(use, name, f"weight {tuple(weight.shape)}, file {tuple(delta.weight.shape)}")
        bias = None if delta.bias is None else (delta.bias * use.weight).reshape(-1).to(**cast)
        return DenseDelta(module, (delta.weight * use.weight).reshape(weight.shape).to(**cast), bias)
    assert isinstance(delta, LowRank)
    out_features, in_features = weight.shape[0], weight.shape[1]
    up = delta.up.reshape(delta.up.shape[0], delta.rank) * (delta.scale * use.weight)
    if up.shape[0] != out_features or delta.down.shape[1] != in_features:
        raise _mismatch(use, name, f"weight {tuple(weight.shape)}, LoRA down {tuple(delta.down.shape)} "
                                   f"up {tuple(delta.up.shape)}")
    if is_linear(module):
        if delta.down.dim() == 4 and delta.down.shape[2:] != (1, 1) or delta.mid is not None:
            raise _mismatch(use, name, "conv LoRA on a linear layer")
        return LinearLowRank(delta.down.reshape(delta.rank, in_features).to(**cast), up.to(**cast))
    down = delta.down if delta.down.dim() == 4 else delta.down[:, :, None, None]
    if delta.mid is None and down.shape[2:] != weight.shape[2:]:
        raise _mismatch(use, name, f"kernel {tuple(weight.shape[2:])}, LoRA down kernel {tuple(down.shape[2:])}")
    mid = None if delta.mid is None else delta.mid.to(**cast)
    return ConvLowRank(module, down.to(**cast), mid, up[:, :, None, None].to(**cast))


def bind_loras(unet: nn.Module, uses: Sequence[LoraUse], warn=print) -> dict[nn.Module, list]:
    """Delta ops per UNet module for one concept's LoRA set. Raises LoraMismatchError."""
    table = layer_modules(unet)
    ops: dict[nn.Module, list] = {}
    names: dict[nn.Module, str] = {}
    for use in uses:
        unmatched = []
        for key, delta in use.network.unet.items():
            found = resolve(key, table)
            if found is None:
                unmatched.append(key)
                continue
            name, module = found
            names[module] = name
            op = _make_op(use, name, module, delta)
            ops.setdefault(module, []).append(op)
        if use.network.unet and len(unmatched) == len(use.network.unet):
            raise LoraMismatchError(
                f"lora '{use.network.name}'",
                f"none of its {len(unmatched)} UNet layers exist in this model (e.g. {unmatched[0]}); "
                f"was it made for another model type (SDXL vs SD1.5)?")
        if unmatched:
            warn(f"[Multi-Concept] LoRA '{use.network.name}': {len(unmatched)} of {len(use.network.unet)} "
                 f"UNet layers not found in this model and skipped (e.g. {unmatched[0]})")
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
