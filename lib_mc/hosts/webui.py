"""What the A1111 and Forge adapters share: both WebUIs keep A1111's `modules` API for scripts,
processing, the Lora extension's lists, the RNG and the infotext. Host-specific work (text
encoding with LoRAs, routing the sampler's UNet calls into the engine) stays in `a1111.py` and
`forge.py`, which call in here.

Flow per job:
- `process`: parse the job argument; put it in the infotext. Problems are stored, not raised:
  the WebUIs swallow exceptions raised in script hooks, so they are raised later from the
  sampler call, which stops the job with the WebUI's error display (API: an error response).
- `process_batch` (main-prompt LoRAs are active): resolve LoRAs, encode concept prompts with
  their text-encoder LoRAs, build masks and the engine Plan.
- `process_before_every_sampling` (first pass only, not hires): the adapter routes the UNet
  calls and `wrap_sampler` hands this batch's `sampler.sample` (txt2img) or
  `sampler.sample_img2img` (img2img: the init latent stays the host's, the noise is what the
  method replays) to the job's method (`session.sample`): blend samples twice (stage 1 plain
  and recorded, then `p.rng` is recreated and stage 2 runs with the engine), regional once (a
  probe call first when it re-initialises the latent, then `p.rng` is recreated). In img2img
  the init latent becomes the plan's background (`img2img_background`).
- `postprocess`: with `save_layout`, add the stage-1 images and a mask overlay.
"""

from __future__ import annotations

import contextlib
import re
import sys
from dataclasses import dataclass, field
from typing import Callable

import torch

from modules import devices, rng, shared
from modules import extra_networks as host_extra_networks

from ..engine import HostPass, SessionBase
from ..patcher import PatchSet
from ..methods.images.inversion import InversionCache
from ..methods.schedule import SamplerSchedule
from ..reference import reference_pixels
from ..errors import EngineError, MultiConceptError
from ..infotext import KEY as INFOTEXT_KEY, ImageInfotext
from ..job import IMAGE_MODES, Job, JobError, parse_job
from ..lora.network import Network
from ..prepare import LoraFile, Prepared, prepare
from ..regions import encode_png
from . import check_model_family, grounding_boxes, identity_score, webui_models
from .layout_images import layout_outputs
from .samplers import check_sampler, evaluations_per_step
from .webui_xyz import XYZ_ATTR, apply_overrides

WARNINGS_KEY = "Multi-Concept warnings"


@dataclass
class JobState:
    job: Job | None = None
    error: Exception | None = None
    prepared: Prepared | None = None
    networks: dict[str, Network] = field(default_factory=dict)
    layouts: list[tuple[torch.Tensor, object]] = field(default_factory=list)   # (stage-1 latents, plan)
    found: dict[int, dict[int, str]] = field(default_factory=dict)   # image index -> concept -> found mask PNG
    session: SessionBase | None = None           # this batch's engine session (the job's method)
    routed_sampler: object = None                # the sampler whose sample() this batch wrapped
    reference: tuple | None = None               # (image size, the reference picture's latent): encoded once a job
    pictures: dict = field(default_factory=dict)  # prepare's encoded pictures (references, background), once a job
    inversions: InversionCache = field(default_factory=InversionCache)   # pictures inverted by the engine, once a job
    moves: "LatentMoves" = field(default_factory=lambda: LatentMoves())   # latents the engine moved (alignment)
    identity: dict[int, str] = field(default_factory=dict)   # image index -> its identity scores (face concepts)


def state_of(p) -> JobState | None:
    return getattr(p, "_multi_concept", None)


# ---- the WebUI's LoRA list (A1111's Lora extension and Forge's sd_forge_lora share its API) ------

def lora_module():
    module = sys.modules.get("networks")
    if module is None or not hasattr(module, "available_networks"):
        raise JobError("loras", "the WebUI's built-in Lora extension is not loaded")
    return module


def lora_names() -> list[str]:
    return list(lora_module().available_networks)


def refresh_lora_names() -> list[str]:
    networks = lora_module()
    networks.list_available_networks()
    return list(networks.available_networks)


