"""Region-aware attention (LoRA-Composer), in two forms sharing one core:

- cross-attention: inside concept i's region the output is attention(q, K_i, V_i) over concept
  i's own prompt, its keys and values projected with concept i's LoRA; elsewhere the main
  prompt's. Overlaps follow the front-to-back weights (sum 1). q and to_out are image-token
  layers: they carry every concept's LoRA under its region weights, in both forms, so A1111
  (which projects q per branch) and Forge (which hands over one q) compute the same. Each
  concept's branch runs on its region's tokens only, so it costs its area.
- self-attention, concept isolation: queries of concept i's region do not attend to keys of
  other concepts' regions (background queries and keys take part everywhere). The smallest
  grids use one SDPA call with a boolean (rows, 1, N, N) mask; above MASK_MAX_TOKENS the same
  attention is computed per segment (each region's queries over its own and the background's
  keys), with no N x N mask at all, so SDPA keeps its flash / memory-efficient kernels.

`make_regional_attention_forward` wraps an ldm-shaped attention module (A1111): the branches
call the host's own (chained) attention forward on the region's tokens. `regional_attend`
takes projected q, k, v and the host's attention function (Forge's replace patches).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...hooks.attention import HostAttention, _given
from ...hooks.state import RunState
from .call import NO_CONCEPT, RegionalCall

MASK_MAX_TOKENS = 256   # a mask forces SDPA's math kernel (N x N scores per head): only the smallest grids


def blend_cross(x_tokens: int, call: RegionalCall, branch_output, like: torch.Tensor) -> torch.Tensor:
    """branch_output(branch, tokens): the cross-attention output of `branch` (NO_CONCEPT: the main prompt;
    i: concept i's) for those token positions (None: all). -> the region-weighted output. Each
    branch, the main prompt's included, runs only on the tokens where its weight is not 0."""
    weights = call.token_weights(x_tokens, like)
    if weights is None:
        with call.scoped(NO_CONCEPT):
            return branch_output(NO_CONCEPT, None)
    out = None
    for slot, branch in enumerate([NO_CONCEPT, *range(len(call.contexts))]):
        w = weights[slot]
        inside = (w > 0).any(0)
        count = int(inside.sum())
        if count == 0:
            continue
        tokens = None if count == x_tokens else inside.nonzero().flatten()
        with call.scoped(branch, None if tokens is None else (tokens, x_tokens)):
            part = branch_output(branch, tokens)
        if out is None:
            out = part.new_zeros((part.shape[0], x_tokens, part.shape[-1]))
        if tokens is None:
            out += w[..., None] * part
        else:
            out[:, tokens] += w[:, tokens, None] * part
    return out


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, inner = t.shape
    return t.view(b, n, heads, inner // heads).transpose(1, 2)


def isolated_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                       labels: torch.Tensor) -> torch.Tensor:
    """Self-attention (rows, N, heads * d) with concept isolation; labels (rows, N): 0 background,
    i + 1 concept i."""
    b, n, inner = q.shape
    qh, kh, vh = (_heads(t, heads) for t in (q, k, v))
    if n <= MASK_MAX_TOKENS:
        lq, lk = labels[:, :, None], labels[:, None, :]
        allowed = ~((lq > 0) & (lk > 0) & (lq != lk))
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=allowed[:, None])
    else:
        out = _segments(qh, kh, vh, labels)
    return out.transpose(1, 2).reshape(b, n, inner)


def _segments(qh, kh, vh, labels) -> torch.Tensor:
    """The isolated attention region by region: rows that share a label map are done together."""
    out = torch.empty_like(qh)
    maps, which = torch.unique(labels, dim=0, return_inverse=True)
    for m in range(maps.shape[0]):
        rows = (which == m).nonzero().flatten()
        label = maps[m]
        background = label == 0
        for value in label.unique().tolist():
            queries = (label == value).nonzero().flatten()
            q = qh[rows][:, :, queries]
            if value == 0:
                k, v = kh[rows], vh[rows]
            else:
                keys = (background | (label == value)).nonzero().flatten()
                k, v = kh[rows][:, :, keys], vh[rows][:, :, keys]
            out[rows[:, None], :, queries[None, :]] = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    return out


def _capture_cross(call: RegionalCall, q: torch.Tensor, heads: int, module) -> None:
    """Each concept's class-word attention over every image token, its LoRA on its keys."""
    keys = []
    for i, context in enumerate(call.contexts):
        with call.scoped(i):
            keys.append(module.to_k(context.to(q.device, q.dtype)))
    call.capture.add_cross(q, heads, keys)


def _captures(call: RegionalCall, n_tokens: int) -> bool:
    return call.capture is not None and call.capture.wants(n_tokens)


def regional_attend(q, k, v, heads: int, call: RegionalCall, *, cross: bool, host: HostAttention,
                    module=None) -> torch.Tensor:
    """Projected q, k, v -> attention output before to_out (Forge). `module`: the attention
    module, whose to_k / to_v project each concept's context."""
    if cross:
        if module is None:
            return host(q, k, v)
        if _captures(call, q.shape[1]):
            _capture_cross(call, q, heads, module)

        def branch_output(branch, tokens):
            queries = q if tokens is None else q[:, tokens]
            if branch == NO_CONCEPT:
                return host(queries, k, v)
            context = call.contexts[branch].to(q.device)
            return host(queries, module.to_k(context), module.to_v(context))
        return blend_cross(q.shape[1], call, branch_output, q)
    if _captures(call, q.shape[1]):
        call.capture.add_self(q, k, heads)
    if call.isolate and call.grid_of(q.shape[1]) is not None:
        return isolated_attention(q, k, v, heads, call.labels(q.shape[1], q.device))
    return host(q, k, v)


def make_regional_attention_forward(module, original, run: RunState):
    def forward(x, context=None, mask=None, **kwargs):
        call: RegionalCall | None = run.call
        if call is None or mask is not None or any(_given(v) for v in kwargs.values()) or x.shape[0] != call.rows:
            return original(x, context=context, mask=mask, **kwargs)
        if context is not None and context is not x:
            if _captures(call, x.shape[1]):
                _capture_cross(call, module.to_q(x), module.heads, module)

            def branch_output(branch, tokens):
                own = context if branch == NO_CONCEPT else call.contexts[branch].to(x.device, context.dtype)
                return original(x if tokens is None else x[:, tokens], context=own, **kwargs)
            return blend_cross(x.shape[1], call, branch_output, x)
        captures = _captures(call, x.shape[1])
        if call.isolate and call.grid_of(x.shape[1]) is not None:
            q, k, v = module.to_q(x), module.to_k(x), module.to_v(x)
            if captures:
                call.capture.add_self(q, k, module.heads)
            out = isolated_attention(q, k, v, module.heads, call.labels(x.shape[1], x.device))
            return module.to_out(out)
        if captures:
            call.capture.add_self(module.to_q(x), module.to_k(x), module.heads)
        return original(x, context=context, mask=mask, **kwargs)
    return forward
