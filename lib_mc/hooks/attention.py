"""The engine's attention, in two forms that share one core (`attend`):

- `make_attention_forward`: a forward for any module shaped like ldm's CrossAttention
  (to_q/k/v/out, heads), installed on module instances (A1111).
- `attend`, for hosts that hand over projected q, k, v (Forge's attention replace patches).

The host's own attention, with whatever other extensions chained onto it (IP-Adapter,
InstantID, ...), computes every row of every call; the engine only adjusts rows afterwards:
- cross-attention replay: the base cond rows take the layout row's output, copied after the
  chained attention (to_out is per row, so copying after it is the same as before it);
- self-attention replay (low-resolution layers, early steps): the base cond rows' output is
  recomputed as softmax(q_layout k_layout^T) v_base, the only rows the engine computes itself;
- refinement capture: the base cond rows' q and k of one decoder self-attention are projected
  again for their probabilities; the output stays the host's.
Concept contexts of other lengths are padded the way A1111 pads (the engine's `_cat_conds`),
so no key mask is needed.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from .state import CallState, RunState

HostAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def is_attention(module) -> bool:
    return all(hasattr(module, a) for a in ("to_q", "to_k", "to_v", "to_out", "heads"))


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, inner = t.shape
    return t.view(b, n, heads, inner // heads).transpose(1, 2)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Projected q (B, n, heads * d), k and v (B, m, heads * d) -> their attention (B, n, heads * d),
    before to_out, by torch's scaled_dot_product_attention."""
    b, n, inner = q.shape
    split = [t.reshape(t.shape[0], -1, heads, inner // heads).transpose(1, 2) for t in (q, k, v)]
    return torch.nn.functional.scaled_dot_product_attention(*split).transpose(1, 2).reshape(b, n, inner)


def _wants_capture(call: CallState, cross: bool, n_tokens: int, decoder: bool) -> bool:
    return not cross and decoder and call.capture_self_tokens == n_tokens and "self" not in call.captured


def _replays(call: CallState, cross: bool, n_tokens: int) -> bool:
    return call.replay_cross if cross else n_tokens <= call.replay_self_max_tokens


def _self_replay(q_layout: torch.Tensor, k_layout: torch.Tensor, v_base: torch.Tensor, heads: int) -> torch.Tensor:
    """The layout rows' self-attention probabilities applied to the base rows' values, before to_out."""
    qh, kh, vh = (_heads(t, heads) for t in (q_layout, k_layout, v_base))
    logits = qh.float() @ kh.float().transpose(-1, -2) * qh.shape[-1] ** -0.5
    out = logits.softmax(-1).to(vh.dtype) @ vh
    b, h, n, d = out.shape
    return out.transpose(1, 2).reshape(b, n, h * d)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, call: CallState, *,
           cross: bool, decoder: bool, host: HostAttention) -> torch.Tensor:
    """Projected q, k, v (B, n, heads * d) -> attention output (B, n, heads * d), before to_out:
    the host's (chained) attention, with the replayed rows put in."""
    n_tokens = q.shape[1]
    base = call.rows.find("base")
    if base is not None and _wants_capture(call, cross, n_tokens, decoder):
        _capture(q[base.cond_rows], k[base.cond_rows], heads, call)
    out = host(q, k, v)
    if _replays(call, cross, n_tokens):
        layout, base_cond = call.replay_pair
        out[base_cond] = out[layout] if cross else _self_replay(q[layout], k[layout], v[base_cond], heads)
    return out


def _given(value) -> bool:
    """A keyword argument with a non-default value (a tensor counts, whatever it holds)."""
    return value is not None and not (isinstance(value, (bool, int, float)) and not value)


def make_attention_forward(module, original, run: RunState):
    def forward(x, context=None, mask=None, **kwargs):
        out = original(x, context=context, mask=mask, **kwargs)
        call = run.call
        # sgm passes extra kwargs (additional_tokens, crossframe); any non-default one: host's result as is
        if call is None or mask is not None or any(_given(v) for v in kwargs.values()):
            return out
        cross = context is not None and context is not x
        n_tokens = x.shape[1]
        base = call.rows.find("base")
        if base is not None and _wants_capture(call, cross, n_tokens, module in run.decoder_self_attention):
            rows = x[base.cond_rows]
            with _no_call(run):
                q, k = module.to_q(rows), module.to_k(rows)
            _capture(q, k, module.heads, call)
        if _replays(call, cross, n_tokens):
            layout, base_cond = call.replay_pair
            if cross:
                out[base_cond] = out[layout]
            else:
                mine = x[layout]
                with _no_call(run):
                    replayed = module.to_out(_self_replay(module.to_q(mine), module.to_k(mine), module.to_v(x[base_cond]),
                                                          module.heads))
                out[base_cond] = replayed
        return out
    return forward


@contextlib.contextmanager
def _no_call(run: RunState):
    """Layers run on a few rows of the call (layout or base rows, which carry no LoRA): the
    per-row LoRA hooks, which slice by the whole call's rows, must pass through."""
    call, run.call = run.call, None
    try:
        yield
    finally:
        run.call = call


@torch.no_grad()
def _capture(q: torch.Tensor, k: torch.Tensor, heads: int, call: CallState) -> None:
    """The base cond rows' (q, k given for those rows only) self-attention probabilities,
    averaged over heads: (B, n, n)."""
    qh, kh = _heads(q, heads), _heads(k, heads)
    probs = (qh.float() @ kh.float().transpose(-1, -2) * qh.shape[-1] ** -0.5).softmax(-1)
    call.captured["self"] = probs.mean(1)