class WebUIServices:
    """What `prepare` needs from the host that both WebUIs do alike; the adapters add `encode`
    and `word_positions`."""

    def encode_picture(self, png_b64: str, image_hw: tuple[int, int], field: str = "reference") -> torch.Tensor:
        """A picture of the job (an image concept's reference, the kept background) as the
        host's VAE encodes it at the generation's size: (1, 4, h, w). `field` names it in the
        error when it cannot be decoded."""
        return encode_picture(self.p.sd_model, png_b64, image_hw, field)

    def face_analysis(self):
        return webui_models.face_analysis()

    def instantid(self, unet, need_control: bool):
        return webui_models.instantid(unet, need_control)

    def __init__(self, p):
        self.p = p
        self.networks = lora_module()
        model = p.sd_model
        self.model_arch = "sdxl" if getattr(model, "is_sdxl", False) else (
            "sd2" if getattr(model, "is_sd2", False) else "sd1")

    def lora_names(self) -> list[str]:
        return list(self.networks.available_network_aliases)

    def find_lora(self, name: str) -> LoraFile | None:
        nets = self.networks
        on_disk = nets.available_network_aliases.get(name) or nets.available_networks.get(name)
        if on_disk is None:
            nets.list_available_networks()   # a file added since start-up
            on_disk = nets.available_network_aliases.get(name) or nets.available_networks.get(name)
        if on_disk is None:
            return None
        version = getattr(getattr(on_disk, "sd_version", None), "name", "Unknown")
        arch = {"SD1": "sd1", "SD2": "sd2", "SDXL": "sdxl"}.get(version)
        return LoraFile(name, on_disk.filename, arch)

    def parse_tags(self, prompt: str):
        clean, found = host_extra_networks.parse_prompt(prompt)
        loras = []
        for kind in ("lora", "lyco"):
            for params in found.get(kind, []):
                items = params.items
                try:
                    weight = float(items[1]) if len(items) > 1 else 1.0
                except ValueError as exc:
                    raise JobError("prompt", f"<{kind}:{':'.join(items)}>: weight is not a number") from exc
                loras.append((items[0], weight))
        for kind in found:
            if kind not in ("lora", "lyco"):
                print(f"[Multi-Concept] <{kind}:...> in a concept prompt is ignored; only LoRA tags apply there")
        return clean, loras


# ---- hooks ------------------------------------------------------------------------------------

def process(p, job_arg) -> None:
    p._multi_concept = None
    webui_models.offload_instantid()   # a face job's IdentityNet leaves the GPU before any next job
    try:
        job = apply_overrides(parse_job(job_arg), getattr(p, XYZ_ATTR, None) or {})
        if not job.enabled:
            return
        if job.enabled and not job.concepts:
            raise JobError("concepts", "is empty: add at least one concept or disable Multi-Concept")
        check_sampler(getattr(p, "sampler_name", None), job.mode)
        check_refiner(p)
        prompts = p.prompt if isinstance(p.prompt, list) else [p.prompt or ""]   # Prompt Matrix: a list
        refuse_and(prompts)
        p._multi_concept = JobState(job)
        p.extra_generation_params[INFOTEXT_KEY] = ImageInfotext(p._multi_concept)
        if identity_score.wants_score(job):
            p.extra_generation_params[identity_score.KEY] = identity_score.IdentityInfotext(p._multi_concept)
    except MultiConceptError as exc:
        p._multi_concept = JobState(error=exc)
        print(f"[Multi-Concept] {exc}")


def process_batch(p, services, unet) -> None:
    state = state_of(p)
    if state is None or state.error is not None:
        return
    state.session = state.routed_sampler = None
    try:
        check_model_family(p.sd_model)
        refuse_and(p.prompts)   # wildcards may bring one into a batch's prompts
        state.prepared = prepare(
            state.job, base_prompt=p.prompts[0], base_prompts=list(p.prompts), base_negative=p.negative_prompts[0],
            image_hw=image_hw(p), unet=unet, services=services, networks_cache=state.networks,
            pictures_cache=state.pictures)
        plan = state.prepared.plan
        arch = "sdxl" if getattr(p.sd_model, "is_sdxl", False) else "sd1"
        plan.options.max_rows_per_call = webui_models.rows_per_call(arch, plan.regions.latent_hw)
        if state.prepared.warnings:
            p.extra_generation_params[WARNINGS_KEY] = "; ".join(state.prepared.warnings)
    except MultiConceptError as exc:
        state.error = exc
        print(f"[Multi-Concept] {exc}")


