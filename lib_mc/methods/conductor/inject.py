"""Concept injection (Concept Conductor): in every attention layer of the UNet's decoder, the
base rows' output (after to_out, before the residual add) becomes

    w_0 * base + sum_i w_i * concept_i

with the region weights at the layer's grid (w_0 the background's; front-to-back composited, so
overlaps split and the weights sum to 1). The concept rows themselves are not touched: each
branch sees only its own LoRAs and prompt, and the base rows carry the concepts' features into
the one prediction that is returned."""

from __future__ import annotations

import torch

from ...hooks.state import RunState
from .call import ConductorCall


def inject(out: torch.Tensor, call: ConductorCall, layer) -> torch.Tensor:
    """out: (rows of the call, tokens, channels), after to_out. `layer` names the attention
    layer the same way in every call of a host call (a module, or Forge's block key)."""
    weights = call.base_weights(out.shape[1], out)
    if weights is None:
        return out
    base = call.rows.find("base")
    here = {g.index: out[g.rows] for g in call.rows.concepts()}
    if base is None:   # an earlier call of this host call: the base rows read these later
        call.stored.setdefault(layer, {}).update(here)
        return out
    mixed = out[base.rows] * weights[0]
    for index in range(weights.shape[0] - 1):
        branch = here.get(index)
        if branch is None:
            branch = call.stored[layer][index]
        mixed = mixed + branch * weights[index + 1]
    if torch.is_grad_enabled() and out.requires_grad:
        out = out.clone()   # autograd: no in-place write into a tensor other ops saved
    out[base.rows] = mixed.to(out.dtype)
    return out


def make_injection_forward(module, original, run: RunState, layer, before=None):
    """A forward for a decoder attention module (A1111): the host's (chained) attention, then
    the injection. before(module, x, context, call): a look at the inputs first (captures)."""
    def forward(x, context=None, mask=None, **kwargs):
        call = run.call
        if before is not None and isinstance(call, ConductorCall):
            before(module, x, context, call)
        out = original(x, context=context, mask=mask, **kwargs)
        if not isinstance(call, ConductorCall):
            return out
        return inject(out, call, layer)
    return forward
