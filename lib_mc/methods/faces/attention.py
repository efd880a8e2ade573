"""InstantID's identity attention on a face concept's rows only: every cross-attention adds
`weight * attention(q, to_k_ip(tokens), to_v_ip(tokens))` to its output before to_out, as
InstantID's IPAttnProcessor does; the tokens are the concept's identity tokens on its cond rows
and the Resampler over zeros on its uncond rows (InstantID's negative). Other rows are the
host's, untouched."""

from __future__ import annotations

import contextlib
from dataclasses import replace

import torch
import torch.nn.functional as F

from ...hooks.attention import _given, sdpa
from ...hooks.state import CallState
from ...rows import RowPlan


class IPWeights:
    """One cross-attention's to_k_ip / to_v_ip, placed on each device and dtype it is asked for
    once (from the loaded weights, so a cast never compounds)."""

    def __init__(self, wk: torch.Tensor, wv: torch.Tensor):
        self.wk, self.wv = wk, wv
        self._placed: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def on(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (like.device, like.dtype)
        if key not in self._placed:
            self._placed[key] = (self.wk.to(*key), self.wv.to(*key))
        return self._placed[key]


def identity_rows(q: torch.Tensor, faces: dict, weights: IPWeights, attention) -> list[tuple[slice, torch.Tensor]]:
    """(rows, weighted identity attention before to_out) for each face concept of the call.
    attention(q, k, v): the host's attention (heads known to it)."""
    wk, wv = weights.on(q)
    found = []
    for face in faces.values():
        if face.weight <= 0:
            continue
        tokens = face.tokens.to(q.device, q.dtype)
        k, v = F.linear(tokens, wk), F.linear(tokens, wv)
        found.append((face.rows, face.weight * attention(q[face.rows], k, v)))
    return found


def add_identity(out: torch.Tensor, q: torch.Tensor, call, weights, host) -> torch.Tensor:
    """Hosts that hand over q, k, v (Forge): out is the attention before to_out."""
    faces = getattr(call, "faces", None)
    if not faces or weights is None:
        return out
    for rows, extra in identity_rows(q, faces, weights, host):
        out[rows] = out[rows] + extra.to(out.dtype)
    return out


@contextlib.contextmanager
def _face_rows_only(run, index: int, rows: slice):
    """Layers run on one face concept's rows alone: the per-row LoRA hooks see a call that is
    just those rows, so the concept's LoRA acts on them (and nothing is computed for the others)."""
    call = run.call
    alone = RowPlan()
    alone.add("concept", rows.stop - rows.start, 0, index)
    run.call = CallState(alone)
    try:
        yield
    finally:
        run.call = call


def make_identity_forward(module, original, run, weights):
    """A1111: a cross-attention module's forward. The host's (chained) attention computes every
    row; each face concept's rows then add their identity attention, projected by to_out without
    its bias (to_out is linear, so this is the same as adding before it), q and to_out through
    the concept's LoRA, computed on those rows only."""
    def forward(x, context=None, mask=None, **kwargs):
        out = original(x, context=context, mask=mask, **kwargs)
        call = run.call
        faces = getattr(call, "faces", None) if call is not None else None
        if not faces or context is None or context is x or mask is not None or \
                any(_given(v) for v in kwargs.values()):
            return out
        for index, face in faces.items():
            if face.weight <= 0:
                continue
            rows = face.rows
            with _face_rows_only(run, index, rows):
                q = module.to_q(x[rows])
                (_, extra), = identity_rows(q, {index: replace(face, rows=slice(0, len(q)))}, weights,
                                            lambda q_, k_, v_: sdpa(q_, k_, v_, module.heads))
                projected = module.to_out(extra.to(q.dtype))
            bias = getattr(module.to_out[0], "bias", None)
            if bias is not None:
                projected = projected - bias.to(projected.dtype)
            out[rows] = out[rows] + projected.to(out.dtype)
        return out
    return forward
