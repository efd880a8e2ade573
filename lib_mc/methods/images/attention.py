"""Guided appearance attention (PnP-MIX) in the decoder self-attention of an image concept's
rows: the keys are its reference row's, the values are guided away from the reference's,

    K = K_reference,   V = V_concept + alpha * (V_concept - V_reference),

so the concept's queries find their matches in the reference picture (alpha 0: the concept's
own values, read through the reference's keys). One reference row per image concept and call
serves the concept's cond and uncond rows."""

from __future__ import annotations

import torch

from ...hooks.attention import _given, sdpa
from ...hooks.state import CallState, RunState


def guided_kv(k: torch.Tensor, v: torch.Tensor, call: CallState) -> tuple[torch.Tensor, torch.Tensor]:
    """k, v: (rows of the call, tokens, channels) -> with every image concept's rows guided."""
    pairs = _pairs(call)
    if not pairs:
        return k, v
    k2, v2 = k.clone(), v.clone()
    alpha = call.appearance_alpha
    for rows, ref in pairs:
        k_ref, v_ref = k[ref:ref + 1], v[ref:ref + 1]
        k2[rows] = k_ref.expand_as(k[rows])
        v2[rows] = v[rows] + alpha * (v[rows] - v_ref)
    return k2, v2


def _pairs(call: CallState) -> list[tuple[slice, int]]:
    """(the concept's rows, its reference row) for every image concept of the call."""
    return [(call.concept_rows[i], ref) for i, ref in call.reference_rows.items()
            if i in call.concept_rows and call.concept_rows[i].start != call.concept_rows[i].stop]


def make_guided_forward(module, original, run: RunState):
    """A1111: a decoder self-attention module's forward. The host's (chained) attention computes
    every row; the rows of image concepts are then computed again with the reference's keys and
    guided values (q, k, v projected on the whole call so each row's LoRA acts as in the host's)."""
    def forward(x, context=None, mask=None, **kwargs):
        out = original(x, context=context, mask=mask, **kwargs)
        call = run.call
        if call is None or (context is not None and context is not x) or mask is not None or not call.reference_rows \
                or any(_given(v) for v in kwargs.values()):   # sgm's crossframe / extra tokens: the host's
            return out
        pairs = _pairs(call)
        if not pairs:
            return out
        q, k, v = module.to_q(x), module.to_k(x), module.to_v(x)
        k, v = guided_kv(k, v, call)
        inner = torch.zeros_like(q)
        for rows, _ in pairs:
            inner[rows] = sdpa(q[rows], k[rows], v[rows], module.heads)
        projected = module.to_out(inner)   # the whole call's rows: each row's LoRA on to_out
        out = out.clone()
        for rows, _ in pairs:
            out[rows] = projected[rows].to(out.dtype)
        return out
    return forward
