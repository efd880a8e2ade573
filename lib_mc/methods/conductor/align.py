"""Layout alignment to a reference picture (Concept Conductor): the pure parts (inversion, loss,
step size) and `LayoutAlignment`, which runs them inside a conductor session's host calls.

- Inversion (images/inversion.py, shared with image concepts): the reference's latent is taken
  up the sampler's own noise levels with DDIM under the main prompt (cond rows, no CFG): from
  the clean latent to the lowest level with the noise predicted there, then at every level the
  UNet is evaluated on the inverted latent, its noise moves it to the next level, and the
  alignment layer's self-attention keys of that evaluation are kept: the reference's keys at exactly the levels the sampler visits (steps + 1
  evaluations).
- Alignment: during the first `align_until` of the steps, before the host's call, the latent is
  moved by gradient descent on the keys' MSE to the reference's at the nearest inverted level,
  summed over images, for the base branch plus the mean over the concept branches (the official
  code's weighting, for which its step sizes 10 / 40 were chosen); the step is taken on the
  UNet's unit-variance input, as the paper's latents are, so a sigma-space latent moves by
  step * (alpha^2 + beta^2) * grad. Each branch's forward stops at the alignment layer: its
  backward covers the encoder, the middle and the first decoder blocks only.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.utils.checkpoint

from ...errors import EngineError
from ...hooks.grad_pass import gradient_pass_patches
from ...patcher import PatchSet
from ...plan import _fraction_to_step
from ...rows import RowPlan
from ..branches import branch_parts, row_plan, stacked_conds
from ..calls import CallImages
from ..images.inversion import invert_levels
from ..schedule import SamplerSchedule
from .call import ConductorCall
from .layers import alignment_layer, is_sdxl_like

PAPER_STEP = {"sd": 10.0, "sdxl": 40.0}


@dataclass
class AlignCall(ConductorCall):
    """An inversion or alignment call: the branch rows' LoRAs and prompts, no injection (the
    official code computes each branch's keys on its own). stop: raise KeysCaptured once the
    alignment layer's keys are taken (nothing after it is needed)."""
    stop: bool = False
    keys: torch.Tensor | None = None

    def base_weights(self, n_tokens, like):
        return None


class KeysCaptured(Exception):
    """Raised out of the UNet at the alignment layer (its keys are on the call)."""


@dataclass
class Reference:
    """The inverted reference of one batch: keys[level] = (cond rows of the inversion, tokens, channels)."""
    latent: torch.Tensor                                  # (1, 4, h, w), the VAE latent
    schedule: SamplerSchedule
    keys: dict[float, torch.Tensor] = field(default_factory=dict)
    images: tuple[int, ...] = ()                           # the batch image of each row of the keys
    top: torch.Tensor | None = None                        # the latent at the highest level (tests)

    def keys_at(self, level: float, images) -> torch.Tensor:
        nearest = self.schedule.nearest(level, self.keys)
        rows = [self.images.index(b) for b in images]
        return self.keys[nearest][rows]


def kept_levels(schedule: SamplerSchedule, until: float) -> set[float]:
    """The levels whose keys alignment can ask for: the highest round(until * steps) + 1."""
    levels = sorted((float(v) for v in schedule.levels), reverse=True)
    count = min(len(levels), int(round(until * len(levels))) + 1)
    return set(levels[:count])


def invert(evaluate, reference: Reference, to_x0, keep: set[float]) -> None:
    """evaluate(x, level, capture) -> (the denoiser's output on the cond rows at that level, the
    keys when capture); to_x0(x, out, level) -> x0. Fills reference.keys for `keep` (the
    inversion itself is the shared one, images/inversion.py)."""
    rows = len(reference.images)

    def on_levels(x, level, on_path):
        out, keys = evaluate(x, level, on_path and level in keep)
        if keys is not None:
            reference.keys[level] = keys
        return out
    inverted = invert_levels(on_levels, reference.latent.expand(rows, -1, -1, -1), reference.schedule, to_x0)
    reference.top = inverted[max(inverted)]