def refuse_and(prompts) -> None:
    if any(re.search(r"\bAND\b", text or "") for text in prompts):
        raise JobError("prompt", "AND (composable prompts) cannot be combined with Multi-Concept")


def image_hw(p) -> tuple[int, int]:
    """The image size the WebUI really samples: it floors width and height to multiples of 8
    (an API request may ask for 100 x 132)."""
    return p.height // 8 * 8, p.width // 8 * 8


def check_refiner(p) -> None:
    """The SDXL refiner swaps the checkpoint in the middle of sampling; the LoRAs are bound to
    the first one and the passes could not match up."""
    if getattr(p, "refiner_checkpoint", None) and (getattr(p, "refiner_switch_at", 1.0) or 0) < 1.0:
        raise JobError("refiner", "the Refiner (switching checkpoints during sampling) cannot be combined "
                                  "with Multi-Concept: turn the Refiner off, or run it afterwards in img2img")


def check_sampler_call(p) -> None:
    """Another extension that replaced the sampler's model call (Tiled Diffusion / MultiDiffusion,
    DemoFusion: an instance `forward` on the CFG denoiser or its inner model) splits the image
    into tiles the engine's regions do not know."""
    cfg = getattr(p.sampler, "model_wrap_cfg", None)
    if cfg is None:
        return
    if "forward" in vars(cfg) or "forward" in vars(getattr(cfg, "inner_model", object())):
        raise EngineError("another extension replaced the sampler's model call (e.g. Tiled Diffusion / "
                          "MultiDiffusion or DemoFusion); Multi-Concept cannot run together with it: disable one of them")


def first_pass_state(p) -> JobState | None:
    """The job state when this `process_before_every_sampling` is the first pass of a batch
    that still has to be routed; None otherwise (no job, hires pass, or already done: Forge
    calls the hook twice). A job that cannot run with this sampler call gets its error here,
    before the layout pass."""
    state = state_of(p)
    if state is None or getattr(p, "is_hr_pass", False) or getattr(p, "sampler", None) is None:
        return None
    if state.routed_sampler is p.sampler:
        return None
    if state.error is None:
        try:
            check_sampler_call(p)
        except MultiConceptError as exc:
            state.error = exc
    return state


def hires_pass_state(p) -> JobState | None:
    """The job state when this `process_before_every_sampling` is a hires-fix pass in which the
    concepts act (`hires_loras`) and that is not routed yet; None otherwise."""
    state = state_of(p)
    if state is None or not getattr(p, "is_hr_pass", False) or getattr(p, "sampler", None) is None:
        return None
    if state.error is not None or state.prepared is None or state.job is None or not state.job.hires_loras:
        return None
    if state.session is None or state.routed_sampler is p.sampler:
        return None
    return state


def hires_plan(p, state: JobState, x: torch.Tensor | None):
    """The batch's plan at the hires size (the latent the hires pass samples)."""
    if x is not None:
        size = (x.shape[-2] * 8, x.shape[-1] * 8)
    else:
        size = (int(getattr(p, "hr_upscale_to_y", 0) or p.height), int(getattr(p, "hr_upscale_to_x", 0) or p.width))
    return state.prepared.plan.at_size(size)


def wrap_hires_sampler(p, state: JobState, routing=None) -> None:
    """Make this hires pass's `sampler.sample_img2img` run with every concept's branch blended
    under its upscaled region (`state.session` holds the plan at the hires size). A failure to
    set it up leaves the pass plain and says so in the infotext."""
    sampler = p.sampler
    original = sampler.sample_img2img
    state.routed_sampler = sampler
    session = state.session

    def single_pass_sample(*args, **kwargs):
        sampler.__dict__.pop("sample_img2img", None)
        with contextlib.ExitStack() as stack:
            if routing is not None:
                stack.enter_context(routing)
            stack.enter_context(session.single_pass())
            return original(*args, **kwargs)
    sampler.sample_img2img = single_pass_sample


