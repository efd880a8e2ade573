"""Regional sampling (LoRA-Composer, made cheap), host-independent: one pass of the host's
sampler in which every UNet call is the host's own, on the host's rows, and each concept acts
inside its region through the hooks (region-weighted LoRA deltas, region-aware cross-attention
over its own prompt, concept isolation in self-attention).

Steps before `start_step` are plain. With automatic regions they record the class words'
cross-attention; at the start step the masks are found (the host adds faces and SAM on the x0
prediction) and the concepts act from then on, in the same pass. With `reinit`, a probe call at
the first step (cond rows only) places each drawn concept's noise, and the pass starts over
from the re-initialised noise with the same ancestral noise.
"""

from __future__ import annotations

import contextlib

import torch

from ...auto.attention_maps import AttentionRecorder
from ...conds import cat_conds, override, rows_of
from ...errors import EngineError
from ...hooks.grad_pass import gradient_pass_patches
from ...plan import Conditioning, _fraction_to_step
from ..base import HostPass, SessionBase
from ..calls import CallImages
from .attention import make_regional_attention_forward, regional_attend
from .call import RegionalCall
from .enhance import PATIENCE, UNTIL, Capture, enhancement_loss, out_of_memory, step_size
from .lora import make_regional_lora_forward
from .reinit import box_of, reinitialise


class _Probed(Exception):
    """Raised out of the probe pass once the first call has placed the concepts' noise."""

    def __init__(self, noise: torch.Tensor):
        super().__init__("re-initialised")
        self.noise = noise


