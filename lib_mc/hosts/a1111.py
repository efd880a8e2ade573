"""AUTOMATIC1111 v1.10 adapter. Imported only inside A1111; what it shares with Forge is in
`webui.py` (the flow per job is described there).

A1111-specific: text encoding with a concept's text-encoder LoRAs through the Lora extension's
`load_networks`, and the routing of the sampler's UNet calls: instance patches on this batch's
CFG denoiser (which rows are conditional) and its inner model (each call into the engine),
applied around both stages and removed in `finally`.
"""

from __future__ import annotations

import torch

from modules import devices, prompt_parser

from ..auto.tokens import find_word
from ..engine import SessionBase, make_session
from ..patcher import PatchSet
from ..prepare import LoraFile
from . import webui
from .a1111_controlnet import UnitRows, find_units, mark, unmark
from .cfg_calls import CondRows, context_key, unpack_cond
from .row_sources import call_rows

lora_names = webui.lora_names
refresh_lora_names = webui.refresh_lora_names
process = webui.process
postprocess = webui.postprocess
postprocess_image = webui.postprocess_image


class A1111Services(webui.WebUIServices):
    """`prepare`'s host services: the shared ones plus A1111's tokenizer and text encoder."""

    def word_positions(self, prompt: str, word: str) -> list[list[int]]:
        """Where the word's tokens sit in the prompt's conditioning: A1111 encodes a prompt as
        chunks of 77 tokens (start, 75, end), concatenated; SDXL's encoders share positions."""
        model = self.p.sd_model
        text_model = model.conditioner.embedders[0] if hasattr(model, "conditioner") else model.cond_stage_model
        chunks, _ = text_model.tokenize_line(prompt)
        ids = [token for chunk in chunks for token in chunk.tokens]
        return find_word(ids, text_model.tokenize([word])[0])

    def encode(self, prompt: str, loras: list[tuple[LoraFile, float]]) -> dict:
        """The concept prompt's conditioning, with its LoRAs' text-encoder part active on top of
        the main prompt's (their UNet part at 0: the engine applies that per row)."""
        nets = self.networks
        main = [(n.name, n.te_multiplier, n.unet_multiplier, getattr(n, "dyn_dim", None))
                for n in nets.loaded_networks]
        if loras:
            extra = [(lora.name, weight, 0.0, None) for lora, weight in loras]
            nets.load_networks(*[list(col) for col in zip(*(main + extra))])
        try:
            texts = prompt_parser.SdConditioning([prompt], width=self.p.width, height=self.p.height)
            with devices.autocast(), torch.no_grad():
                cond = self.p.sd_model.get_learned_conditioning(texts)
        finally:
            if loras:
                if main:
                    nets.load_networks(*[list(col) for col in zip(*main)])
                else:
                    nets.load_networks([], [], [], [])
        if isinstance(cond, dict):
            return {key: value.detach() for key, value in cond.items()}
        return {"c_crossattn": cond.detach()}



# ---- hooks ------------------------------------------------------------------------------------

def process_batch(p, **kwargs) -> None:
    webui.process_batch(p, A1111Services(p), p.sd_model.model.diffusion_model)


def process_before_every_sampling(p, **kwargs) -> None:
    state = webui.first_pass_state(p)
    if state is None:
        hires = webui.hires_pass_state(p)
        if hires is not None:
            _route_hires(p, hires, kwargs.get("x"))
        return
    webui.img2img_background(p, state)
    if state.error is None and state.prepared is not None:
        try:
            state.session = _session(p, state.prepared.plan)
        except Exception as exc:   # raised from the sampler call, where the WebUI shows it
            state.error = exc
    cfg = p.sampler.model_wrap_cfg
    counter = webui.StepCount(cfg, p)
    webui.wrap_sampler(p, state, counter, routing=_routing(p, cfg, state, counter))


def _session(p, plan) -> SessionBase:
    """The job's method on this model's UNet (SDXL's context is the condition `crossattn`)."""
    state = webui.state_of(p)
    return make_session(state.job.mode, p.sd_model.model.diffusion_model, plan, inversions=state.inversions,
                        context_key="crossattn" if getattr(p.sd_model, "is_sdxl", False) else "c_crossattn")


def _route_hires(p, state: webui.JobState, x) -> None:
    """The hires pass: one pass with the concepts' branches under their upscaled regions."""
    try:
        state.session = _session(p, webui.hires_plan(p, state, x))
    except Exception as exc:   # a plain hires pass, said in the infotext
        webui.hires_failed(p, state, exc)
        return
    cfg = p.sampler.model_wrap_cfg
    counter = webui.StepCount(cfg, p)
    webui.wrap_hires_sampler(p, state, routing=_routing(p, cfg, state, counter))


def _routing(p, cfg, state: webui.JobState, counter: webui.StepCount) -> PatchSet:
    """Every inner-model call of this batch's CFG denoiser goes through the engine session.
    Each UNet call the engine makes is given what sd-webui-controlnet expects of it (see
    `a1111_controlnet`): its rows marked cond/uncond when the host's were, and the units' hints
    and image embeddings of the host row each row stands for. Latents the engine moved during
    a call (conductor's layout alignment) are written into the sampler's own latent after it."""
    rows = CondRows()
    units = UnitRows(find_units(p))

    def cfg_forward(original_forward):
        def forward(x_, sigma, *args, **kwargs):
            rows.begin(x_.shape[0])
            out = original_forward(x_, sigma, *args, **kwargs)
            return state.moves.apply(cfg, x_, sigma, out)   # x_ is the sampler's latent: alignment's moves go there
        return forward

    def inner_forward(original_forward):
        def forward(x_in, sigma_in, **kwargs):
            plain, pack = unpack_cond(kwargs.pop("cond"))
            images = rows.take(x_in.shape[0])
            key = context_key(plain)
            plain, marked = unmark(plain, key)
            n_cond, host_rows = len(images.cond), x_in.shape[0]

            def model_fn(xx, ss, cc):
                flags, source = call_rows(state.session.run.call, n_cond, xx.shape[0])
                if marked:
                    cc = mark(cc, key, flags)
                with units.picked(source, host_rows):
                    return original_forward(xx, ss, cond=pack(cc), **kwargs)
            return state.session.denoise(model_fn, x_in, sigma_in, plain, n_cond=n_cond, step=counter.step,
                                         total_steps=counter.total, images=images)
        return forward

    routing = PatchSet()
    routing.add(cfg, "forward", cfg_forward)
    routing.add(cfg.inner_model, "forward", inner_forward)
    return routing