def key_loss(keys: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-row MSE over tokens and channels, summed over rows (each image moves on its own)."""
    diff = keys.float() - reference.to(keys.device).float()
    return diff.pow(2).flatten(1).mean(1).sum()


def step_size(option: float, sdxl: bool) -> float:
    return float(option) if option else PAPER_STEP["sdxl" if sdxl else "sd"]


def out_of_memory_error(exc: BaseException) -> EngineError | None:
    if isinstance(exc, getattr(torch.cuda, "OutOfMemoryError", ())) or "out of memory" in str(exc).lower():
        return EngineError("layout alignment ran out of memory (it keeps one backward pass of the UNet's first "
                           "half per branch): lower align_until, leave out the reference picture, or use a "
                           "smaller image")
    return None


def layout_alignment(session, host) -> "LayoutAlignment | None":
    """The batch's alignment when the host gives a reference picture and it is used: keys for
    align_until > 0, or automatic regions to find in it."""
    if host.reference is None:
        return None
    finding = session.recorder is not None and session.plan.image_regions is None
    return LayoutAlignment(session, host) if session.plan.options.align_until > 0 or finding else None


class LayoutAlignment:
    """One batch's layout alignment in a conductor session (see the module's docstring): the
    reference inverted at the first host call with cond rows, then the latent moved before each
    host call of the alignment window."""

    def __init__(self, session, host):
        plan = session.plan
        if host.schedule is None:
            raise EngineError("layout alignment: the host did not say which noise levels its sampler uses")
        latent = host.reference
        if latent.dim() != 4 or latent.shape[0] != 1 or tuple(latent.shape[-2:]) != plan.regions.latent_hw:
            raise EngineError(f"layout alignment: the reference latent {tuple(latent.shape)} does not match the "
                              f"generation's latent {plan.regions.latent_hw} (image {plan.image_size})")
        self.session, self.host, self.schedule = session, host, host.schedule
        self.name, self.module = alignment_layer(session.unet)
        self.checkpointed = checkpointed_blocks(session.unet, self.module)
        self.grad_pass = gradient_pass_patches(session.unet)   # Forge's inference-mode weights, in-place adds
        self.until = plan.options.align_until
        self.step_size = step_size(plan.options.align_step, is_sdxl_like(session.unet))
        self.keep = kept_levels(self.schedule, self.until) if self.until > 0 else set()
        self.references: dict[int, Reference] = {}   # batch image -> its inverted reference (keys under its prompt)
        self.moved: tuple[int, dict[int, torch.Tensor]] | None = None   # (step, image -> moved latent)

    @contextlib.contextmanager
    def _watching(self):
        """The alignment layer watched during the engine's own calls only (A1111 projects q and k
        for a watched layer)."""
        watchers = self.session._watchers
        watchers[self.module] = self._watch
        try:
            yield
        finally:
            watchers.pop(self.module, None)

    def _watch(self, q, k, heads, call) -> None:
        if isinstance(call, AlignCall):
            call.keys = k if call.stop else k.detach()
            if call.stop:
                raise KeysCaptured(self.name)

    # ---- per host call ------------------------------------------------------------------------

    def before_call(self, model_fn, x, sigma, cond, images: CallImages, step: int, total_steps: int) -> torch.Tensor:
        """The latent this host call is answered for: inverted first (once per image), moved at
        the first call of an alignment step that has cond rows, the moved rows reused by the
        step's later calls (a host that splits cond and uncond)."""
        missing = [b for b in dict.fromkeys(images.cond) if b not in self.references]
        if missing:
            self._invert(model_fn, x, sigma, cond, images, missing)
        if images.cond and step < _fraction_to_step(self.until, total_steps) and \
                not (self.moved and self.moved[0] == step and all(b in self.moved[1] for b in images.cond)):
            self._align(model_fn, x, sigma, cond, images, step)
        if self.moved is None or self.moved[0] != step:
            return x
        moved = self.moved[1]
        rows = [(row, b) for row, b in enumerate(images.all) if b in moved]
        if not rows:
            return x
        x = x.clone()
        for row, b in rows:
            x[row] = moved[b].to(x.dtype)
        return x

    # ---- inversion -----------------------------------------------------------------------------

    def _invert(self, model_fn, x, sigma, cond, images: CallImages, missing: list[int]) -> None:
        session, plan = self.session, self.session.plan
        picks = [images.cond.index(b) for b in missing]
        index = torch.tensor(picks, device=x.device)
        own = {k: v[index] for k, v in cond.items()}
        conds = stacked_conds(plan, session.context_key, [own], [own])   # padded as the branch calls pad
        rows = RowPlan()
        rows.add("base", len(missing), 0)
        recorder = session.recorder if plan.image_regions is None else None
        if recorder is not None:
            recorder.active, recorder.images = True, tuple(missing)
        reference = Reference(self.host.reference.to(x.device, x.dtype), self.schedule, images=tuple(missing))

        def evaluate(xx, level, capture):
            call = AlignCall(rows, plan=plan, images=list(missing))
            levels = torch.full((len(missing),), float(level), dtype=sigma.dtype, device=sigma.device)
            session.run.call = call
            try:
                out = model_fn(xx.to(x.dtype), levels, conds)
            finally:
                session.run.call = None
            session.stats.invert_rows += len(missing)
            if capture and call.keys is None:
                raise EngineError(f"layout alignment: the inversion never reached the alignment layer {self.name}")
            return out, (call.keys if capture else None)

        to_x0 = self.host.to_x0 or (lambda xx, out, s: out)

        def x0_of(xx, out, level):
            return to_x0(xx, out, torch.full((xx.shape[0],), float(level), dtype=sigma.dtype, device=sigma.device))
        try:
            with self._watching():
                invert(evaluate, reference, x0_of, self.keep)
        finally:
            if recorder is not None:
                recorder.active = False
        for row, b in enumerate(missing):
            self.references[b] = Reference(reference.latent, self.schedule,
                                           {lvl: k[row:row + 1] for lvl, k in reference.keys.items()}, (b,),
                                           reference.top[row:row + 1])
        if recorder is not None:
            # automatic regions: found in the reference, from the class words' attention while it was inverted
            session._x0 = {b: reference.latent[0] for b in missing}
            session._find_now()

    # ---- alignment -----------------------------------------------------------------------------

    def _align(self, model_fn, x, sigma, cond, images: CallImages, step: int) -> None:
        session, plan = self.session, self.session.plan
        n = len(images.cond)
        cond_rows = {k: v[:n] for k, v in cond.items()}
        parts = branch_parts(plan, x[:n], sigma[:n], cond_rows, CallImages(images.cond, ()))
        pad_like = [block for p in parts for block in p.conds]
        concepts = max(1, len(parts) - 1)
        target = torch.cat([self.references[b].keys_at(float(sigma[row]), (b,)) for row, b in enumerate(images.cond)])
        try:
            with torch.inference_mode(False), torch.enable_grad(), self._watching():
                latent = x[:n].detach().clone().requires_grad_(True)
                levels, reference = sigma[:n].clone(), target.clone()
                grad = torch.zeros_like(latent)
                for part in parts:   # branch by branch: one branch's activations in memory at a time
                    weight = 1.0 if part.group.kind == "base" else 1.0 / concepts
                    conds = {k: v.clone() for k, v in stacked_conds(plan, session.context_key, part.conds,
                                                                    pad_like).items()}
                    call = AlignCall(row_plan([part]), plan=plan, images=list(images.cond), stop=True)
                    grad += self._key_gradient(model_fn, latent, levels, conds, call, reference, weight)
                    session.stats.align_rows += n
        except Exception as exc:
            error = out_of_memory_error(exc)
            if error is not None:
                raise error from exc
            raise
        grad = grad.detach()
        moved = {}
        for row, b in enumerate(images.cond):
            scale = self.schedule.input_scale(float(sigma[row])) ** 2
            moved[b] = (x[row] - self.step_size * scale * grad[row].to(x.dtype))
        if self.moved is None or self.moved[0] != step:
            self.moved = (step, {})
        self.moved[1].update(moved)
        if self.host.latent_moved is not None:
            self.host.latent_moved(moved)

    def _key_gradient(self, model_fn, latent, levels, conds, call: AlignCall, reference, weight: float) -> torch.Tensor:
        """The gradient of one branch's weighted key loss with respect to the latent. The call
        stays in flight through the backward: the checkpointed blocks run their forward again
        there, and each row's LoRA must act as it did."""
        run = self.session.run
        run.call = call
        try:
            with self.checkpointed, self.grad_pass:
                try:
                    model_fn(latent, levels, conds)
                except KeysCaptured:
                    pass
                if call.keys is None:
                    raise EngineError(f"layout alignment: the UNet call never reached the alignment layer {self.name}")
                (grad,) = torch.autograd.grad(key_loss(call.keys, reference) * weight, latent)
        finally:
            run.call = None
        return grad


