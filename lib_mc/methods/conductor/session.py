"""Conductor sampling (Concept Conductor), host-independent: one pass of the host's sampler.

Steps before `start_step` are the host's own calls (with automatic regions they record the
class words' attention; the masks are found at the start step, as in regional mode). From the
start step every host call becomes batched branch calls: the base rows (the host's prompt, no
LoRA) and each concept's rows (its LoRAs, its prompt or prompt variant), all on the host's
latent. In every decoder attention layer the base rows' output takes each concept's output
inside its region (`inject.py`); the prediction returned is the base rows' own, so the
concepts' features reach the image through one coherent denoising path and no branch's
prediction is pasted over the scene.
"""

from __future__ import annotations

import contextlib

import torch

from ...hooks.lora_rows import make_lora_forward
from ...plan import Conditioning
from ..base import HostPass, SessionBase
from ..branches import branch_parts, chunked, row_plan, stacked_conds
from ..calls import CallImages
from .call import ConductorCall
from .align import AlignCall, LayoutAlignment, layout_alignment, record_cross
from .inject import inject, make_injection_forward
from .layers import decoder_attention


class ConductorSession(SessionBase):
    mode = "conductor"
    acts_on_attention_output = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._decoder = decoder_attention(self.unet)
        self._watchers: dict = {}   # attention module -> fn(q, k, heads, call): refinement and alignment captures
        self._alignment: LayoutAlignment | None = None   # the batch's layout alignment (a reference picture)

    def _lora_forward(self, original, by_concept, module=None):
        return make_lora_forward(original, by_concept, self.run)

    def _attention_forward(self, module, original):
        if module not in self._decoder:
            return original
        return make_injection_forward(module, original, self.run, module, before=self._watch_inputs)

    def _watch_inputs(self, module, x, context, call: ConductorCall) -> None:
        """A1111: a watched layer's q and k for every row of the call (through each row's LoRA)."""
        watcher = self._watchers.get(module)
        if watcher is not None and context is None:
            watcher(module.to_q(x), module.to_k(x), module.heads, call)

    def _attend(self, q, k, v, heads, *, cross, decoder, host, module=None):
        """Forge hands over q, k, v: watched layers see them; the injection is its output patch."""
        watcher = self._watchers.get(module)
        if watcher is not None and not cross and isinstance(self.run.call, ConductorCall):
            watcher(q, k, heads, self.run.call)
        if cross and isinstance(self.run.call, AlignCall):   # the reference's inversion: automatic regions
            record_cross(self.recorders, q, k, heads)
        return host(q, k, v)

    def attention_output(self, out: torch.Tensor, *, layer, decoder: bool) -> torch.Tensor:
        call = self.run.call
        if not decoder or not isinstance(call, ConductorCall):
            return out
        return inject(out, call, layer)

    # ---- the batch ------------------------------------------------------------------------

    def sample(self, host: HostPass) -> torch.Tensor:
        """With a reference picture (host.reference) the layout alignment runs inside the pass
        (align.py); without one nothing of it runs."""
        self._host = host
        self._alignment = layout_alignment(self, host)
        try:
            with self.single_pass():
                return host.sample(host.initial)
        finally:
            self._alignment = None

    @contextlib.contextmanager
    def single_pass(self):
        """The one pass (also the hires fix's second pass, with `plan.at_size`)."""
        with self._patched("conductor"), self._recording_on():
            yield self

    # ---- the denoiser call --------------------------------------------------------------

    def denoise(self, model_fn, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning, *,
                n_cond: int, step: int, total_steps: int, images: CallImages | None = None) -> torch.Tensor:
        images = self._check_images(x, n_cond, images)
        if self.phase != "conductor":
            return model_fn(x, sigma, cond)
        self._check_size(x)
        if self._alignment is not None:   # inverts the reference first, then moves the latent early on
            x = self._alignment.before_call(model_fn, x, sigma, cond, images, step, total_steps)
        plain = self._plain_until_start(model_fn, x, sigma, cond, images, step, total_steps)
        if plain is not None:
            return plain
        return self._conduct(model_fn, x, sigma, cond, images)

    def _conduct(self, model_fn, x, sigma, cond, images: CallImages) -> torch.Tensor:
        """Base and concept rows in one call, or, above the host's row cap, concept calls first
        (their decoder outputs kept) and the base rows' call last; -> the base rows' output."""
        parts = branch_parts(self.plan, x, sigma, cond, images)
        chunks = chunked(parts, self.plan.options.max_rows_per_call)
        chunks = chunks[1:] + chunks[:1]   # the base rows read every concept's outputs: last
        stored: dict = {}
        out = None
        for chunk in chunks:
            rows = row_plan(chunk)
            call = ConductorCall(rows, plan=self.plan, images=images.all, stored=stored)
            conds = stacked_conds(self.plan, self.context_key, [block for p in chunk for block in p.conds],
                                  [b for p in parts for b in p.conds])
            result = self._model(model_fn, torch.cat([p.x for p in chunk]), torch.cat([p.sigma for p in chunk]),
                                 conds, call)
            base = rows.find("base")
            if base is not None:
                out = result[base.rows]
        return out
