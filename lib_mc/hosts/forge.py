"""stable-diffusion-webui-forge adapter. Imported only inside Forge (it imports `backend`);
what it shares with A1111 is in `webui.py` (the flow per job is described there).

Forge-specific:
- Text encoding with a concept's text-encoder LoRAs: a clone of the CLIP patcher with the
  LoRA's CLIP patches (Forge's own key map), encoded, then the main CLIP patcher is loaded back
  so its weights are the main prompt's again.
- Routing, through Forge's patcher on a clone of `forge_objects.unet` made in
  `process_before_every_sampling` (Forge rebuilds forge_objects for every pass, so nothing of
  it outlives the batch): the UNet function wrapper sends every UNet call into the engine, and
  attention replace patches on every transformer block run the engine's attention.
- The per-concept LoRA deltas are forward patches on the LoRA's layers, applied by the engine
  around stage 2 only and removed in `finally`: Forge's patcher has no per-row layer hook (its
  LoRA patches merge weights for the whole batch), and object patches would stay on the shared
  model until Forge next reloads it.
"""

from __future__ import annotations

from backend import memory_management
from backend.attention import attention_function
from backend.patcher.lora import load_lora, model_lora_keys_clip
from backend.utils import load_torch_file
from modules import prompt_parser

from ..auto.tokens import find_word
from ..engine import make_session
from ..errors import EngineError
from ..prepare import LoraFile
from . import webui
from .forge_routing import install_attention, make_unet_wrapper

lora_names = webui.lora_names
refresh_lora_names = webui.refresh_lora_names
process = webui.process
postprocess = webui.postprocess
postprocess_image = webui.postprocess_image


class ForgeServices(webui.WebUIServices):
    """`prepare`'s host services: the shared ones plus Forge's tokenizer and text encoder."""

    def _text_engine(self):
        model = self.p.sd_model
        return getattr(model, "text_processing_engine", None) or model.text_processing_engine_l

    def word_positions(self, prompt: str, word: str) -> list[list[int]]:
        """Where the word's tokens sit in the prompt's conditioning: chunks of 77 tokens (start,
        75, end), concatenated, as A1111; SDXL's two encoders share positions."""
        engine = self._text_engine()
        chunks, _ = engine.tokenize_line(prompt)
        ids = [token for chunk in chunks for token in chunk.tokens]
        return find_word(ids, engine.tokenize([word])[0])

    def _clip_with(self, loras: list[tuple[LoraFile, float]]):
        clip = self.p.sd_model.forge_objects.clip
        if not loras:
            return clip
        clip = clip.clone()
        keys = model_lora_keys_clip(clip.cond_stage_model)
        cached = getattr(self.networks, "load_lora_state_dict", None) or (lambda f: load_torch_file(f, safe_load=True))
        for lora, weight in loras:
            patches, _ = load_lora(cached(lora.path), keys)
            if patches:
                clip.add_patches(filename=lora.path, patches=patches, strength_patch=weight)
        return clip

    def encode(self, prompt: str, loras: list[tuple[LoraFile, float]]) -> dict:
        """The concept prompt's conditioning, with its LoRAs' text-encoder part on top of the
        main prompt's (their UNet part is applied per row by the engine)."""
        model = self.p.sd_model
        main_clip = model.forge_objects.clip
        model.forge_objects.clip = self._clip_with(loras)
        try:
            texts = prompt_parser.SdConditioning([prompt], width=self.p.width, height=self.p.height)
            cond = model.get_learned_conditioning(texts)
        finally:
            model.forge_objects.clip = main_clip
            if loras:   # the main prompt's weights back in the text encoder now, not at its next use
                memory_management.load_model_gpu(main_clip.patcher)
        if isinstance(cond, dict):   # SDXL: the names of Forge's model conditions
            return {"c_crossattn": cond["crossattn"].clone(), "y": cond["vector"].clone()}
        return {"c_crossattn": cond.clone()}


# ---- hooks ------------------------------------------------------------------------------------

def process_batch(p, **kwargs) -> None:
    webui.process_batch(p, ForgeServices(p), p.sd_model.forge_objects.unet.model.diffusion_model)


def process_before_every_sampling(p, **kwargs) -> None:
    state = webui.first_pass_state(p)
    if state is None:
        hires = webui.hires_pass_state(p)
        if hires is not None:
            _route_hires(p, hires, kwargs.get("x"))
        return
    counter = webui.StepCount(p.sampler.model_wrap_cfg, p)
    webui.img2img_background(p, state)
    if state.error is None and state.prepared is not None:
        try:
            p.sd_model.forge_objects.unet = _routed_unet(p.sd_model.forge_objects.unet, state, counter)
        except Exception as exc:   # raised from the sampler call, where the WebUI shows it
            state.error = exc
    webui.wrap_sampler(p, state, counter, routing=webui.moves_routing(p.sampler.model_wrap_cfg, state))


def _route_hires(p, state: webui.JobState, x) -> None:
    """The hires pass: one pass with the concepts' branches under their upscaled regions."""
    counter = webui.StepCount(p.sampler.model_wrap_cfg, p)
    unet = p.sd_model.forge_objects.unet
    if getattr(unet, "_multi_concept_base", None) is not None:   # still the first pass's routed clone
        unet = unet._multi_concept_base
    try:
        p.sd_model.forge_objects.unet = _routed_unet(unet, state, counter, webui.hires_plan(p, state, x))
    except Exception as exc:   # a plain hires pass, said in the infotext
        webui.hires_failed(p, state, exc)
        return
    webui.wrap_hires_sampler(p, state)


def _routed_unet(unet, state: webui.JobState, counter: webui.StepCount, plan=None):
    """A clone of the batch's UnetPatcher whose UNet calls and attention go through the engine."""
    if "model_function_wrapper" in unet.model_options:
        raise EngineError("another extension wraps Forge's UNet call (model_function_wrapper, e.g. "
                          "MultiDiffusion); Multi-Concept cannot run together with it: disable one of them")
    state.session = make_session(state.job.mode, unet.model.diffusion_model, plan or state.prepared.plan,
                                 context_key="c_crossattn", attention_on_modules=False, inversions=state.inversions)
    routed = unet.clone()
    routed._multi_concept_base = unet
    install_attention(routed, state.session, attention_function)
    routed.set_model_unet_function_wrapper(
        make_unet_wrapper(state.session, step=lambda: counter.step, total_steps=lambda: counter.total))
    return routed

