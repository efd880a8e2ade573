"""Two-stage multi-concept sampling (OMG), host-independent.

A host runs its sampler twice with identical noise and routes every denoiser call through
`session.denoise(model_fn, x, sigma, cond, n_cond=..., step=..., total_steps=..., images=...)`,
where `model_fn(x, sigma, cond)` is its own inner model (k-diffusion wrapper or eps model), the
rows of `x` are [cond rows, uncond rows], `step` counts the host's CFG evaluations (unique per
evaluation) and `images` says which image of the batch each row is (default: rows i and
n_cond + i are image i).

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
from torch import nn

from .auto.attention_maps import AttentionRecorder
from .auto.masks import box_cells, masks_from_maps, stretch
from .auto.postprocess import finish
from .auto.refine import refine_masks
from .errors import EngineError
from .hooks.attention import HostAttention, attend, is_attention, make_attention_forward
from .hooks.lora_rows import make_lora_forward
from .hooks.state import CallState, RunState
from .lora.bind import bind_loras
from .patcher import PatchSet
from .plan import Conditioning, Plan
from .rows import RowGroup, RowPlan


@dataclass
class Recorded:
    """One row of one stage-1 evaluation."""
    x: torch.Tensor
    sigma: torch.Tensor
    out: torch.Tensor


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

    def reset(self):
        self.unet_calls = self.unet_rows = self.replayed_calls = 0


@dataclass
class _Part:
    group: RowGroup
    x: torch.Tensor
    sigma: torch.Tensor
    conds: list[Conditioning]   # row blocks (cond, uncond); contexts may differ in length


class MultiConceptSession:
    def __init__(self, unet: nn.Module, plan: Plan, *, context_key: str = "c_crossattn", warn=print,
                 attention_on_modules: bool = True):
        """attention_on_modules: install the attention hooks on the UNet's attention modules
        (A1111). False: the host routes its attention through `attention()` itself (Forge's
        attention replace patches)."""
        self.unet, self.plan, self.context_key = unet, plan, context_key
        self.run = RunState()
        self.patches = PatchSet()
        self.records: dict[int, dict[tuple[bool, int], Recorded]] = {}   # evaluation -> (cond?, image) -> row
        self.stats = Stats()
        self.phase: str | None = None
        self._prepare_patches(warn, attention_on_modules)   # raises LoraMismatchError before anything is touched
        # automatic regions: stage 1 also records the class words' cross-attention
        auto = [plan.concepts[i] for i in plan.auto_concepts]
        self.recorder = AttentionRecorder([c.auto_tokens for c in auto], _tokens_per_image(auto)) if auto else None
        self.record_patches = PatchSet()
        self._refined_steps: set[int] = set()
        self.run.decoder_self_attention = {m for name, m in unet.named_modules()
                                           if name.endswith("attn1") and ("output_blocks" in name or "up_blocks" in name)}
        if self.recorder is not None and attention_on_modules:
            for module in unet.modules():
                if is_attention(module):
                    self.record_patches.add(module, "forward",
                                            lambda original, module=module: self.recorder.make_forward(module, original))

    def _prepare_patches(self, warn, attention_on_modules: bool) -> None:
        ops: dict[nn.Module, dict[int, list]] = {}
        for index, concept in enumerate(self.plan.concepts):
            for module, module_ops in bind_loras(self.unet, concept.loras, warn).items():
                ops.setdefault(module, {})[index] = module_ops
        for module, by_concept in ops.items():
            self.patches.add(module, "forward",
                             lambda original, by_concept=by_concept: make_lora_forward(original, by_concept, self.run))
        if not attention_on_modules:
            return
        for module in self.unet.modules():
            if is_attention(module):
                self.patches.add(module, "forward",
                                 lambda original, module=module: make_attention_forward(module, original, self.run))

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, *, cross: bool,
                  decoder: bool, host: HostAttention) -> torch.Tensor:
        """For hosts that hand over projected q, k, v: the attention of this call in this phase.
        `host(q, k, v)` is the host's own attention; `decoder`: a self-attention of the UNet's
        output blocks (where refinement reads the layout)."""
        if self.phase == "record":
            out = host(q, k, v)
            recorder = self.recorder
            if cross and recorder is not None and recorder.wants(k.shape[1]):
                n = len(recorder.images)
                recorder.record(q[:n], k[:n], heads)
            return out
        call = self.run.call
        if self.phase not in ("blend", "single") or call is None:
            return host(q, k, v)
        return attend(q, k, v, heads, call, cross=cross, decoder=decoder, host=host)

    # ---- stages -------------------------------------------------------------------------

    @contextlib.contextmanager
    def stage1(self):
        self.records.clear()
        self.phase = "record"
        if self.recorder is not None:
            self.recorder.sums.clear()
            self.record_patches.apply()
        try:
            yield self
        finally:
            self.record_patches.remove()
            if self.recorder is not None:
                self.recorder.active = False
            self.phase = None

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

    @contextlib.contextmanager
    def _patched(self, phase: str):
        """The LoRA and attention patches on for this phase; off again whatever happens."""
        self.phase = phase
        self.patches.apply()
        try:
            yield
        finally:
            self.run.call = None
            self.patches.remove()
            self.phase = None

    # ---- the denoiser call --------------------------------------------------------------

    def denoise(self, model_fn, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning, *,
                n_cond: int, step: int, total_steps: int, images: CallImages | None = None) -> torch.Tensor:
        if images is None:
            images = CallImages.batched(n_cond, x.shape[0])
        if len(images.cond) != n_cond or len(images.cond) + len(images.uncond) != x.shape[0]:
            raise EngineError(f"a call of {x.shape[0]} rows ({n_cond} cond) was labelled with images {images}")
        if self.phase == "record":
            if self.recorder is not None:
                self.recorder.active = step >= self.plan.auto_from_step(total_steps)
                self.recorder.images = images.cond
            out = self._model(model_fn, x, sigma, cond)
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

    def _model(self, model_fn, x, sigma, cond, call: CallState | None = None) -> torch.Tensor:
        self.stats.unet_calls += 1
        self.stats.unet_rows += x.shape[0]
        self.run.call = call
        try:
            return model_fn(x, sigma, cond)
        finally:
            self.run.call = None

    def _blend_call(self, model_fn, x, sigma, cond, images: CallImages, layout_x, step, total_steps) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.plan.regions.latent_hw:
            raise EngineError(f"latent {tuple(x.shape[-2:])} does not match the plan's "
                              f"{self.plan.regions.latent_hw} (image {self.plan.image_size})")
        parts = self._parts(x, sigma, cond, images, layout_x)
        outputs: dict[tuple[str, int], torch.Tensor] = {}
        replay_self = step < self.plan.self_replay_until_step(total_steps)
        refine = bool(images.cond) and self._refine_now(step, total_steps)
        for chunk in self._chunks(parts):
            rows = RowPlan()
            for part in chunk:
                rows.add(part.group.kind, part.group.n_cond, part.group.n_uncond, part.group.index)
            conds = self._cat_conds([block for p in chunk for block in p.conds], [b for p in parts for b in p.conds])
            call = CallState(rows, replay_cross=self.plan.options.layout_replay,
                             replay_self_max_tokens=self._self_replay_tokens() if replay_self else 0,
                             capture_self_tokens=self._self_replay_tokens() if refine else 0)
            out = self._model(model_fn, torch.cat([p.x for p in chunk]), torch.cat([p.sigma for p in chunk]),
                              conds, call)
            if "self" in call.captured:
                self._refine(call.captured["self"], step, images.cond)
                refine = False
            for group in rows.groups:
                outputs[(group.kind, group.index)] = out[group.rows]
        weights = self.plan.weights_for(x, images.all)
        blended = outputs[("base", -1)] * weights[0]
        for index in range(len(self.plan.concepts)):
            blended = blended + outputs[("concept", index)] * weights[index + 1]
        return blended

    def find_regions(self, faces=None, finish: bool = True) -> torch.Tensor:
        """The automatic concepts' masks from stage 1's attention, per image, into the plan.
        faces[b]: face boxes of image b in latent cells, to split people who share a word.
        finish=False: the host refines them (SAM) and calls `finish_regions` itself."""
        regions = self.plan.regions
        if not self.recorder.sums:
            raise EngineError("automatic regions: the layout pass recorded no cross-attention "
                              "(is the recording window empty? auto_from too close to 1)")
        maps = self.recorder.maps(regions.latent_hw, regions.grids)
        auto = [self.plan.concepts[i] for i in self.plan.auto_concepts]
        found = masks_from_maps(maps, [c.auto_group for c in auto], hints=[c.auto_hint for c in auto], faces=faces,
                                boxes=[c.auto_box for c in auto])
        self.plan.mask_steps = [("attention", stretch(maps)), ("attention masks", found)]
        self.plan.face_boxes = faces
        return self.finish_regions(found) if finish else found

    def finish_regions(self, masks: torch.Tensor, found_by: str | None = None) -> torch.Tensor:
        """Clean up and grow/shrink (options.auto_grow) found masks, then into the plan.
        found_by: a label for the save_layout outputs when these masks are a new step (e.g. SAM)."""
        plan = self.plan
        if found_by:
            plan.mask_steps.append((found_by, masks))
        grow_px = plan.options.auto_grow
        finished = self._finished(masks)
        if not torch.equal(finished, masks.float()):
            plan.mask_steps.append((f"cleaned, grown {grow_px:+g} px" if grow_px else "cleaned", finished))
        plan.resolve_auto(finished)
        return finished

    def _finished(self, masks: torch.Tensor) -> torch.Tensor:
        """Cleaned, grown by options.auto_grow (image px at the masks' resolution), clipped to boxes."""
        px_per_cell = self.plan.image_size[0] / masks.shape[-2]
        return self._clip_to_boxes(finish(masks, self.plan.options.auto_grow, px_per_cell=px_per_cell))

    def _clip_to_boxes(self, masks: torch.Tensor) -> torch.Tensor:
        """A concept searched in a drawn box never leaves it (SAM, growing or refinement may
        reach out); one left empty takes the box cells no other concept holds."""
        for slot, index in enumerate(self.plan.auto_concepts):
            box = self.plan.concepts[index].auto_box
            if box is None:
                continue
            inside = box_cells(box, tuple(masks.shape[-2:])).to(masks.dtype)
            masks[:, slot] *= inside
            for b in range(masks.shape[0]):
                if masks[b, slot].sum() == 0:
                    others = masks[b].sum(0).clamp(max=1)
                    masks[b, slot] = inside * (1 - others)
                    if masks[b, slot].sum() == 0:   # the box is all taken: share it
                        masks[b, slot] = inside
        return masks

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

    # ---- batch assembly -----------------------------------------------------------------

    def _parts(self, x, sigma, cond, images: CallImages, layout_x) -> list[_Part]:
        def rows(c: Conditioning, sl: slice) -> Conditioning:
            return {k: v[sl] for k, v in c.items()}

        n_cond, n_uncond = len(images.cond), len(images.uncond)
        cond_rows, uncond_rows = slice(0, n_cond), slice(n_cond, n_cond + n_uncond)
        parts = []
        if self.plan.options.layout_replay and n_cond:
            parts.append(_Part(RowGroup("layout", -1, 0, n_cond, 0), layout_x, sigma[cond_rows],
                               [rows(cond, cond_rows)]))
        parts.append(_Part(RowGroup("base", -1, 0, n_cond, n_uncond), x, sigma, [cond]))
        for index, concept in enumerate(self.plan.concepts):
            blocks = []
            if n_cond:
                blocks.append(_override(rows(cond, cond_rows), concept.cond, images.cond))
            if n_uncond:
                blocks.append(_override(rows(cond, uncond_rows), concept.uncond, images.uncond))
            parts.append(_Part(RowGroup("concept", index, 0, n_cond, n_uncond), x, sigma, blocks))
        return parts

    def _chunks(self, parts: list[_Part]) -> list[list[_Part]]:
        """Layout and base rows share a call (replay reads across them); concepts fill up to the cap."""
        limit = self.plan.options.max_rows_per_call
        head = 2 if parts[0].group.kind == "layout" else 1
        chunks = [parts[:head]]
        for part in parts[head:]:
            size = sum(p.group.size for p in chunks[-1])
            if limit is not None and size + part.group.size > limit and size > 0:
                chunks.append([])
            chunks[-1].append(part)
        return chunks

    def _cat_conds(self, conds: list[Conditioning], pad_like: list[Conditioning] = ()) -> Conditioning:
        """Stack conditioning rows. Contexts shorter than the longest of `conds`, `pad_like` (the
        whole host call) and every concept's own prompts are padded as A1111 stacks prompts of
        different lengths (prompt_parser.stack_conds: the last vector repeated), so every row is an
        ordinary prompt to the host's attention and other extensions' patches, and a row's
        padding does not depend on how the rows are split into calls."""
        keys = conds[0].keys()
        for c in conds[1:]:
            if c.keys() != keys:
                raise EngineError(f"conditioning keys differ between branches: {sorted(keys)} vs {sorted(c.keys())}")
        own = [c for concept in self.plan.concepts for c in (concept.cond, concept.uncond) if c is not None]
        length = max((c[self.context_key].shape[1] for c in [*conds, *pad_like, *own] if self.context_key in c),
                     default=0)
        stacked = {}
        for key in keys:
            tensors = [c[key] for c in conds]
            if key == self.context_key:
                tensors = [torch.cat([t, t[:, -1:].expand(-1, length - t.shape[1], -1)], 1) for t in tensors]
            try:
                stacked[key] = torch.cat(tensors)
            except RuntimeError as exc:
                raise EngineError(f"conditioning '{key}' has different shapes between branches: "
                                  f"{[tuple(t.shape) for t in tensors]}") from exc
        return stacked


def _tokens_per_image(auto: list) -> list[list[list[int]]] | None:
    """[image][automatic concept] -> class-word positions, when a batch's prompts put them apart."""
    images = max((len(c.auto_tokens_per_image) for c in auto if c.auto_tokens_per_image), default=0)
    if not images:
        return None
    return [[(c.auto_tokens_per_image[min(b, len(c.auto_tokens_per_image) - 1)] if c.auto_tokens_per_image
              else c.auto_tokens) for c in auto] for b in range(images)]


def _override(rows: Conditioning, own: Conditioning | None, images: tuple[int, ...]) -> Conditioning:
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
