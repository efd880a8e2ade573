"""Two-stage multi-concept sampling (OMG), host-independent.

The host runs its sampler twice with identical noise (`sample`, or the stages by hand) and
routes every denoiser call through `session.denoise(model_fn, x, sigma, cond, n_cond=...,
step=..., total_steps=..., images=...)`, where `model_fn(x, sigma, cond)` is its own inner model
(k-diffusion wrapper or eps model), the rows of `x` are [cond rows, uncond rows], `step` counts
the host's CFG evaluations (unique per evaluation) and `images` says which image of the batch
each row is (default: rows i and n_cond + i are image i).

- Stage 1 (`with session.stage1():`) is a plain run; every row's input, sigma and output are
  recorded under (evaluation, cond or uncond, image), so stage 2 does not depend on how the host
  splits its calls (batched cond/uncond, separate calls, Forge's memory-based batching).
- Stage 2 (`with session.stage2():`) returns the recorded output before the start step (no
  UNet work) and from then on makes one batched call per host call: layout rows (stage 1's
  input, cond only), base rows and each concept's rows, then blends the predictions under the
  region weights. Blending is linear, so it holds for x0 and eps outputs and commutes with the
  host's CFG.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ...auto.refine import refine_masks
from ...errors import EngineError
from ...hooks.attention import attend, make_attention_forward
from ...hooks.lora_rows import make_lora_forward
from ...hooks.state import CallState
from ...plan import Conditioning
from ..base import HostPass, SessionBase
from ..branches import branch_parts, chunked, row_plan, stacked_conds
from ..calls import CallImages
from ..images.attention import guided_kv, make_guided_forward
from ..images.batch import image_batch
from ..images.mixing import background_prediction, keep_outside


@dataclass
class Recorded:
    """One row of one stage-1 evaluation."""
    x: torch.Tensor
    sigma: torch.Tensor
    out: torch.Tensor


class BlendSession(SessionBase):
    mode = "blend"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.records: dict[int, dict[tuple[bool, int], Recorded]] = {}   # evaluation -> (cond?, image) -> row
        self._refined_steps: set[int] = set()
        self._images = None                  # the batch's image concepts (sample)

    def _lora_forward(self, original, by_concept, module=None):
        return make_lora_forward(original, by_concept, self.run)

    def _attention_forward(self, module, original):
        forward = make_attention_forward(module, original, self.run)
        if module in self.run.decoder_self_attention:   # image concepts: guided appearance attention
            forward = make_guided_forward(module, forward, self.run)
        return forward

    def _attend(self, q, k, v, heads, *, cross, decoder, host, module=None):
        if cross and self._images is not None:   # an image concept's subject found while it inverts
            self._images.watch_cross(q, k, heads)
        if self.phase not in ("blend", "single"):
            return host(q, k, v)
        if decoder and not cross:
            k, v = guided_kv(k, v, self.run.call)
        return attend(q, k, v, heads, self.run.call, cross=cross, decoder=decoder, host=host)

    # ---- the batch ------------------------------------------------------------------------

    def sample(self, host: HostPass) -> torch.Tensor:
        """The layout pass, automatic regions from it, then the blended pass on the same noise."""
        self._host = host
        self._images = image_batch(self, host)
        try:
            with self.stage1():
                first = host.sample(host.initial)
            if host.interrupted():
                return first
            host.layout_done(first)
            again = host.replay_noise()
            if self.recorder is not None:
                if host.find_regions is not None:
                    host.find_regions(first)
                else:
                    self.find_regions()
            self._place_faces(first)   # face concepts: their keypoints where the layout has their face
            with self.stage2():
                return host.sample(again)
        finally:
            self._images = None

    # ---- stages -------------------------------------------------------------------------

    @contextlib.contextmanager
    def stage1(self):
        self.records.clear()
        with self._recording():
            yield self

    @contextlib.contextmanager
    def stage2(self):
        if not self.records:
            raise EngineError("stage 2 needs a stage-1 run first")
        if self.recorder is not None and self.plan.image_regions is None:
            self.find_regions()   # a host may have found (and refined) them already
        self._refined_steps.clear()
        with self._patched("blend"):
            yield self

    @contextlib.contextmanager
    def single_pass(self):
        """One pass, every concept's branch blended under its region from the first step, no
        layout pass to follow (the hires fix's second pass, with `plan.at_size`)."""
        with self._patched("single"):
            yield self

    # ---- the denoiser call --------------------------------------------------------------

    def denoise(self, model_fn, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning, *,
                n_cond: int, step: int, total_steps: int, images: CallImages | None = None) -> torch.Tensor:
        images = self._check_images(x, n_cond, images)
        if self.phase == "record":
            if self.recorder is not None:
                self.recorder.active = step >= self.plan.auto_from_step(total_steps)
                self.recorder.images = images.cond
            out = self._kept(self._model(model_fn, x, sigma, cond), x, sigma, images)
            record = self.records.setdefault(step, {})
            for row, key in enumerate(images.keys()):
                record[key] = Recorded(x[row].clone(), sigma[row].clone(), out[row].clone())
            return out
        if self.phase == "single":
            return self._blend_call(model_fn, x, sigma, cond, images, x[:0], step, total_steps)
        if self.phase != "blend":
            return model_fn(x, sigma, cond)
        recorded = self._recorded(step, images)
        if step < self.plan.start_step(total_steps):
            for row, r in enumerate(recorded):
                if not (torch.equal(x[row], r.x) and torch.equal(sigma[row], r.sigma)):
                    raise EngineError(f"stage 2 left stage 1's path at evaluation {step} before blending "
                                      "started: the initial or ancestral noise was not replayed")
            self.stats.replayed_calls += 1
            return torch.stack([r.out for r in recorded])
        layout_x = torch.stack([r.x for r in recorded[:n_cond]]) if n_cond else x[:0]
        return self._blend_call(model_fn, x, sigma, cond, images, layout_x, step, total_steps)

    def _recorded(self, step: int, images: CallImages) -> list[Recorded]:
        """Stage 1's rows for the rows of this stage-2 call."""
        record = self.records.get(step)
        if record is None:
            raise EngineError(f"stage 2 made denoiser evaluation {step + 1}, stage 1 made {len(self.records)}: "
                              "the sampler's number of model calls changed between the passes")
        missing = [key for key in images.keys() if key not in record]
        if missing:
            kind, image = missing[0]
            raise EngineError(f"stage 2 asked evaluation {step + 1} for the {'cond' if kind else 'uncond'} row of "
                              f"image {image}, which stage 1 did not compute")
        return [record[key] for key in images.keys()]

    def _blend_call(self, model_fn, x, sigma, cond, images: CallImages, layout_x, step, total_steps) -> torch.Tensor:
        self._check_size(x)
        layout = layout_x if self.plan.options.layout_replay else None
        parts = branch_parts(self.plan, x, sigma, cond, images, layout)
        if self._images is not None:
            parts = self._images.with_references(parts, model_fn, x, sigma, cond, images)
        outputs: dict[tuple[str, int], torch.Tensor] = {}
        replay_self = step < self.plan.self_replay_until_step(total_steps)
        refine = bool(images.cond) and self._refine_now(step, total_steps)
        for chunk in chunked(parts, self.plan.options.max_rows_per_call):
            rows = row_plan(chunk)
            conds = stacked_conds(self.plan, self.context_key, [block for p in chunk for block in p.conds],
                                  [b for p in parts for b in p.conds])
            call = CallState(rows, replay_cross=self.plan.options.layout_replay,
                             replay_self_max_tokens=self._self_replay_tokens() if replay_self else 0,
                             capture_self_tokens=self._self_replay_tokens() if refine else 0,
                             appearance_alpha=self.plan.options.appearance_alpha)
            if self.faces is not None:
                call.faces = self.faces.rows(rows, images, x)
            out = self._model(model_fn, torch.cat([p.x for p in chunk]), torch.cat([p.sigma for p in chunk]),
                              conds, call)
            if "self" in call.captured:
                self._refine(call.captured["self"], step, images.cond)
                refine = False
            for group in rows.groups:
                outputs[(group.kind, group.index)] = out[group.rows]
        weights = self.plan.weights_for(x, images.all)
        kept = background_prediction(self.plan, self._to_x0(), x, sigma, images.all)   # mask-guided mixing
        blended = (outputs[("base", -1)] if kept is None else kept) * weights[0]
        for index in range(len(self.plan.concepts)):
            blended = blended + outputs[("concept", index)] * weights[index + 1]
        return blended

    def _kept(self, out, x, sigma, images: CallImages):
        """A plain call's prediction with the kept background outside every region."""
        return keep_outside(self.plan, self._to_x0(), out, x, sigma, images.all)

    # ---- refinement ---------------------------------------------------------------------

    def _refine_now(self, step: int, total_steps: int) -> bool:
        """Refinement steps: from the start step, every `refine_every`, before `refine_until`;
        once per step (second-order samplers call twice)."""
        o = self.plan.options
        start = self.plan.start_step(total_steps)
        if (not o.refine_every or self.plan.image_regions is None or step in self._refined_steps or
                step >= self.plan.refine_until_step(total_steps) or (step - start) % o.refine_every):
            return False
        self._refined_steps.add(step)
        return True

    def _refine(self, attention: torch.Tensor, step: int, images: tuple[int, ...]) -> None:
        """attention: (rows, n, n) base-row self-attention at the latent/4 grid, row i of image
        images[i] -> new auto masks for those images. The blend of this very call already used
        the old masks; the next calls use the new."""
        plan = self.plan
        grid = plan.regions.grid_for_tokens(attention.shape[-1])
        found = plan.found_masks
        current = torch.nn.functional.adaptive_avg_pool2d(found.float(), grid) > 0.5
        k = plan.options.refine_clusters or len(plan.concepts) + 2
        refined = found.float().clone()
        kept = torch.ones(found.shape[:2], dtype=torch.bool)
        for row, image in enumerate(images):
            mine = min(image, len(found) - 1)
            new = refine_masks(attention[row].cpu(), current[mine].float(), k)
            for slot in range(new.shape[0]):
                if torch.equal(new[slot], current[mine, slot].float()):
                    continue   # kept (contested, or its segment is its mask)
                kept[mine, slot] = False
                # back at the found masks' resolution, so growing and boxes keep their pixel precision
                refined[mine, slot] = torch.nn.functional.interpolate(
                    new[None, slot:slot + 1], size=tuple(found.shape[-2:]), mode="nearest")[0, 0]
        refined = self._finished(refined)
        refined[kept] = found.float()[kept]   # a kept mask stays as found, pixel for pixel (grown once)
        plan.mask_steps.append((f"refined at step {step + 1}", refined))
        plan.resolve_auto(refined)

    def _self_replay_tokens(self) -> int:
        """OMG replays self-attention in layers with <= (W/32)*(H/32) tokens: latent / 4."""
        h, w = self.plan.regions.grids[2]
        return h * w
