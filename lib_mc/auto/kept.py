"""One model kept between jobs (SAM, Grounding DINO): loaded again only when what it is loaded
from changes; `offload` moves it to the CPU (--lowvram/--medvram), `free` drops it."""

from __future__ import annotations

from typing import Callable

import torch


class KeptModel:
    def __init__(self, module: Callable[[object], torch.nn.Module]):
        self.module = module   # the loaded object -> its torch module (what moves between devices)
        self.loaded: tuple[object, object] | None = None   # (what it was loaded from, the loaded object)

    def get(self, key, load: Callable[[], object], device):
        """The object loaded from `key` (loaded now if another or none is held), on `device`."""
        if self.loaded is None or self.loaded[0] != key:
            self.free()   # the old one goes before the new one loads
            self.loaded = (key, load())
        module = self.module(self.loaded[1])
        if next(module.parameters()).device != torch.device(device):
            module.to(device)
        return self.loaded[1]

    def offload(self) -> None:
        if self.loaded is not None:
            self.module(self.loaded[1]).to("cpu")

    def free(self) -> None:
        self.loaded = None
