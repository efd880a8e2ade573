"""The parts of one kohya/LyCORIS layer -> its delta, read as A1111's network_*.py read them.

Which type a layer is, its scale (`scale`, else alpha / dim, else 1) and how factors combine
follow A1111 v1.10 (extensions-builtin/Lora), so a region looks like the whole image would with
the same file loaded by the WebUI.
"""

from __future__ import annotations

import torch

from ..errors import PlanError
from .deltas import Dense, Glora, Ia3, LowRank, Norm, Oft

# parts every type may carry: read by the caller (scale, DoRA), never reported as ignored
COMMON_PARTS = {"alpha", "scale", "dora_scale"}


def _scale(parts: dict, dim: int | None) -> float:
    if "scale" in parts:
        return float(parts["scale"])
    if dim is not None and "alpha" in parts:
        return float(parts["alpha"]) / dim
    return 1.0


def _f(parts: dict, key: str) -> torch.Tensor:
    return parts[key].float()


def tucker(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """LyCORIS CP/Tucker rebuild (A1111 lyco_helpers.make_weight_cp): t (r1, r2, kh, kw),
    wa (r1, out), wb (r2, in) -> (out, in, kh, kw)."""
    temp = torch.einsum("i j k l, j r -> i r k l", t, wb)
    return torch.einsum("i j k l, i r -> r j k l", temp, wa)


def lowrank(parts, name, key) -> LowRank:
    if "lora_A.weight" in parts:   # PEFT/diffusers names, as A1111 renames them
        down, up = _f(parts, "lora_A.weight"), _f(parts, "lora_B.weight")
    else:
        down, up = _f(parts, "lora_down.weight"), _f(parts, "lora_up.weight")
    mid = parts.get("lora_mid.weight")
    if down.shape[0] != up.shape[1]:
        raise PlanError(f"lora '{name}'", f"{key}: rank of down {tuple(down.shape)} and up {tuple(up.shape)} differ")
    return LowRank(down, up, None if mid is None else mid.float(), _scale(parts, down.shape[0]))


def loha(parts, name, key) -> Dense:
    w1a, w1b, w2a, w2b = (_f(parts, k) for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
    if "hada_t1" in parts:   # Tucker: w*_a is (r, out), w*_b is (r, in)
        w1 = tucker(_f(parts, "hada_t1"), w1a, w1b)
    else:
        w1 = w1a.flatten(1) @ w1b.flatten(1)
    if "hada_t2" in parts:
        w2 = tucker(_f(parts, "hada_t2"), w2a, w2b)
    else:
        w2 = (w2a.flatten(1) @ w2b.flatten(1)).reshape(w1.shape)
    return Dense(w1 * w2 * _scale(parts, w1b.shape[0]), kind="LoHa")


def lokr(parts, name, key) -> Dense:
    w1 = _f(parts, "lokr_w1") if "lokr_w1" in parts else _f(parts, "lokr_w1_a") @ _f(parts, "lokr_w1_b")
    if "lokr_w2" in parts:
        w2 = _f(parts, "lokr_w2")
    elif "lokr_t2" in parts:
        w2 = tucker(_f(parts, "lokr_t2"), _f(parts, "lokr_w2_a"), _f(parts, "lokr_w2_b"))
    else:
        w2 = _f(parts, "lokr_w2_a") @ _f(parts, "lokr_w2_b")
    dim = None   # A1111: w2_b's rank wins over w1_b's; without either, alpha is not used
    for factor in ("lokr_w1_b", "lokr_w2_b"):
        if factor in parts:
            dim = parts[factor].shape[0]
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return Dense(torch.kron(w1, w2.contiguous()) * _scale(parts, dim), kind="LoKr")


def full(parts, name, key) -> Dense:
    bias = parts.get("diff_b")
    return Dense(_f(parts, "diff") * _scale(parts, None), None if bias is None else bias.float())


def oft(parts, name, key) -> Oft:
    rescale = parts.get("rescale")
    rescale = None if rescale is None else rescale.float().reshape(-1)
    if "oft_blocks" in parts:   # kohya, and LyCORIS OFT/BOFT since 2.x: Cayley transform at bind time
        alpha = parts.get("alpha")
        return Oft(_f(parts, "oft_blocks"), None if alpha is None else float(alpha), False, rescale)
    blocks = _f(parts, "oft_diag")
    if blocks.dim() != 3:
        raise NotImplementedError("old LyCORIS BOFT (4-D oft_diag), which A1111 cannot apply either")
    return Oft(blocks, None, True, rescale)


def ia3(parts, name, key) -> Ia3:
    on_input = parts.get("on_input")
    weight = _f(parts, "weight").reshape(-1) * _scale(parts, None)
    return Ia3(weight, bool(on_input is not None and on_input.item()))


def glora(parts, name, key) -> Glora:
    scale = _scale(parts, None)   # A1111 sets no dim for GLoRA: alpha does not scale it
    return Glora(_f(parts, "a1.weight") * scale, _f(parts, "a2.weight"),
                 _f(parts, "b1.weight"), _f(parts, "b2.weight") * scale)


def norm(parts, name, key) -> Norm:
    bias = parts.get("b_norm")   # A1111 scales the weight change, not the bias change
    return Norm(_f(parts, "w_norm") * _scale(parts, None), None if bias is None else bias.float())


# (parts that identify the type, parts it reads, parser): A1111's module_types order
TYPES = (
    ({"lora_up.weight", "lora_down.weight"}, {"lora_up.weight", "lora_down.weight", "lora_mid.weight"}, lowrank),
    ({"lora_A.weight", "lora_B.weight"}, {"lora_A.weight", "lora_B.weight"}, lowrank),
    ({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"},
     {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"}, loha),
    ({"weight"}, {"weight", "on_input"}, ia3),
    ({"lokr_w1", "lokr_w2"}, {"lokr_w1", "lokr_w2"}, lokr),
    ({"lokr_w1", "lokr_w2_a", "lokr_w2_b"}, {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}, lokr),
    ({"lokr_w1_a", "lokr_w1_b", "lokr_w2"}, {"lokr_w1_a", "lokr_w1_b", "lokr_w2"}, lokr),
    ({"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"},
     {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}, lokr),
    ({"diff"}, {"diff", "diff_b"}, full),
    ({"w_norm", "b_norm"}, {"w_norm", "b_norm"}, norm),
    ({"a1.weight", "a2.weight", "alpha", "b1.weight", "b2.weight"},
     {"a1.weight", "a2.weight", "b1.weight", "b2.weight"}, glora),
    ({"oft_blocks"}, {"oft_blocks", "rescale"}, oft),
    ({"oft_diag"}, {"oft_diag", "rescale"}, oft),
)
