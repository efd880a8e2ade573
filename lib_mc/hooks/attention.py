"""The engine's attention, in two forms that share one core (`attend`):

- `make_attention_forward`: a forward for any module shaped like ldm's CrossAttention
  (to_q/k/v/out, heads), installed on module instances (A1111). It falls through to the host's
  own forward unless this call needs something from it.
- `attend` itself, for hosts that hand over projected q, k, v (Forge's attention replace
  patches): `host(q, k, v)` is then the host's own attention for the pass-through.

What a call may need: a key mask (concept prompts of other lengths were zero-padded), layout
replay (base rows take the layout row's attention), or a capture of the base rows'
self-attention for mask refinement. Probabilities are formed only for the rows that need them.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .state import CallState, RunState

HostAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def is_attention(module) -> bool:
    return all(hasattr(module, a) for a in ("to_q", "to_k", "to_v", "to_out", "heads"))


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, inner = t.shape
    return t.view(b, n, heads, inner // heads).transpose(1, 2)


def _wants_capture(call: CallState, cross: bool, n_tokens: int, decoder: bool) -> bool:
    return not cross and decoder and call.capture_self_tokens == n_tokens and "self" not in call.captured


def _replays(call: CallState, cross: bool, n_tokens: int) -> bool:
    return call.replay_cross if cross else n_tokens <= call.replay_self_max_tokens


def needs_qkv(call: CallState, cross: bool, n_tokens: int, decoder: bool) -> bool:
    return (cross and call.key_mask is not None) or _replays(call, cross, n_tokens) or \
        _wants_capture(call, cross, n_tokens, decoder)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, call: CallState, *,
           cross: bool, decoder: bool, host: HostAttention | None = None) -> torch.Tensor:
    """Projected q, k, v (B, n, heads * d) -> attention output (B, n, heads * d), before to_out."""
    n_tokens = q.shape[1]
    if _wants_capture(call, cross, n_tokens, decoder):
        _capture(q, k, heads, call)
    key_mask = call.key_mask if cross else None
    replay = _replays(call, cross, n_tokens)
    if key_mask is None and not replay and host is not None:
        return host(q, k, v)
    qh, kh, vh = (_heads(t, heads) for t in (q, k, v))
    attn_mask = None if key_mask is None else key_mask[:, None, None, :].to(qh.device)
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=attn_mask)
    if replay:
        layout, base = call.replay_pair
        if cross:
            # Layout and base cond rows share the base prompt's context, so their V is equal
            # and (layout probs @ base V) is the layout row's output: no probabilities needed.
            out[base] = out[layout]
        else:
            scale = qh.shape[-1] ** -0.5
            logits = qh[layout].float() @ kh[layout].float().transpose(-1, -2) * scale
            out[base] = logits.softmax(-1).to(vh.dtype) @ vh[base]
    b, h, n, d = out.shape
    return out.transpose(1, 2).reshape(b, n, h * d)


def make_attention_forward(module, original, run: RunState):
    def forward(x, context=None, mask=None, **kwargs):
        call = run.call
        # sgm passes extra kwargs (additional_tokens, crossframe); any non-default one: host's path
        if call is None or mask is not None or any(v for v in kwargs.values()):
            return original(x, context=context, mask=mask, **kwargs)
        cross = context is not None
        decoder = module in run.decoder_self_attention
        if not needs_qkv(call, cross, x.shape[1], decoder):
            return original(x, context=context, mask=mask, **kwargs)
        source = context if cross else x
        q, k, v = module.to_q(x), module.to_k(source), module.to_v(source)
        return module.to_out(attend(q, k, v, module.heads, call, cross=cross, decoder=decoder))
    return forward


@torch.no_grad()
def _capture(q: torch.Tensor, k: torch.Tensor, heads: int, call: CallState) -> None:
    """The base cond rows' self-attention probabilities, averaged over heads: (B, n, n)."""
    base = call.rows.find("base")
    if base is None:
        return
    qh, kh = _heads(q[base.cond_rows], heads), _heads(k[base.cond_rows], heads)
    probs = (qh.float() @ kh.float().transpose(-1, -2) * qh.shape[-1] ** -0.5).softmax(-1)
    call.captured["self"] = probs.mean(1)