def hires_failed(p, state: JobState, exc: Exception) -> None:
    message = f"hires fix: the concepts could not act in the hires pass ({exc}); it ran plain"
    print(f"[Multi-Concept] {message}")
    if state.prepared is not None:
        state.prepared.warnings.append(message)
        p.extra_generation_params[WARNINGS_KEY] = "; ".join(state.prepared.warnings)


class StepCount:
    """Steps as the engine counts them: the CFG denoiser's own counter of evaluations; the total
    is stage 1's count of them once known, before that the CFG denoiser's `total_steps`: both
    WebUIs set it when sampling starts (`launch_sampling`) to the steps this run really takes
    (img2img: `int(steps * denoising_strength) + 1`), doubled for a second-order sampler.
    Only before that is it the steps times the sampler's evaluations per step."""

    def __init__(self, cfg, p):
        self.cfg, self.p = cfg, p
        self.stage1_calls: int | None = None

    @property
    def step(self) -> int:
        return int(self.cfg.step)

    @property
    def total(self) -> int:
        if self.stage1_calls:
            return self.stage1_calls
        evaluations = int(getattr(self.cfg, "total_steps", 0) or 0)
        if evaluations > 0:
            return evaluations
        return max(1, int(self.p.steps)) * evaluations_per_step(getattr(self.p, "sampler_name", None))


def wrap_sampler(p, state: JobState, counter: StepCount, routing=None) -> None:
    """Make this batch's first sampling, `sampler.sample` (txt2img) or `sampler.sample_img2img`
    (img2img), sample with the job's method (once: the first call unwraps both, so the hires
    pass gets the plain sampler). `routing`: a context manager active around all of it (A1111's
    patches)."""
    sampler = p.sampler
    originals = {name: getattr(sampler, name) for name in ("sample", "sample_img2img") if hasattr(sampler, name)}
    state.routed_sampler = sampler

    def unwrap():
        for name in originals:
            sampler.__dict__.pop(name, None)
        if state.error is not None:
            raise state.error
        if state.prepared is None or state.session is None:
            raise EngineError("the job was not prepared for this batch (process_batch did not run)")

    def run(p_, noise, sample_once, steps, img2img):
        if routing is None:
            return _sample_batch(p_, state, counter, noise, sample_once, steps, img2img=img2img)
        with routing:
            return _sample_batch(p_, state, counter, noise, sample_once, steps, img2img=img2img)

    def routed_sample(p_, x, conditioning, unconditional_conditioning, steps=None, image_conditioning=None,
                      **kwargs):
        unwrap()

        def sample_once(noise):
            return originals["sample"](p_, noise, conditioning, unconditional_conditioning, steps=steps,
                                       image_conditioning=image_conditioning, **kwargs)
        return run(p_, x, sample_once, steps, img2img=False)

    def routed_sample_img2img(p_, x, noise, conditioning, unconditional_conditioning, steps=None,
                              image_conditioning=None, **kwargs):
        """img2img's first pass: x is the init latent (the host noises it to the denoising
        strength's level inside sample_img2img), `noise` the host's noise; a method's passes
        differ only in the noise they hand over (the same, replayed, in blend's two)."""
        unwrap()

        def sample_once(noise_):
            return originals["sample_img2img"](p_, x, noise_, conditioning, unconditional_conditioning, steps=steps,
                                               image_conditioning=image_conditioning, **kwargs)
        return run(p_, noise, sample_once, steps, img2img=True)

    if "sample" in originals:
        sampler.sample = routed_sample
    if "sample_img2img" in originals:
        sampler.sample_img2img = routed_sample_img2img


