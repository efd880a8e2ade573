"""What one LoRA layer changes, as parsed from a file (fp32, on the CPU, before any strength).

Each type keeps the few tensors its weight change needs; `ops.py` turns them into per-row
operations. Types that depend on the layer's own weight (OFT, IA3, GLoRA, DoRA) read it only
when they run, so nothing here holds a copy of the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LowRank:
    down: torch.Tensor          # (r, in) or (r, in, kh, kw)
    up: torch.Tensor            # (out, r) or (out, r, 1, 1)
    mid: torch.Tensor | None    # (r, r, kh, kw) for Tucker-decomposed convs
    scale: float                # alpha / rank (or the file's `scale`)

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclass
class Dense:
    weight: torch.Tensor        # delta, reshaped to the layer's weight shape at bind time
    bias: torch.Tensor | None = None
    kind: str = "full"          # what it came from (LoHa, LoKr, full): for messages


@dataclass
class Oft:
    """OFT/BOFT: the layer's output channels rotated block-wise (A1111 network_oft.py)."""
    blocks: torch.Tensor        # as stored: OFT (blocks, n, n), BOFT (m, blocks, b, b)
    alpha: float | None         # the norm constraint (times out channels); None or 0: none
    stored_rotation: bool       # old LyCORIS `oft_diag`: the blocks are the rotation itself
    rescale: torch.Tensor | None

    @property
    def butterfly(self) -> bool:
        return self.blocks.dim() == 4


@dataclass
class Ia3:
    weight: torch.Tensor        # (channels,): input channels if on_input, else output channels
    on_input: bool


@dataclass
class Glora:
    """W' = W + W @ a2 @ a1 + b2 @ b1 (A1111 network_glora.py); linear layers only."""
    a1: torch.Tensor            # (r, in)
    a2: torch.Tensor            # (in, r)
    b1: torch.Tensor            # (r, in)
    b2: torch.Tensor            # (out, r)


@dataclass
class Norm:
    """A GroupNorm/LayerNorm's weight and bias change (LyCORIS `w_norm`/`b_norm`)."""
    weight: torch.Tensor
    bias: torch.Tensor | None


@dataclass
class Decomposed:
    """DoRA: `delta` rescaled by the file's magnitudes (`dora_scale`)."""
    delta: "LayerDelta"
    magnitude: torch.Tensor


LayerDelta = LowRank | Dense | Oft | Ia3 | Glora | Norm | Decomposed


def type_name(delta: LayerDelta) -> str:
    if isinstance(delta, Decomposed):
        return f"DoRA {type_name(delta.delta)}"
    if isinstance(delta, Dense):
        return delta.kind
    if isinstance(delta, LowRank):
        return "LoRA" if delta.down.dim() == 2 else "LoCon"
    if isinstance(delta, Oft):
        return "BOFT" if delta.butterfly else "OFT"
    return {Ia3: "IA3", Glora: "GLoRA", Norm: "norm"}[type(delta)]
