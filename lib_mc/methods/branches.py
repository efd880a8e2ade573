"""Branch rows for methods that run every concept as rows of their own beside the base rows
(blend, conductor): which rows each branch holds in a call, how the rows are split into calls
under the host's row cap, and their conditioning stacked as A1111 stacks prompts."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..conds import cat_conds, override, rows_of
from ..plan import Conditioning, Plan
from ..rows import RowGroup, RowPlan
from .calls import CallImages


@dataclass
class Part:
    group: RowGroup
    x: torch.Tensor
    sigma: torch.Tensor
    conds: list[Conditioning]   # row blocks (cond, uncond); contexts may differ in length


def branch_parts(plan: Plan, x, sigma, cond: Conditioning, images: CallImages, layout_x=None) -> list[Part]:
    """[layout rows (stage 1's input, cond only; when layout_x is given)], base rows, then each
    concept's rows: the same latent, its own prompt and negative."""
    n_cond, n_uncond = len(images.cond), len(images.uncond)
    cond_rows, uncond_rows = slice(0, n_cond), slice(n_cond, n_cond + n_uncond)
    parts = []
    if layout_x is not None and n_cond:
        parts.append(Part(RowGroup("layout", -1, 0, n_cond, 0), layout_x, sigma[cond_rows],
                          [rows_of(cond, cond_rows)]))
    parts.append(Part(RowGroup("base", -1, 0, n_cond, n_uncond), x, sigma, [cond]))
    for index, concept in enumerate(plan.concepts):
        blocks = []
        if n_cond:
            blocks.append(override(rows_of(cond, cond_rows), concept.cond, images.cond))
        if n_uncond:
            blocks.append(override(rows_of(cond, uncond_rows), concept.uncond, images.uncond))
        parts.append(Part(RowGroup("concept", index, 0, n_cond, n_uncond), x, sigma, blocks))
    return parts


def chunked(parts: list[Part], limit: int | None) -> list[list[Part]]:
    """Layout and base rows share the first call (replay reads across them); concepts fill up to
    the cap (None: everything in one call); an image concept's reference row stays in the call
    of the concept rows after it (their self-attention reads it)."""
    head = 2 if parts[0].group.kind == "layout" else 1
    chunks = [parts[:head]]
    units, rest = [], parts[head:]
    while rest:
        take = 2 if rest[0].group.kind == "reference" and len(rest) > 1 else 1
        units.append(rest[:take])
        rest = rest[take:]
    for unit in units:
        size = sum(p.group.size for p in chunks[-1])
        grows = sum(p.group.size for p in unit)
        if limit is not None and size + grows > limit and size > 0:
            chunks.append([])
        chunks[-1].extend(unit)
    return chunks


def row_plan(chunk: list[Part]) -> RowPlan:
    rows = RowPlan()
    for part in chunk:
        rows.add(part.group.kind, part.group.n_cond, part.group.n_uncond, part.group.index)
    return rows


def stacked_conds(plan: Plan, context_key: str, conds: list[Conditioning],
                  pad_like: list[Conditioning] = ()) -> Conditioning:
    """Stack conditioning rows. Contexts shorter than the longest of `conds`, `pad_like` (the
    whole host call) and every concept's own prompts are padded as A1111 stacks prompts of
    different lengths, so every row is an ordinary prompt to the host's attention and other
    extensions' patches, and a row's padding does not depend on how the rows are split into calls."""
    own = [c for concept in plan.concepts for c in (concept.cond, concept.uncond) if c is not None]
    length = max((c[context_key].shape[1] for c in [*pad_like, *own] if context_key in c), default=0)
    return cat_conds(conds, context_key, length)