def _sample_batch(p, state: JobState, counter: StepCount, x: torch.Tensor, sample_once: Callable, steps=None,
                  img2img: bool = False):
    """This batch sampled by the job's method (`session.sample`), given what it needs of the host.
    x: the initial noise (img2img: the noise the sampler adds to the init latent)."""
    counter.stage1_calls = None

    def layout_image(latents):
        state.layouts.append((latents.detach().to(devices.cpu), state.prepared.plan))

    def layout_done(first):
        counter.stage1_calls = counter.step or None
        layout_image(first)

    cfg = getattr(p.sampler, "model_wrap_cfg", None)
    initial = x.clone()
    host = HostPass(sample=sample_once, initial=x, replay_noise=lambda: _replay_noise(p, initial, img2img),
                    interrupted=lambda: bool(shared.state.interrupted or shared.state.skipped),
                    find_regions=lambda latents: _find_regions(p, state, latents), layout_done=layout_done,
                    layout_image=layout_image,
                    to_x0=_x0_of(cfg))
    if state.prepared.plan.face_concepts:
        host.find_faces = lambda latents: webui_models.find_faces(p, latents, state.prepared.warnings)
    host.reference = reference_latent(p, state)
    if host.reference is not None:
        state.moves.pending.clear()
        host.latent_moved = state.moves.add
    if host.reference is not None or _inverts_pictures(state.prepared.plan):
        host.schedule = sampler_schedule(p, steps, img2img=img2img)
    result = state.session.sample(host)
    _remember_found(p, state)
    return result


def _inverts_pictures(plan) -> bool:
    """The plan holds pictures the method inverts over the sampler's levels: a kept background
    or an image concept's reference."""
    return plan.background is not None or bool(plan.image_concepts)


def wants_background(job) -> bool:
    """img2img's init image becomes the plan's background in the modes that keep one (blend,
    conductor) when the job keeps the background (`keep_background`, default on) or has image
    concepts (their references are diluted with it); the engine decides what to do with it."""
    if getattr(job, "mode", "blend") not in IMAGE_MODES:
        return False
    image_concepts = any(getattr(c, "reference", None) for c in getattr(job, "concepts", None) or [])
    return bool(getattr(job, "keep_background", True)) or image_concepts


def img2img_background(p, state: JobState) -> None:
    """img2img: this batch's init latent (B, 4, h, w), as the sampler gets it, is the plan's
    background; set before the session is made from the plan. txt2img has no init latent
    (prepare encodes the job's background picture instead)."""
    init = getattr(p, "init_latent", None)
    if init is None or state.error is not None or state.prepared is None or not wants_background(state.job):
        return
    try:
        state.prepared.plan.set_background(init.detach().float().clone())
    except MultiConceptError as exc:   # raised from the sampler call, where the WebUI shows it
        state.error = exc


def reference_latent(p, state: JobState) -> torch.Tensor | None:
    """Conductor mode's reference picture encoded by the host's VAE (`encode_picture`) at the
    generation's size; None without one. Encoded once per job."""
    job = state.job
    if getattr(job, "mode", None) != "conductor" or not getattr(job, "reference", ""):
        return None
    size = image_hw(p)
    if state.reference is None or state.reference[0] != size:
        state.reference = (size, encode_picture(p.sd_model, job.reference, size))
    return state.reference[1]


def encode_picture(model, png: str, image_hw: tuple[int, int], field: str = "reference") -> torch.Tensor:
    """A base64 picture -> its latent (1, 4, h, w) at this image size, by the host's VAE as
    img2img encodes its input (`get_first_stage_encoding(encode_first_stage(pixels))`; the
    posterior's mode where the VAE gives a distribution (A1111's SD1/SD2), as the paper's code
    takes its mean; a tensor as it is (A1111's SDXL, Forge): a tensor's own `mode()` is a
    statistic). The picture is cropped to the size, not stretched (`reference_pixels`).
    Float32, a plain tensor (Forge encodes under inference mode)."""
    pixels = reference_pixels(png, image_hw, field).to(devices.device, getattr(devices, "dtype_vae", torch.float32))
    with torch.no_grad(), devices.autocast():
        encoded = model.encode_first_stage(pixels)
        if not torch.is_tensor(encoded) and hasattr(encoded, "mode"):
            encoded = encoded.mode()
        latent = model.get_first_stage_encoding(encoded)
    return latent.detach().float().clone()


