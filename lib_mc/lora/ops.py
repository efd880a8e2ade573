"""Per-row delta operations: `op(x)` is how much one LoRA layer changes the layer's output for
the rows x, without touching the layer's weights.

Each op is made in fp32 on the CPU and placed on the device and compute dtype of the input at
its first call (`op.to(device, dtype)`, kept for the session: the dense and DoRA parts are made
once per layer and concept). Ops that need the layer's own weight (OFT, IA3, GLoRA, DoRA) read
it at call time and cast it to the compute dtype: a float8-stored weight is never the dtype of
a delta. DoRA and OFT are applied factored, (W' - W) x = W (s - 1) x + U s x and (R - I) W x,
so neither needs a dense copy of the layer per concept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RowOp:
    """Base: `to()` results are cached per (device, dtype) for as long as the op lives."""

    dtype = torch.float32

    def to(self, device, dtype) -> "RowOp":
        placed = self.__dict__.setdefault("_placed", {})
        key = (torch.device(device), dtype or self.dtype, torch.is_inference_mode_enabled())
        if key not in placed:
            placed[key] = self._place(*key[:2])
        return placed[key]

    def _place(self, device, dtype) -> "RowOp":
        raise NotImplementedError

    def dense(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight change U (weight-shaped), given the layer's weight: for DoRA's norms."""
        raise NotImplementedError


def _move(t, device, dtype):
    if t is None:
        return None
    moved = t.to(device=device, dtype=dtype)
    # a LoRA loaded inside Forge's inference mode holds inference tensors, which a gradient
    # pass (outside inference mode) may not save for its backward: a normal copy for it
    return moved.clone() if moved.is_inference() and not torch.is_inference_mode_enabled() else moved


class Layer:
    """The host layer's own linear map without bias, with the weight it holds at call time."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.conv = isinstance(module, nn.Conv2d)
        self.channel_dim = 1 if self.conv else -1

    def weight(self, device, dtype) -> torch.Tensor:
        return self.module.weight.to(device=device, dtype=dtype)

    def __call__(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        w = self.weight(x.device, x.dtype) if weight is None else weight
        if self.conv:
            m = self.module
            return F.conv2d(x, w, None, m.stride, m.padding, m.dilation, m.groups)
        return F.linear(x, w)

    def per_channel(self, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """v (channels,) shaped to multiply x along its channel dim."""
        return v.reshape(-1, *([1] * (x.dim() - 2))) if self.conv else v


class LinearLowRank(RowOp):
    def __init__(self, down: torch.Tensor, up: torch.Tensor):
        self.down, self.up = down, up          # (R, in), (out, R); strength and scale are in up
        self.dtype = up.dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.down), self.up)

    def _place(self, device, dtype):
        return LinearLowRank(_move(self.down, device, dtype), _move(self.up, device, dtype))

    def stack(self, other: "LinearLowRank") -> "LinearLowRank":
        return LinearLowRank(torch.cat([self.down, other.down]), torch.cat([self.up, other.up], dim=1))

    def dense(self, weight):
        return self.up @ self.down


class ConvLowRank(RowOp):
    def __init__(self, module: nn.Module, down, mid, up):
        self.down, self.mid, self.up = down, mid, up
        self.stride, self.padding, self.dilation = module.stride, module.padding, module.dilation
        self.dtype = up.dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.mid is None:
            h = F.conv2d(x, self.down, None, self.stride, self.padding, self.dilation)
        else:
            h = F.conv2d(x, self.down)
            h = F.conv2d(h, self.mid, None, self.stride, self.padding, self.dilation)
        return F.conv2d(h, self.up)

    def _place(self, device, dtype):
        return ConvLowRank(self, _move(self.down, device, dtype), _move(self.mid, device, dtype),
                           _move(self.up, device, dtype))

    def stack(self, other: "ConvLowRank") -> "ConvLowRank | None":
        if self.mid is not None or other.mid is not None or self.down.shape[2:] != other.down.shape[2:]:
            return None
        return ConvLowRank(self, torch.cat([self.down, other.down]), None, torch.cat([self.up, other.up], dim=1))

    def dense(self, weight):
        up, down = self.up.flatten(1), self.down.flatten(1)
        if self.mid is None:
            return (up @ down).reshape(weight.shape)
        return torch.einsum("n m k l, i n, m j -> i j k l", self.mid, up, down)


class DenseDelta(RowOp):
    def __init__(self, module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None):
        self.module, self.weight, self.bias = module, weight, bias
        self.conv = isinstance(module, nn.Conv2d)
        self.dtype = weight.dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv:
            m = self.module
            return F.conv2d(x, self.weight, self.bias, m.stride, m.padding, m.dilation, m.groups)
        return F.linear(x, self.weight, self.bias)

    def _place(self, device, dtype):
        return DenseDelta(self.module, _move(self.weight, device, dtype), _move(self.bias, device, dtype))

    def dense(self, weight):
        return self.weight


def _rotate(t: torch.Tensor, rotation: torch.Tensor, butterfly: bool) -> torch.Tensor:
    """A1111 network_oft.py's transform of a weight's output dim, applied to any tensor whose
    first dim is the layer's output channels (weights, or activations moved channel-first)."""
    channels, rest = t.shape[0], t.shape[1:]
    if not butterfly:
        blocks, n = rotation.shape[0], rotation.shape[1]
        out = torch.einsum("k n m, k n ... -> k m ...", rotation, t.reshape(blocks, n, *rest))
        return out.reshape(channels, *rest)
    m_steps, block_size = rotation.shape[0], rotation.shape[2]
    half = block_size // 2
    for i in range(m_steps):
        k = 2 ** i * half
        t = t.reshape(-1, 2, k, *rest).transpose(1, 2).reshape(channels, *rest)      # (c g k) -> (c k g)
        t = torch.einsum("b i j, b j ... -> b i ...", rotation[i], t.reshape(-1, block_size, *rest))
        t = t.reshape(-1, k, 2, *rest).transpose(1, 2).reshape(channels, *rest)      # (c k g) -> (c g k)
    return t


