"""sd-webui-controlnet (Mikubill) under the engine's UNet calls in A1111. No A1111 imports.

What the extension does (scripts/hook.py and scripts/controlnet.py, v1.1.455):
- `UnetHook.hook` replaces the UNet's `forward` (instance attribute); every UNet call, the
  engine's too, runs its ControlNets on that call's rows (x, timesteps, context) and adds the
  residuals. A hint is one image that broadcasts, or one per host row (batch units:
  `torch.cat([c, c])` for cond and uncond); IP-Adapter image embeddings likewise.
- `process_sample` marks the sampler's prompts: a first context token of +1024 for the
  conditioning, -1024 for the negative (`mark_prompt_context`). The hooked forward strips it
  (`unmark_prompt_context`) and sets `cond_mark` (1 = cond row), which IP-Adapter, "ControlNet
  is more important" and reference modes read. It decides for the whole batch: when one row is
  unmarked, no marker is stripped (the marked rows keep a key of value +-1024) and every row
  counts as cond.

So around each engine call: the host's rows are unmarked before the engine stacks them with the
concepts' own (unmarked) prompts; every row of each engine call is marked again by its kind
(`mark`); and every per-host-row tensor the units hold is picked for the engine's rows
(`UnitRows`), so each row gets the hint of its own image and kind.
"""

from __future__ import annotations

import contextlib

import torch

from .row_sources import COND, pick_rows

MARK_TOKEN = 1024.0   # hook.py POSITIVE_MARK_TOKEN; the negative mark is its negation
MARK_EPS = 1e-3       # hook.py MARK_EPS

# ControlParams attributes that may hold one tensor per host row (hook.py ControlParams)
_PER_ROW = ("_hint_cond", "hint_cond", "hr_hint_cond", "used_hint_cond", "used_hint_cond_latent",
            "used_hint_inpaint_hijack", "control_context_override")


def is_marked(context: torch.Tensor) -> bool:
    """hook.py prompt_context_is_marked: the first token of every row is +-1024."""
    first = context[..., 0, :]
    return float((first.abs() - MARK_TOKEN).abs().mean()) < MARK_EPS


def unmark(cond: dict, key: str) -> tuple[dict, bool]:
    """The host's conditioning without the marker token, and whether it had one."""
    context = cond.get(key)
    if context is None or context.dim() != 3 or context.shape[1] < 2 or not is_marked(context):
        return cond, False
    return {**cond, key: context[:, 1:]}, True


def mark(cond: dict, key: str, flags: list[int]) -> dict:
    """Every row marked as mark_prompt_context marks it: +1024 for cond rows, -1024 for uncond."""
    context = cond[key]
    sign = torch.tensor([1.0 if f == COND else -1.0 for f in flags], dtype=context.dtype, device=context.device)
    token = (sign * MARK_TOKEN)[:, None, None].expand(-1, 1, context.shape[2])
    return {**cond, key: torch.cat([token, context], 1)}


def find_units(p) -> list:
    """The ControlParams of this job's ControlNet units: the hook object (`latest_network`,
    with `control_params`) of an always-on script, found by shape so no import is needed."""
    runner = getattr(p, "scripts", None)
    units = []
    for script in getattr(runner, "alwayson_scripts", None) or []:
        hook = getattr(script, "latest_network", None)
        units += list(getattr(hook, "control_params", None) or [])
    return units


class UnitRows:
    """Swaps the units' per-host-row tensors for the engine's rows around one UNet call."""

    def __init__(self, units: list):
        self.units = units

    @contextlib.contextmanager
    def picked(self, source: torch.Tensor, batch: int):
        """source[i]: the host row (of `batch`) that the call's row i stands for."""
        if len(source) == batch and torch.equal(source, torch.arange(batch)):   # the host's own rows
            yield
            return
        saved = []
        memo: dict[int, object] = {}   # one picked tensor per original, so identities hold (used_hint_cond is hint_cond)

        def pick(value):
            if id(value) not in memo:
                memo[id(value)] = pick_rows(value, source, batch)
            return memo[id(value)]
        try:
            for unit in self.units:
                attrs = vars(unit)
                for name in _PER_ROW:
                    if name in attrs:
                        saved.append((attrs, name, attrs[name]))
                        attrs[name] = pick(attrs[name])
                model = attrs.get("control_model")
                if model is not None and "image_emb" in vars(model):   # IP-Adapter's image embedding
                    saved.append((vars(model), "image_emb", vars(model)["image_emb"]))
                    vars(model)["image_emb"] = pick(vars(model)["image_emb"])
            yield
        finally:
            for attrs, name, value in reversed(saved):
                attrs[name] = value
