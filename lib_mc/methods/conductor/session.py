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
from ..images.attention import guided_kv, make_guided_forward
from ..images.batch import image_batch
from ..images.mixing import keep_outside
from .call import ConductorCall
from .align import AlignCall, LayoutAlignment, layout_alignment
from .inject import inject, make_injection_forward
from .layers import decoder_attention, refinement_layer
from .refine import (apply, at_grid, cluster_counts, head_mean_probabilities, own_masks, refine_image,
                     refinement_steps, segments)


class ConductorSession(SessionBase):
    mode = "conductor"
    acts_on_attention_output = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._decoder = decoder_attention(self.unet)
        self._watchers: dict = {}   # attention module -> fn(q, k, heads, call): refinement and alignment captures
        self._alignment: LayoutAlignment | None = None   # the batch's layout alignment (a reference picture)
        self._refine_layer = refinement_layer(self.unet)   # (name, attn1): the layer mask refinement reads
        self._refined_steps: set[tuple[int, int]] = set()   # (step, image) refined
        self._images = None                  # the batch's image concepts (sample)

    def _lora_forward(self, original, by_concept, module=None):
        return make_lora_forward(original, by_concept, self.run)

    def _attention_forward(self, module, original):
        if module not in self._decoder:
            return original
        if module in self.run.decoder_self_attention:   # image concepts: guided appearance attention first
            original = make_guided_forward(module, original, self.run)
        return make_injection_forward(module, original, self.run, module, before=self._watch_inputs)

    def _watch_inputs(self, module, x, context, call: ConductorCall) -> None:
        """A1111: a watched layer's q and k for every row of the call (through each row's LoRA)."""
        watcher = self._watchers.get(module)
        if watcher is not None and context is None:
            watcher(module.to_q(x), module.to_k(x), module.heads, call)

    def _attend(self, q, k, v, heads, *, cross, decoder, host, module=None):
        """Forge hands over q, k, v: watched layers see them; the injection is its output patch."""
        if cross and self._images is not None:   # an image concept's subject found while it inverts
            self._images.watch_cross(q, k, heads)
        watcher = self._watchers.get(module)
        if watcher is not None and not cross and isinstance(self.run.call, ConductorCall):
            watcher(q, k, heads, self.run.call)
        if cross and isinstance(self.run.call, AlignCall):   # the reference's inversion: automatic regions
            self._record_cross(q, k, heads)
        if decoder and not cross and self.run.call is not None:   # image concepts' rows
            k, v = guided_kv(k, v, self.run.call)
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
        self._images = image_batch(self, host)
        try:
            with self.single_pass():
                return host.sample(host.initial)
        finally:
            self._alignment = self._images = None

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
        out = self._plain_until_start(model_fn, x, sigma, cond, images, step, total_steps)
        if out is None:
            with self._refining(step, total_steps, images):
                out = self._conduct(model_fn, x, sigma, cond, images)
        # mask-guided mixing: the kept background's prediction outside every region
        return keep_outside(self.plan, self._to_x0(), out, x, sigma, images.all)

    def _conduct(self, model_fn, x, sigma, cond, images: CallImages) -> torch.Tensor:
        """Base and concept rows in one call, or, above the host's row cap, concept calls first
        (their decoder outputs kept) and the base rows' call last; -> the base rows' output."""
        parts = branch_parts(self.plan, x, sigma, cond, images)
        if self._images is not None:
            parts = self._images.with_references(parts, model_fn, x, sigma, cond, images)
        chunks = chunked(parts, self.plan.options.max_rows_per_call)
        chunks = chunks[1:] + chunks[:1]   # the base rows read every concept's outputs: last
        stored: dict = {}
        out = None
        for chunk in chunks:
            rows = row_plan(chunk)
            call = ConductorCall(rows, plan=self.plan, images=images.all, stored=stored,
                                 appearance_alpha=self.plan.options.appearance_alpha)
            if self.faces is not None:
                call.faces = self.faces.rows(rows, images, x)
            conds = stacked_conds(self.plan, self.context_key, [block for p in chunk for block in p.conds],
                                  [b for p in parts for b in p.conds])
            result = self._model(model_fn, torch.cat([p.x for p in chunk]), torch.cat([p.sigma for p in chunk]),
                                 conds, call)
            base = rows.find("base")
            if base is not None:
                out = result[base.rows]
        return out

    # ---- mask refinement (Concept Conductor) --------------------------------------------

    def _refine_due(self, step: int, total_steps: int, images: CallImages) -> list[int]:
        """The images of this call's cond rows to refine now: at a refinement step
        (options.mask_refine_*), each image once per step (hosts may split cond and uncond, or
        images, into several calls of one step)."""
        o = self.plan.options
        if self._refined_steps and step < max(s for s, _ in self._refined_steps):
            self._refined_steps.clear()   # a new pass of the same session
        if not o.mask_refine or not images.cond:
            return []
        if step not in refinement_steps(total_steps, o.mask_refine_from, o.mask_refine_until, o.mask_refine_every):
            return []
        return [b for b in dict.fromkeys(images.cond) if (step, b) not in self._refined_steps]

    @contextlib.contextmanager
    def _refining(self, step: int, total_steps: int, images: CallImages):
        """Around one host call: at a refinement step the refinement layer's probabilities are
        segmented for the base and concept cond rows (in whichever engine call of the host call
        they come: the row cap splits them) and the masks refined after the host call, so they
        act from the next call on."""
        due = self._refine_due(step, total_steps, images)
        if not due:
            yield
            return
        self._refined_steps.update((step, b) for b in due)
        found: dict[tuple[int, int], torch.Tensor] = {}   # (concept index, -1 for base; image) -> segments
        module = self._refine_layer[1]
        self._watchers[module] = lambda q, k, heads, call: self._segment_rows(q, k, heads, call, found, due)
        try:
            yield
        finally:
            self._watchers.pop(module, None)
        self._refine_step(step, found, due)

    def _segment_rows(self, q, k, heads: int, call: ConductorCall, found: dict, due: list[int]) -> None:
        """The refinement layer's q, k (every row of the call): k-means segments of the
        head-averaged probabilities of each base and concept cond row of a due image."""
        grid = self.plan.regions.grid_for_tokens(q.shape[1])
        ks = cluster_counts(len(self.plan.concepts), self.plan.options.mask_refine_k)
        base = call.rows.find("base")
        groups = ([(-1, base)] if base is not None else []) + [(g.index, g) for g in call.rows.concepts()]
        for index, group in groups:
            for j in range(group.n_cond):   # cond rows are image call.images[j], as the base rows'
                if call.images[j] in due:
                    row = group.start + j
                    found[(index, call.images[j])] = segments(head_mean_probabilities(q[row], k[row], heads), grid, ks)

    def _refine_step(self, step: int, found: dict, due: list[int]) -> None:
        """Every concept's mask of the due images refined from the segments, into the plan (its
        per-image regions, the automatic concepts' found masks, a save_layout step)."""
        plan = self.plan
        concepts = range(len(plan.concepts))
        done = [b for b in due if all((i, b) in found for i in (-1, *concepts))]
        if not done:
            return
        latent = plan.regions.latent_hw
        grid = tuple(found[(-1, done[0])].shape[-2:])
        count = max(*done, len(plan.concept_masks) - 1 if plan.concept_masks is not None else 0) + 1
        masks = torch.stack([own_masks(plan, b, latent) for b in range(count)])
        for b in done:
            new, overlap = refine_image(found[(-1, b)], [found[(i, b)] for i in concepts], at_grid(masks[b], grid))
            masks[b] = apply(masks[b], new, overlap)
        auto = plan.auto_concepts
        if any(plan.concepts[i].auto_box is not None for i in auto):   # searched in a box: never leaves it
            masks[:, auto] = self._clip_to_boxes(masks[:, auto].clone())
        plan.set_concept_masks(masks)
        if auto:
            plan.mask_steps.append((f"refined at step {step + 1}", plan.found_masks))
