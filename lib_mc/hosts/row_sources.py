"""Which host row each row of an engine UNet call stands for. Shared by the A1111 and Forge
routings: whatever another extension holds per host row (ControlNet hints and residuals,
IP-Adapter image embeddings) is picked for the engine's rows by these indices."""

from __future__ import annotations

import torch

COND, UNCOND = 0, 1


def call_rows(call, n_cond: int, rows: int) -> tuple[list[int], torch.Tensor]:
    """For one UNet call the engine makes: a cond/uncond flag per row and, per row, the row of
    the host's call ([cond rows, uncond rows]) it stands for: a layout, base or concept cond row
    stands for its image's cond row, an uncond row for its image's uncond row. `call` is the
    engine's CallState, None (stage 1) or a call on the host's own rows (regional mode)."""
    if call is None or getattr(call, "host_rows", False):
        return [COND] * n_cond + [UNCOND] * (rows - n_cond), torch.arange(rows)
    flags, source = [], []
    for group in call.rows.groups:
        flags += [COND] * group.n_cond + [UNCOND] * group.n_uncond
        source += list(range(group.n_cond)) + list(range(n_cond, n_cond + group.n_uncond))
    return flags, torch.tensor(source, dtype=torch.long)


def pick_rows(value, source: torch.Tensor, batch: int):
    """`value` with every tensor of `batch` rows (one per host row) replaced by its rows
    `source`, inside tuples, named tuples, lists and dicts; anything else (a tensor of one
    row that broadcasts, a number) as it is."""
    if torch.is_tensor(value):
        return value[source.to(value.device)] if value.dim() > 0 and value.shape[0] == batch else value
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(pick_rows(v, source, batch) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(pick_rows(v, source, batch) for v in value)
    if isinstance(value, dict):
        return {k: pick_rows(v, source, batch) for k, v in value.items()}
    return value