def checkpointed_blocks(unet, layer) -> PatchSet:
    """Activation checkpointing on every transformer block and residual block of the UNet but
    the one holding the alignment layer (whose forward stops there): a block keeps only its
    inputs for the backward and runs again inside it, so the gradient pass holds about one
    block's activations instead of the whole encoder's (SDXL: ~5 GB at 1024 px without it)."""
    patches = PatchSet()
    for module in unet.modules():
        transformer = hasattr(module, "attn1") and hasattr(module, "ff")
        residual = hasattr(module, "in_layers") and hasattr(module, "out_layers")
        if (transformer or residual) and not any(m is layer for m in module.modules()):
            patches.add(module, "forward", _checkpointed)
    return patches


def _checkpointed(original):
    def forward(*args, **kwargs):
        # Forge writes the block index into transformer_options before each block: the rerun in
        # the backward must see this block's, so dicts are copied now
        args = tuple(dict(a) if isinstance(a, dict) else a for a in args)
        kwargs = {k: (dict(v) if isinstance(v, dict) else v) for k, v in kwargs.items()}
        if not torch.is_grad_enabled():
            return original(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(_on_copies(original), *args, use_reentrant=False, **kwargs)
    return forward


def _on_copies(original):
    """Forge's blocks add to their input in place (`x += n`): the block gets a copy, so the
    input the checkpoint keeps for the rerun stays as it came."""
    def run(*args, **kwargs):
        args = tuple(a.clone() if torch.is_tensor(a) and a.requires_grad else a for a in args)
        kwargs = {k: (v.clone() if torch.is_tensor(v) and v.requires_grad else v) for k, v in kwargs.items()}
        return original(*args, **kwargs)
    return run