def sampler_schedule(p, steps=None, img2img: bool = False) -> SamplerSchedule:
    """The noise levels this batch's sampler will call its denoiser with: a k-diffusion sampler's
    sigmas (`get_sigmas`), or A1111's DDIM / PLMS / UniPC timesteps over the model's
    alphas_cumprod (`get_timesteps`); Forge calls the UNet of those with the timesteps' sigmas.
    img2img runs the tail of a longer schedule: both WebUIs' `setup_img2img_steps` give the
    schedule's steps and t_enc, and sample_img2img keeps sigmas[steps - t_enc - 1:] (timesteps[:t_enc])."""
    sampler = p.sampler
    t_enc = None
    if img2img:
        from modules import sd_samplers_common
        steps, t_enc = sd_samplers_common.setup_img2img_steps(p, steps)
    else:
        steps = steps or p.steps
    if hasattr(sampler, "get_sigmas"):
        sigmas = sampler.get_sigmas(p, steps)
        return SamplerSchedule(sigmas if t_enc is None else sigmas[steps - t_enc - 1:])
    if hasattr(sampler, "get_timesteps"):
        timesteps = sampler.get_timesteps(p, steps).long().cpu()
        if t_enc is not None:
            timesteps = timesteps[:t_enc]
        alphas = p.sd_model.alphas_cumprod.detach().double().cpu()
        if getattr(sampler.model_wrap_cfg, "classic_ddim_eps_estimation", False):
            return SamplerSchedule(((1 - alphas) / alphas).sqrt()[timesteps])
        return SamplerSchedule(timesteps, alphas_cumprod=alphas)
    raise EngineError(f"layout alignment: cannot read the noise levels of the sampler {type(sampler).__name__}")


