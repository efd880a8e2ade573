"""What every sampling method shares: the session's patches kept as data (applied and removed
in one place), the call bookkeeping, the automatic-region recorder and finding masks from it.

A method is a subclass that says how a concept's LoRA acts on a layer (`_lora_forward`), what
the attention modules do (`_attention_forward`, or `_attend` for hosts that hand over q, k, v),
how one host call is answered (`denoise`) and how a batch is sampled (`run`, given the host's
`HostPass`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..auto.attention_maps import AttentionRecorder
from ..auto.masks import box_cells, boxes_as_masks, masks_from_maps, stretch
from ..auto.postprocess import finish
from ..errors import EngineError
from ..hooks.attention import HostAttention, is_attention
from ..hooks.state import RunState
from ..lora.bind import bind_loras
from ..patcher import PatchSet
from ..plan import Plan
from .calls import CallImages, Stats
from .faces import add_face_patches, add_identity, face_batch
from .images.inversion import InversionCache
from .schedule import SamplerSchedule


@dataclass
class HostPass:
    """What a method needs from the host to sample one batch.

    sample(noise): one run of the host's sampler from this initial noise (its UNet calls come
    back through `denoise`); replay_noise(): the host's noise generator recreated, so another
    run gets the same initial and ancestral noise; interrupted(): the user stopped the job;
    find_regions(latents): automatic regions from these latents (the host adds faces and SAM;
    None: attention only); layout_done(latents): the layout pass finished (blend);
    layout_image(latents): what the regions were found on, for the save_layout outputs.
    Layout from a reference picture (conductor mode): reference, the picture's latent as the
    host's VAE encodes it (1, 4, h, w), at the generation's size; schedule, the noise levels the
    sampler will call the denoiser with (see schedule.py); latent_moved({image: x}): the method
    moved these images' latents (in the denoiser's input space, at the level of the call in
    flight): the host makes them the sampler's own latent once its denoiser call returns.
    Face concepts: find_faces(latents), the faces (boxes and keypoints) in these latents' images,
    where each face concept's keypoints go (None: in the upper part of its region)."""
    sample: Callable[[torch.Tensor], torch.Tensor]
    initial: torch.Tensor
    replay_noise: Callable[[], torch.Tensor]
    interrupted: Callable[[], bool] = lambda: False
    find_regions: Callable[[torch.Tensor], None] | None = None
    layout_done: Callable[[torch.Tensor], None] = lambda latents: None
    layout_image: Callable[[torch.Tensor], None] = lambda latents: None
    to_x0: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None   # (x, out, sigma) -> x0
    reference: torch.Tensor | None = None
    schedule: SamplerSchedule | None = None
    latent_moved: Callable[[dict[int, torch.Tensor]], None] | None = None
    find_faces: Callable[[torch.Tensor], list] | None = None   # latents -> per image the faces in them (face concepts)


