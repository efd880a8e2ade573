"""What every method's `denoise` is told about one host call, and what it counts."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CallImages:
    """Which image of the host's batch each row of one host call is: the cond rows, then the
    uncond rows (a host that splits cond and uncond makes calls with one of them empty)."""
    cond: tuple[int, ...]
    uncond: tuple[int, ...]

    @classmethod
    def batched(cls, n_cond: int, rows: int) -> "CallImages":
        return cls(tuple(range(n_cond)), tuple(range(rows - n_cond)))

    def keys(self) -> list[tuple[bool, int]]:
        return [(True, b) for b in self.cond] + [(False, b) for b in self.uncond]

    @property
    def all(self) -> list[int]:
        return list(self.cond) + list(self.uncond)


@dataclass
class Stats:
    unet_calls: int = 0
    unet_rows: int = 0          # UNet sample-evaluations, one per batch row
    replayed_calls: int = 0     # stage-2 calls answered from the stage-1 record
    probe_rows: int = 0         # rows of extra calls outside the sampler's own (regional re-initialisation)
    enhance_rows: int = 0       # rows of gradient-enabled calls (regional concept enhancement)
    invert_rows: int = 0        # rows of the reference's inversion (conductor layout alignment)
    align_rows: int = 0         # rows of gradient-enabled calls up to the alignment layer (conductor)

    def reset(self):
        self.unet_calls = self.unet_rows = self.replayed_calls = self.probe_rows = self.enhance_rows = 0
        self.invert_rows = self.align_rows = 0
