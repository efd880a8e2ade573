"""Which rows of one batched UNet call belong to which branch.

A call stacks groups: `layout` (stage 1's recorded input, cond only), `base` (current latent,
base prompt, cond + uncond) and one group per concept (current latent, its prompt, cond +
uncond). An image concept adds a `reference` group (one cond row: its reference picture's
inverted latent, its prompt) beside its concept rows, whose decoder self-attention reads it.
Hooks ask this object for slices; adding a branch kind is adding a group.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RowGroup:
    kind: str            # "layout" | "base" | "concept" | "reference"
    index: int           # concept index for "concept" and "reference", else -1
    start: int
    n_cond: int
    n_uncond: int

    @property
    def rows(self) -> slice:
        return slice(self.start, self.start + self.n_cond + self.n_uncond)

    @property
    def cond_rows(self) -> slice:
        return slice(self.start, self.start + self.n_cond)

    @property
    def uncond_rows(self) -> slice:
        return slice(self.start + self.n_cond, self.start + self.n_cond + self.n_uncond)

    @property
    def size(self) -> int:
        return self.n_cond + self.n_uncond


class RowPlan:
    def __init__(self):
        self.groups: list[RowGroup] = []
        self.total = 0

    def add(self, kind: str, n_cond: int, n_uncond: int, index: int = -1) -> RowGroup:
        group = RowGroup(kind, index, self.total, n_cond, n_uncond)
        self.groups.append(group)
        self.total += group.size
        return group

    def find(self, kind: str, index: int = -1) -> RowGroup | None:
        for group in self.groups:
            if group.kind == kind and group.index == index:
                return group
        return None

    def concepts(self) -> list[RowGroup]:
        return [g for g in self.groups if g.kind == "concept"]