class OftOp(RowOp):
    """(T(W) - W) x = T(W x) - W x: T acts on output channels only, so it is applied to W x."""

    def __init__(self, layer: Layer, rotation, butterfly: bool, rescale, multiplier: float, dtype=torch.float32):
        self.layer, self.rotation, self.butterfly, self.rescale = layer, rotation, butterfly, rescale
        self.multiplier, self.dtype = multiplier, dtype

    def _transform(self, t: torch.Tensor) -> torch.Tensor:
        out = _rotate(t, self.rotation, self.butterfly)
        if self.rescale is not None:
            out = self.rescale.reshape(-1, *([1] * (t.dim() - 1))) * out
        return out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layer(x.to(self.dtype), self.layer.weight(x.device, self.dtype))
        first = h.movedim(self.layer.channel_dim, 0)
        return ((self._transform(first) - first) * self.multiplier).movedim(0, self.layer.channel_dim)

    def _place(self, device, dtype):
        return OftOp(self.layer, _move(self.rotation, device, dtype), self.butterfly,
                     _move(self.rescale, device, dtype), self.multiplier, dtype)

    def dense(self, weight):
        return (self._transform(weight) - weight) * self.multiplier


class Ia3Op(RowOp):
    """IA3 scales the weight's input or output channels: W * w, applied to x or to W x."""

    def __init__(self, layer: Layer, weight, on_input: bool, dtype=torch.float32):
        self.layer, self.w, self.on_input, self.dtype = layer, weight, on_input, dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype)
        w = self.layer.per_channel(self.w, x)
        weight = self.layer.weight(x.device, self.dtype)
        return self.layer(x * w, weight) if self.on_input else w * self.layer(x, weight)

    def _place(self, device, dtype):
        return Ia3Op(self.layer, _move(self.w, device, dtype), self.on_input, dtype)

    def dense(self, weight):
        shape = [1] * weight.dim()
        shape[1 if self.on_input else 0] = -1
        return weight * self.w.reshape(shape)


