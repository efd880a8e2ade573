"""Attention forward for any module shaped like ldm's CrossAttention (to_q/k/v/out, heads).

Falls through to the host's own forward unless this call needs something from it: a key mask
(concept prompts of other lengths were zero-padded) or layout replay. It then attends with
scaled_dot_product_attention and forms probabilities only for the layout rows it replays.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .state import RunState


def is_attention(module) -> bool:
    return all(hasattr(module, a) for a in ("to_q", "to_k", "to_v", "to_out", "heads"))


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, inner = t.shape
    return t.view(b, n, heads, inner // heads).transpose(1, 2)


def make_attention_forward(module, original, run: RunState):
    def forward(x, context=None, mask=None, **kwargs):
        call = run.call
        # sgm passes extra kwargs (additional_tokens, crossframe); any non-default one: host's path
        if call is None or mask is not None or any(v for v in kwargs.values()):
            return original(x, context=context, mask=mask, **kwargs)
        cross = context is not None
        if (not cross and call.capture_self_tokens == x.shape[1] and "self" not in call.captured
                and module in run.decoder_self_attention):
            _capture(module, x, call)
        key_mask = call.key_mask if cross else None
        replay = call.replay_cross if cross else x.shape[1] <= call.replay_self_max_tokens
        if key_mask is None and not replay:
            return original(x, context=context, mask=mask, **kwargs)
        source = context if cross else x
        q, k, v = module.to_q(x), module.to_k(source), module.to_v(source)
        q, k, v = (_heads(t, module.heads) for t in (q, k, v))
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        if replay:
            layout, base = call.replay_pair
            if cross:
                # Layout and base cond rows share the base prompt's context, so their V is equal
                # and (layout probs @ base V) is the layout row's output: no probabilities needed.
                out[base] = out[layout]
            else:
                scale = q.shape[-1] ** -0.5
                logits = q[layout].float() @ k[layout].float().transpose(-1, -2) * scale
                out[base] = logits.softmax(-1).to(v.dtype) @ v[base]
        b, heads, n, d = out.shape
        return module.to_out(out.transpose(1, 2).reshape(b, n, heads * d))
    return forward


@torch.no_grad()
def _capture(module, x, call) -> None:
    """The base cond rows' self-attention probabilities, averaged over heads: (B, n, n)."""
    base = call.rows.find("base")
    if base is None:
        return
    rows = x[base.cond_rows]
    q, k = _heads(module.to_q(rows), module.heads), _heads(module.to_k(rows), module.heads)
    probs = (q.float() @ k.float().transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)
    call.captured["self"] = probs.mean(1)