class SessionBase:
    mode = ""
    acts_on_attention_output = False   # the host must route attention outputs to `attention_output`

    def __init__(self, unet: nn.Module, plan: Plan, *, context_key: str = "c_crossattn", warn=print,
                 attention_on_modules: bool = True, inversions: InversionCache | None = None):
        """attention_on_modules: install the attention hooks on the UNet's attention modules
        (A1111). False: the host routes its attention through `attention()` itself (Forge's
        attention replace patches). inversions: pictures already inverted in this job (the hosts
        make a session per batch; a picture is inverted once per job)."""
        self.unet, self.plan, self.context_key = unet, plan, context_key
        self.inversions = inversions if inversions is not None else InversionCache()
        self.run = RunState()
        self.patches = PatchSet()
        self.stats = Stats()
        self.phase: str | None = None
        self.attention_on_modules = attention_on_modules
        self.run.decoder_self_attention = {m for name, m in unet.named_modules()
                                           if name.endswith("attn1") and ("output_blocks" in name or "up_blocks" in name)}
        self._prepare_patches(warn)   # raises LoraMismatchError before anything is touched
        self.faces = face_batch(plan)   # face concepts' rows, tokens and keypoint hints per call
        # automatic regions: the class words' cross-attention is recorded while the plain prompt samples
        auto = [plan.concepts[i] for i in plan.auto_concepts]
        self.recorder = AttentionRecorder([c.auto_tokens for c in auto], _tokens_per_image(auto)) if auto else None
        self.recorders: list[AttentionRecorder] = []
        self.record_patches = PatchSet()
        self._host: HostPass | None = None
        self._x0: dict[int, torch.Tensor] = {}   # image -> the latest x0 prediction of its cond row
        if self.recorder is not None:
            self.add_recorder(self.recorder)

    def add_recorder(self, recorder: AttentionRecorder) -> None:
        """Record cross-attention with this recorder whenever it is active and no engine call is in flight."""
        self.recorders.append(recorder)
        if self.attention_on_modules:
            for module in self.unet.modules():
                if is_attention(module):
                    self.record_patches.add(module, "forward",
                                            lambda original, module=module: recorder.make_forward(module, original))

    # ---- what a method says -------------------------------------------------------------

    def _lora_forward(self, original, by_concept: dict[int, list]):
        raise NotImplementedError

    def _attention_forward(self, module, original):
        raise NotImplementedError

    def _attend(self, q, k, v, heads, *, cross: bool, decoder: bool, host: HostAttention, module=None):
        return host(q, k, v)

    def denoise(self, model_fn, x, sigma, cond, *, n_cond: int, step: int, total_steps: int,
                images: CallImages | None = None) -> torch.Tensor:
        raise NotImplementedError

    def sample(self, host: HostPass) -> torch.Tensor:
        raise NotImplementedError

    # ---- shared --------------------------------------------------------------------------

    def _prepare_patches(self, warn) -> None:
        ops: dict[nn.Module, dict[int, list]] = {}
        for index, concept in enumerate(self.plan.concepts):
            for module, module_ops in bind_loras(self.unet, concept.loras, warn).items():
                ops.setdefault(module, {})[index] = module_ops
        for module, by_concept in ops.items():
            self.patches.add(module, "forward",
                             lambda original, module=module, by_concept=by_concept: self._lora_forward(original, by_concept, module))
        if self.attention_on_modules:
            for module in self.unet.modules():
                if is_attention(module):
                    self.patches.add(module, "forward",
                                     lambda original, module=module: self._attention_forward(module, original))
        # face concepts: identity attention (outside the method's own) and the IdentityNet's residuals
        self._identity_weights = add_face_patches(self.patches, self.unet, self.plan, self.run, self.attention_on_modules)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, *, cross: bool,
                  decoder: bool, host: HostAttention, module=None) -> torch.Tensor:
        """For hosts that hand over projected q, k, v: the attention of this call in this phase.
        `host(q, k, v)` is the host's own attention; `decoder`: a self-attention of the UNet's
        output blocks; `module`: the attention module these came from (needed where a method
        projects another context)."""
        if self.run.call is None:
            out = host(q, k, v)
            if cross:
                self._record_cross(q, k, heads)
            return out
        out = self._attend(q, k, v, heads, cross=cross, decoder=decoder, host=host, module=module)
        if cross and self._identity_weights:   # face concepts' rows: InstantID's identity attention
            out = add_identity(out, q, self.run.call, self._identity_weights.get(module), host)
        return out

    def _record_cross(self, q: torch.Tensor, k: torch.Tensor, heads: int) -> None:
        """A cross-attention's q and k (hosts that hand them over) for every recorder that wants it."""
        for recorder in self.recorders:
            if recorder.wants(k.shape[1]):
                n = len(recorder.images)
                recorder.record(q[:n], k[:n], heads)

    def attention_output(self, out: torch.Tensor, *, layer, decoder: bool) -> torch.Tensor:
        """For hosts that apply to_out themselves (Forge): an attention layer's output after
        to_out, before the residual add; `layer` names the layer alike in every call."""
        return out

    @contextlib.contextmanager
    def _recording(self):
        """The plain prompt samples while the class words' cross-attention is recorded."""
        self.phase = "record"
        if self.recorder is not None:
            self.recorder.sums.clear()
            self.recorder.counts.clear()
            self.record_patches.apply()
        try:
            yield
        finally:
            self.record_patches.remove()
            if self.recorder is not None:
                self.recorder.active = False
            self.phase = None

    @contextlib.contextmanager
    def _recording_on(self):
        """Every recorder may record while the method's patches are on (one-pass methods)."""
        self.record_patches.apply()
        try:
            yield
        finally:
            self.record_patches.remove()
            for recorder in self.recorders:
                recorder.active = False

    @contextlib.contextmanager
    def _patched(self, phase: str):
        """The method's LoRA and attention patches on for this phase; off again whatever happens."""
        self.phase = phase
        self.patches.apply()
        try:
            yield
        finally:
            self.run.call = None
            self.patches.remove()
            self.phase = None

    @staticmethod
    def _check_images(x: torch.Tensor, n_cond: int, images: CallImages | None) -> CallImages:
        if images is None:
            images = CallImages.batched(n_cond, x.shape[0])
        if len(images.cond) != n_cond or len(images.cond) + len(images.uncond) != x.shape[0]:
            raise EngineError(f"a call of {x.shape[0]} rows ({n_cond} cond) was labelled with images {images}")
        return images

    def _check_size(self, x: torch.Tensor) -> None:
        if tuple(x.shape[-2:]) != self.plan.regions.latent_hw:
            raise EngineError(f"latent {tuple(x.shape[-2:])} does not match the plan's "
                              f"{self.plan.regions.latent_hw} (image {self.plan.image_size})")

    def _model(self, model_fn, x, sigma, cond, call=None) -> torch.Tensor:
        self.stats.unet_calls += 1
        self.stats.unet_rows += x.shape[0]
        self.run.call = call
        try:
            return model_fn(x, sigma, cond)
        finally:
            self.run.call = None

    # ---- automatic regions ---------------------------------------------------------------

    def _plain_until_start(self, model_fn, x, sigma, cond, images: CallImages, step: int,
                           total_steps: int) -> torch.Tensor | None:
        """One-pass methods: a call before the start step is the host's own (None from the start
        step on). With automatic regions those calls record the class words' cross-attention and
        keep the x0 prediction; at the start step the masks are found (the host adds faces and SAM).
        Face concepts keep the x0 prediction too: their faces are placed on it at the start step."""
        auto_pending = self.recorder is not None and self.plan.image_regions is None
        faces_pending = self.faces is not None and self.plan.face_kps is None
        if step < self.plan.start_step(total_steps):
            if not (auto_pending or faces_pending):
                return self._model(model_fn, x, sigma, cond)
            if auto_pending:
                self.recorder.active, self.recorder.images = True, images.cond
            out = self._model(model_fn, x, sigma, cond)
            self._keep_x0(x, sigma, out, images)
            return out
        if auto_pending:
            self.recorder.active = False
            self._find_now()
        if faces_pending:   # the faces of the x0 prediction so far (none kept: from the first step)
            self._place_faces(torch.stack([self._x0[b] for b in sorted(self._x0)]) if self._x0 else None)
        return None

    def _place_faces(self, latents: torch.Tensor | None) -> None:
        """Face concepts: their keypoints go where the layout (these latents) has a face in their
        region, else in the upper part of it."""
        if self.faces is None:
            return
        host = self._host
        found = host.find_faces(latents) if host is not None and host.find_faces is not None and latents is not None \
            else None
        self.faces.place(found)

    def _to_x0(self):
        """The host's (x, out, sigma) -> x0 for this batch; None: the output is x0 already."""
        return self._host.to_x0 if self._host is not None else None

    def _keep_x0(self, x, sigma, out, images: CallImages) -> None:
        to_x0 = self._to_x0()
        for row, image in enumerate(images.cond):
            self._x0[image] = (to_x0(x[row:row + 1], out[row:row + 1], sigma[row:row + 1])[0] if to_x0 is not None
                               else out[row]).detach()

    def _find_now(self) -> None:
        host = self._host
        if host is not None and host.find_regions is not None and self._x0:
            latents = torch.stack([self._x0[b] for b in sorted(self._x0)])
            host.layout_image(latents)
            host.find_regions(latents)
        else:
            self.find_regions()

    def find_regions(self, faces=None, finish: bool = True, image_boxes=None) -> torch.Tensor:
        """The automatic concepts' masks from the recorded attention, per image, into the plan.
        faces[b]: face boxes of image b in latent cells, to split people who share a word.
        image_boxes[b][i]: where automatic concept i is in image b (Grounding DINO's boxes; a drawn
        box stays the concept's own), (x, y, w, h) fractions or None.
        finish=False: the host refines them (SAM) and calls `finish_regions` itself."""
        regions = self.plan.regions
        if not self.recorder.sums:
            raise EngineError("automatic regions: no cross-attention was recorded "
                              "(is the recording window empty? auto_from or start_at too close to its limit)")
        maps = self.recorder.maps(regions.latent_hw, regions.grids)
        auto = [self.plan.concepts[i] for i in self.plan.auto_concepts]
        found = masks_from_maps(maps, [c.auto_group for c in auto], hints=[c.auto_hint for c in auto], faces=faces,
                                boxes=[c.auto_box for c in auto], image_boxes=image_boxes)
        self.plan.mask_steps = [("attention", stretch(maps))]
        if image_boxes is not None:
            self.plan.mask_steps.append(("DINO boxes", boxes_as_masks(image_boxes, maps.shape[-2:])))
        self.plan.mask_steps.append(("attention masks", found))
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


def _tokens_per_image(auto: list) -> list[list[list[int]]] | None:
    """[image][automatic concept] -> class-word positions, when a batch's prompts put them apart."""
    images = max((len(c.auto_tokens_per_image) for c in auto if c.auto_tokens_per_image), default=0)
    if not images:
        return None
    return [[(c.auto_tokens_per_image[min(b, len(c.auto_tokens_per_image) - 1)] if c.auto_tokens_per_image
              else c.auto_tokens) for c in auto] for b in range(images)]