class LatentMoves:
    """Latents the engine moved during the CFG denoiser call in flight (layout alignment), made
    the sampler's own latent when that call returns: k-diffusion samplers (and A1111's DDIM,
    PLMS, UniPC) hand their latent tensor to the denoiser and continue from it, so the rows
    are written into it in place and every sampler steps from the moved latent."""

    def __init__(self):
        self.pending: dict[int, torch.Tensor] = {}

    def add(self, moved: dict[int, torch.Tensor]) -> None:
        self.pending.update(moved)

    def apply(self, cfg, x: torch.Tensor, sigma: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """After the CFG denoiser's forward(x, sigma, ...) returned `out`: x[b] := image b's moved
        latent. Forge's DDIM / PLMS / UniPC (`classic_ddim_eps_estimation`) hand over a VP latent
        and return eps computed from x * sqrt(1 + s^2) at the timestep's sigma s, while the engine
        moved that scaled latent: the latent goes back unscaled and eps is the moved one's."""
        if not self.pending:
            return out
        pending, self.pending = self.pending, {}
        classic = getattr(cfg, "classic_ddim_eps_estimation", False)
        if classic:
            alphas = cfg.inner_model.inner_model.alphas_cumprod.to(sigma.device)
            sigmas = ((1 - alphas) / alphas).sqrt()[sigma.round().long().clamp(0, len(alphas) - 1)]
        for b, latent in pending.items():
            latent = latent.to(x.device, x.dtype)
            if classic:
                scale = (1 + sigmas[b] ** 2).sqrt()
                out[b] = out[b] + ((latent - x[b] * scale) / sigmas[b]).to(out.dtype)
                latent = latent / scale
            x[b] = latent
        return out


def moves_routing(cfg, state: JobState):
    """Forge: the CFG denoiser's forward wrapped so latents the engine moved go into the
    sampler's latent (A1111's routing does this in its own CFG forward patch); None (nothing
    wrapped) without a reference picture."""
    job = state.job
    if getattr(job, "mode", None) != "conductor" or not getattr(job, "reference", ""):
        return None

    def cfg_forward(original_forward):
        def forward(x_, sigma, *args, **kwargs):
            return state.moves.apply(cfg, x_, sigma, original_forward(x_, sigma, *args, **kwargs))
        return forward
    routing = PatchSet()
    routing.add(cfg, "forward", cfg_forward)
    return routing


def _x0_of(cfg):
    """The CFG denoiser's x0 from its inner model's output (A1111's timestep samplers predict
    eps; the k-diffusion ones x0 already): its `get_pred_x0(x_in, x_out, sigma)`."""
    get = getattr(cfg, "get_pred_x0", None)
    return None if get is None else (lambda x_, out, sigma: get(x_, out, sigma))


def _replay_noise(p, initial: torch.Tensor, img2img: bool = False) -> torch.Tensor:
    """Recreate the WebUI's noise generator: the same initial and ancestral noise for stage 2.
    img2img scales its noise by `initial_noise_multiplier` (when not 1) as the WebUIs do."""
    old = p.rng
    p.rng = rng.ImageRNG(old.shape, old.seeds, subseeds=old.subseeds, subseed_strength=old.subseed_strength,
                         seed_resize_from_h=old.seed_resize_from_h, seed_resize_from_w=old.seed_resize_from_w)
    again = p.rng.next()
    multiplier = getattr(p, "initial_noise_multiplier", 1.0) if img2img else 1.0
    if multiplier is not None and multiplier != 1.0:
        again *= multiplier
    if not torch.equal(again.to(initial.device), initial):
        raise EngineError("recreating the WebUI's noise generator did not reproduce the initial noise")
    return again.to(initial.device, initial.dtype)


def _find_regions(p, state: JobState, first: torch.Tensor) -> None:
    """Automatic regions between the stages: attention (+ faces), then SAM when there is one."""
    session, plan = state.session, state.prepared.plan
    notes: list[str] = []
    images = webui_models.layout_images(p, first)
    auto = [plan.concepts[i] for i in plan.auto_concepts]
    image_boxes = grounding_boxes.find_boxes(images, auto, notes)
    if image_boxes is not None:
        p.extra_generation_params[grounding_boxes.INFOTEXT] = grounding_boxes.GROUNDING_DINO
    shared_word = len({c.auto_group for c in auto}) < len(auto)
    faces = webui_models.detect_faces(images, plan.regions.latent_hw, notes) if shared_word else None
    found = session.find_regions(faces=faces, finish=False, image_boxes=image_boxes)
    refined = webui_models.refine(images, found, notes, image_boxes or [[c.auto_box for c in auto]] * len(found))
    if refined is not None:
        session.finish_regions(refined, found_by="SAM")
    else:
        session.finish_regions(found)
    if notes:
        state.prepared.warnings.extend(n for n in notes if n not in state.prepared.warnings)
        p.extra_generation_params[WARNINGS_KEY] = "; ".join(state.prepared.warnings)


def _remember_found(p, state: JobState) -> None:
    plan = state.prepared.plan
    if plan.found_masks is None:
        return
    auto = plan.auto_concepts
    for b in range(plan.found_masks.shape[0]):
        index = getattr(p, "iteration", 0) * p.batch_size + b
        state.found[index] = {concept: encode_png(plan.found_masks[b, slot]) for slot, concept in enumerate(auto)}


def postprocess_image(p, pp) -> None:
    """Each generated image, before the WebUI writes its infotext: face concepts' identity scores."""
    state = state_of(p)
    if state is None or state.job is None or not identity_score.wants_score(state.job):
        return
    try:
        identity_score.score_image(p, state, pp.image)
    except Exception as exc:   # a score must never cost the user the image
        print(f"[Multi-Concept] identity score failed: {exc}")


def postprocess(p, processed) -> None:
    state = state_of(p)
    if state is None or state.job is None or not state.job.save_layout or not state.layouts:
        return
    try:
        images = layout_outputs(p.sd_model, state.layouts, [c.name for c in state.job.concepts])
    except Exception as exc:  # an extra output must never cost the user the image
        print(f"[Multi-Concept] could not make the layout images: {exc}")
        return
    processed.images.extend(images)
    processed.infotexts.extend([processed.infotexts[0] if processed.infotexts else ""] * len(images))
