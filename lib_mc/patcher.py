"""Instance-attribute patches kept as data, applied and removed in one place.

A patch wraps what the attribute holds at apply time (`wrap(current) -> new`), so it composes
with whatever the host or another extension installed before us.

Patching instances (never classes) leaves the host's class-level attention optimisations and
other extensions alone; removal restores exactly what was there, including "nothing".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

_MISSING = object()


@dataclass(frozen=True)
class Patch:
    target: Any
    attr: str
    wrap: Any   # callable: current value -> patched value


class PatchSet:
    def __init__(self):
        self.patches: list[Patch] = []
        self._saved: list[tuple[Patch, Any]] = []

    def add(self, target, attr: str, wrap) -> None:
        self.patches.append(Patch(target, attr, wrap))

    @property
    def applied(self) -> bool:
        return bool(self._saved)

    def apply(self) -> None:
        if self._saved:
            raise RuntimeError("patches already applied")
        try:
            for patch in self.patches:
                before = patch.target.__dict__.get(patch.attr, _MISSING)
                setattr(patch.target, patch.attr, patch.wrap(getattr(patch.target, patch.attr)))
                self._saved.append((patch, before))
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        while self._saved:
            patch, before = self._saved.pop()
            if before is _MISSING:
                patch.target.__dict__.pop(patch.attr, None)
            else:
                setattr(patch.target, patch.attr, before)

    def __enter__(self):
        self.apply()
        return self

    def __exit__(self, *exc):
        self.remove()
        return False