class RegionalSession(SessionBase):
    mode = "regional"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._grad_pass = gradient_pass_patches(self.unet)   # Forge's inference-mode weights, in-place adds (enhancement)
        self._context_layers = {layer for name, m in self.unet.named_modules() if name.endswith("attn2")
                                for layer in (getattr(m, "to_k", None), getattr(m, "to_v", None)) if layer is not None}
        self._enhance_losses: dict[int, float] = {}   # step -> loss (the guidance stops once it rises)
        self._enhance_stopped = False
        self.probe = None
        probed = [i for i, c in enumerate(self.plan.concepts) if c.class_tokens and c.mask is not None]
        if self.plan.options.reinit and probed:
            self._probed = probed
            self.probe = AttentionRecorder([self.plan.concepts[i].class_tokens for i in probed])
            self.add_recorder(self.probe)
        if self.recorder is not None and self.plan.start_step(1000) == 0 and self.plan.image_regions is None:
            raise EngineError("automatic regions in regional mode are found at start_at: it must be > 0")

    def _lora_forward(self, original, by_concept, module=None):
        return make_regional_lora_forward(original, by_concept, self.run, context_layer=module in self._context_layers)

    def _attention_forward(self, module, original):
        return make_regional_attention_forward(module, original, self.run)

    def _attend(self, q, k, v, heads, *, cross, decoder, host, module=None):
        return regional_attend(q, k, v, heads, self.run.call, cross=cross, host=host, module=module)

    # ---- the batch ------------------------------------------------------------------------

    def sample(self, host: HostPass) -> torch.Tensor:
        self._host = host
        noise = host.initial
        if self.probe is not None:
            noise = self._reinitialised(host)
            if host.interrupted():
                return noise
        with self.single_pass():
            return host.sample(noise)

    def _reinitialised(self, host: HostPass) -> torch.Tensor:
        try:
            with self._phase("probe"):
                host.sample(host.initial)
        except _Probed as probed:
            host.replay_noise()   # the same ancestral noise for the real pass
            return probed.noise.to(host.initial.device, host.initial.dtype)
        if host.interrupted():   # the host's sampler returned early: the user stopped the job
            return host.initial
        raise EngineError("latent re-initialisation: the sampler made no call with conditional rows")

    @contextlib.contextmanager
    def single_pass(self):
        """The one pass (also the hires fix's second pass, with `plan.at_size`)."""
        with self._phase("regional"):
            yield self

    @contextlib.contextmanager
    def _phase(self, phase: str):
        with self._patched(phase), self._recording_on():
            yield

    # ---- the denoiser call --------------------------------------------------------------

    def denoise(self, model_fn, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning, *,
                n_cond: int, step: int, total_steps: int, images: CallImages | None = None) -> torch.Tensor:
        images = self._check_images(x, n_cond, images)
        if self.phase == "probe":
            return self._probe_call(model_fn, x, sigma, cond, images)
        if self.phase != "regional":
            return model_fn(x, sigma, cond)
        self._check_size(x)
        plain = self._plain_until_start(model_fn, x, sigma, cond, images, step, total_steps)
        if plain is not None:
            return plain
        call = RegionalCall(self.plan, images.all, self._contexts(cond, images),
                            isolate=self._isolating(step, total_steps))
        out = self._model(model_fn, x, sigma, cond, call)
        if images.cond and self._enhancing(step, total_steps):
            n = len(images.cond)
            grad = self._enhance(model_fn, x[:n], sigma[:n], rows_of(cond, slice(0, n)), images.cond, step,
                                 total_steps)
            out = torch.cat([out[:n] - step_size(step, total_steps) * grad.to(out.dtype), out[n:]])
        return out

    def _isolating(self, step: int, total_steps: int) -> bool:
        o = self.plan.options
        return o.isolation and step < _fraction_to_step(o.isolation_until, total_steps)

    def _contexts(self, cond: Conditioning, images: CallImages) -> list[torch.Tensor]:
        """Each concept's context for the rows of this call: its prompt for the cond rows, its
        negative (or the host's) for the uncond rows, padded A1111-style to the longest of every
        concept's prompts and this call's, so a row's keys do not depend on how the host split
        its calls."""
        key, n = self.context_key, len(images.cond)
        main = {key: cond[key]}
        own = [c[key] for concept in self.plan.concepts for c in (concept.cond, concept.uncond) if c is not None]
        length = max(t.shape[1] for t in [cond[key], *own])
        contexts = []
        for concept in self.plan.concepts:
            blocks = []
            own_cond = None if concept.cond is None else {key: concept.cond[key]}
            own_uncond = None if concept.uncond is None else {key: concept.uncond[key]}
            if images.cond:
                blocks.append(override(rows_of(main, slice(0, n)), own_cond, images.cond))
            if images.uncond:
                blocks.append(override(rows_of(main, slice(n, None)), own_uncond, images.uncond))
            contexts.append(cat_conds(blocks, key, length)[key])
        return contexts

    # ---- concept enhancement -----------------------------------------------------------------

    def _enhancing(self, step: int, total_steps: int) -> bool:
        return (self.plan.options.enhance and not self._enhance_stopped and
                step < _fraction_to_step(UNTIL, total_steps) and
                any(c.own_class_tokens for c in self.plan.concepts))

    def _enhance(self, model_fn, x, sigma, cond, images: tuple[int, ...], step: int, total_steps: int) -> torch.Tensor:
        """The enhancement losses' gradient with respect to the cond rows' latent (see enhance.py)."""
        grid = self.plan.regions.grids[2]
        capture = Capture([c.own_class_tokens for c in self.plan.concepts], grid[0] * grid[1])
        call = RegionalCall(self.plan, list(images), self._contexts(cond, CallImages(images, ())),
                            isolate=self._isolating(step, total_steps), capture=capture)
        try:
            with torch.inference_mode(False), torch.enable_grad(), self._grad_pass:
                latent = x.detach().clone().requires_grad_(True)
                # normal copies of what the host made in inference mode: Forge multiplies the
                # output by the sigma it is given, which autograd then saves
                sigma, cond = sigma.clone(), {k: v.clone() for k, v in cond.items()}
                self.run.call = call
                try:
                    model_fn(latent, sigma, cond)
                finally:
                    self.run.call = None
                regions = (call.weights_at(grid, latent)[1:] > 0.5).float().transpose(0, 1)
                loss = enhancement_loss(capture, regions, grid)
                (grad,) = torch.autograd.grad(loss, latent)
        except Exception as exc:
            if out_of_memory(exc):
                raise EngineError("concept enhancement ran out of memory (it keeps one backward pass of the "
                                  "UNet): turn Concept enhancement off, or use a smaller image") from exc
            raise
        self.stats.enhance_rows += x.shape[0]
        value = float(loss)
        before = self._enhance_losses.get(step - 1)
        self._enhance_losses[step] = value
        if before is not None and value > before and step >= PATIENCE:
            self._enhance_stopped = True
        return grad.detach()

    # ---- latent re-initialisation -----------------------------------------------------------

    def _probe_call(self, model_fn, x, sigma, cond, images: CallImages) -> torch.Tensor:
        """The first call with cond rows: those rows only, the class words' attention recorded,
        the concepts' noise placed; then the probe pass stops."""
        n = len(images.cond)
        if not n:
            return self._model(model_fn, x, sigma, cond)
        self.probe.sums.clear()
        self.probe.counts.clear()
        self.probe.active, self.probe.images = True, images.cond
        try:
            self._model(model_fn, x[:n], sigma[:n], rows_of(cond, slice(0, n)))
        finally:
            self.probe.active = False
        self.stats.probe_rows += n
        regions = self.plan.regions
        maps = self.probe.maps(regions.latent_hw, regions.grids)
        noise = self._host.initial
        boxes = []
        for b in range(noise.shape[0]):
            weights = (self.plan.image_regions[min(b, len(self.plan.image_regions) - 1)] if self.plan.image_regions
                       else regions).latent
            boxes.append([box_of(weights[i + 1]) for i in self._probed])
        raise _Probed(reinitialise(noise.detach().cpu().float(), maps.float(), boxes))
