"""Conditioning rows for UNet calls the engine makes: a concept's own prompt put in for the
host's rows, and rows of different context lengths stacked the way A1111 stacks prompts."""

from __future__ import annotations

import torch

from .errors import EngineError

Conditioning = dict[str, torch.Tensor]


def rows_of(c: Conditioning, sl: slice) -> Conditioning:
    return {k: v[sl] for k, v in c.items()}


def override(rows: Conditioning, own: Conditioning | None, images: tuple[int, ...]) -> Conditioning:
    """The host's rows with the concept's own prompt tensors in place: one row for every image
    (broadcast) or one per image of the batch (per-image prompts), picked by image."""
    if own is None or not images:
        return rows
    merged = dict(rows)
    like = next(iter(rows.values()))
    for key, tensor in own.items():
        tensor = tensor.to(like.device, rows[key].dtype if key in rows else like.dtype)
        if tensor.shape[0] == 1:
            merged[key] = tensor.expand(len(images), *tensor.shape[1:])
        elif max(images) < tensor.shape[0]:
            merged[key] = tensor[torch.tensor(images, device=tensor.device)]
        else:
            raise EngineError(f"concept conditioning '{key}' has {tensor.shape[0]} rows; the call needs image "
                              f"{max(images)}")
    return merged


def pad_context(t: torch.Tensor, length: int) -> torch.Tensor:
    """A context padded to `length` tokens as A1111's prompt_parser.stack_conds pads prompts of
    different lengths: the last vector repeated."""
    return torch.cat([t, t[:, -1:].expand(-1, length - t.shape[1], -1)], 1) if t.shape[1] < length else t


def cat_conds(conds: list[Conditioning], context_key: str, length: int = 0) -> Conditioning:
    """Stack conditioning rows; contexts padded to the longest of them and `length`."""
    keys = conds[0].keys()
    for c in conds[1:]:
        if c.keys() != keys:
            raise EngineError(f"conditioning keys differ between branches: {sorted(keys)} vs {sorted(c.keys())}")
    length = max([length] + [c[context_key].shape[1] for c in conds if context_key in c])
    stacked = {}
    for key in keys:
        tensors = [c[key] for c in conds]
        if key == context_key:
            tensors = [pad_context(t, length) for t in tensors]
        try:
            stacked[key] = torch.cat(tensors)
        except RuntimeError as exc:
            raise EngineError(f"conditioning '{key}' has different shapes between branches: "
                              f"{[tuple(t.shape) for t in tensors]}") from exc
    return stacked
