"""What the hooks need to know about the UNet call in flight. None between calls: hooks pass through."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..rows import RowPlan


@dataclass
class CallState:
    rows: RowPlan
    replay_cross: bool = False               # base cond rows take the layout row's cross-attention
    replay_self_max_tokens: int = 0          # ... and self-attention in layers up to this size
    capture_self_tokens: int = 0             # keep the base rows' self-attention of the first decoder layer this size
    captured: dict = field(default_factory=dict)
    concept_rows: dict[int, slice] = field(default_factory=dict)
    appearance_alpha: float = 0.0            # image concepts: V = V_concept + alpha * (V_concept - V_reference)
    reference_rows: dict[int, int] = field(default_factory=dict)   # image concept -> its reference row
    faces: dict = field(default_factory=dict)       # face concept -> its FaceRows (methods/faces/batch.py)
    residuals: dict = field(default_factory=dict)   # face concept -> (rows, IdentityNet residuals) of this call

    def __post_init__(self):
        self.concept_rows = {g.index: g.rows for g in self.rows.concepts()}
        self.reference_rows = {g.index: g.start for g in self.rows.groups if g.kind == "reference"}
        layout, base = self.rows.find("layout"), self.rows.find("base")
        self.replay_pair = None if layout is None or base is None else (layout.cond_rows, base.cond_rows)
        if self.replay_pair is None:
            self.replay_cross, self.replay_self_max_tokens = False, 0


class RunState:
    """Shared by every hook of one session; the engine sets `call` around each UNet call."""

    def __init__(self):
        self.call: CallState | None = None
        self.decoder_self_attention: set = set()   # modules whose self-attention may be captured