class GloraOp(RowOp):
    """GLoRA on a linear layer: U x = b2 b1 x + W a2 a1 x (strength folded into b2 and a1)."""

    def __init__(self, layer: Layer, a1, a2, b1, b2, dtype=torch.float32):
        self.layer, self.a1, self.a2, self.b1, self.b2, self.dtype = layer, a1, a2, b1, b2, dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype)
        through_weight = self.layer(F.linear(F.linear(x, self.a1), self.a2), self.layer.weight(x.device, self.dtype))
        return F.linear(F.linear(x, self.b1), self.b2) + through_weight

    def _place(self, device, dtype):
        return GloraOp(self.layer, *(_move(t, device, dtype) for t in (self.a1, self.a2, self.b1, self.b2)), dtype)

    def dense(self, weight):
        return self.b2 @ self.b1 + weight @ self.a2 @ self.a1


class NormOp(RowOp):
    """norm(x) * dw + db: what a GroupNorm/LayerNorm's weight and bias changes add (in fp32,
    as ldm's GroupNorm32 computes)."""

    def __init__(self, module: nn.Module, weight, bias, dtype=torch.float32):
        self.module, self.weight, self.bias, self.dtype = module, weight, bias, dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m, weight, bias = self.module, self.weight.float(), _move(self.bias, x.device, torch.float32)
        if isinstance(m, nn.GroupNorm):
            out = F.group_norm(x.float(), m.num_groups, weight, bias, m.eps)
        else:
            out = F.layer_norm(x.float(), m.normalized_shape, weight, bias, m.eps)
        return out.to(x.dtype)

    def _place(self, device, dtype):
        return NormOp(self.module, _move(self.weight, device, dtype), _move(self.bias, device, dtype), dtype)


class DoraOp(RowOp):
    """DoRA: W' = (W + U) * s with s = magnitude / ||W + U|| (norm per input channel as A1111's
    apply_weight_decompose takes it, or per output channel for LyCORIS `wd_on_out` files), and
    the strength scales W' - W. Applied factored: W (s - 1) x + U s x, or (s - 1) W x + s U x.
    s is computed once per device from the layer's weight at the first call."""

    def __init__(self, layer: Layer, parts: list, magnitude, per_output: bool, multiplier: float,
                 bias=None, scale=None, dtype=torch.float32):
        self.layer, self.parts, self.magnitude, self.per_output = layer, parts, magnitude, per_output
        self.multiplier, self.bias, self.scale, self.dtype = multiplier, bias, scale, dtype   # bias: not rescaled

    def _scale(self, device) -> torch.Tensor:
        weight = self.layer.weight(device, torch.float32)
        # fp32 parts only for this (not kept: the compute-dtype ones are what runs)
        merged = weight + sum(p._place(device, torch.float32).dense(weight) for p in self.parts).reshape(weight.shape)
        if self.per_output:
            norm = merged.reshape(merged.shape[0], -1).norm(dim=1)
        else:
            norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1)
        return self.magnitude.to(device).reshape(-1) / norm

    def _place(self, device, dtype):
        scale = self.scale if self.scale is not None else self._scale(device)
        return DoraOp(self.layer, [p.to(device, dtype) for p in self.parts], None, self.per_output,
                      self.multiplier, _move(self.bias, device, dtype), scale.to(device=device, dtype=dtype), dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale is None:   # not placed yet (called directly): place for this input
            return self.to(x.device, x.dtype)(x)
        x = x.to(self.dtype)
        s = self.layer.per_channel(self.scale, x)
        if self.per_output:
            inner = sum(p(x) for p in self.parts)
            out = (s - 1) * self.layer(x) + s * inner
        else:
            scaled = x * s
            out = self.layer(x * (s - 1)) + sum(p(scaled) for p in self.parts)
        if self.bias is not None:
            out = out + self.layer.per_channel(self.bias, out)
        return out * self.multiplier
