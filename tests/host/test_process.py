"""The WebUI hooks' checks of the job and the processing object, before any model work."""

from types import SimpleNamespace

import torch

from lib_mc.hosts import webui


def test_a_prompt_list_never_turns_the_extension_off_with_a_type_error():
    """Prompt Matrix sets p.prompt to a list; AND in any of them is refused by name."""
    p = SimpleNamespace(prompt=["a man", "a man, red"], sampler_name="Euler a", extra_generation_params={})
    webui.process(p, {"enabled": True, "concepts": [{"name": "a", "region": {"type": "rect", "w": 0.5}}]})
    assert p._multi_concept.error is None and p._multi_concept.job is not None
    p.prompt = ["a man", "a man AND a dog"]
    webui.process(p, {"enabled": True, "concepts": [{"name": "a", "region": {"type": "rect", "w": 0.5}}]})
    assert "AND" in str(p._multi_concept.error)


def job_arg():
    return {"enabled": True, "concepts": [{"name": "a", "region": {"type": "rect", "w": 0.5}}]}


def test_an_api_size_that_is_not_a_multiple_of_8_is_the_size_the_webui_samples():
    """The WebUI floors 100 x 132 to a 96 x 128 image (latent 12 x 16); a plan for 100 x 132
    would have a 13 x 17 latent and stop after the layout pass."""
    from a1111like import processing
    from lib_mc.plan import build_plan
    p = processing(width=100, height=132)
    assert webui.image_hw(p) == (128, 96)
    plan = build_plan([dict(name="a", cond=torch.zeros(1, 4, 8), mask=torch.ones(8, 8))], webui.image_hw(p))
    assert plan.regions.latent_hw == tuple(p.rng.next().shape[-2:]) == (16, 12)


def test_the_refiner_switch_is_refused_before_any_work():
    p = SimpleNamespace(prompt="a man", sampler_name="Euler a", extra_generation_params={},
                        refiner_checkpoint="sd_xl_refiner_1.0", refiner_switch_at=0.8)
    webui.process(p, job_arg())
    assert "Refiner" in str(p._multi_concept.error) and p._multi_concept.error.field == "refiner"
    p.refiner_switch_at = 1.0   # the WebUI never switches: fine
    webui.process(p, job_arg())
    assert p._multi_concept.error is None


def test_an_extension_that_replaced_the_sampler_model_call_is_named_before_the_layout_pass():
    """Tiled Diffusion / MultiDiffusion set `inner_model.forward` on the sampler it creates."""
    inner = SimpleNamespace()
    p = SimpleNamespace(is_hr_pass=False, sampler=SimpleNamespace(model_wrap_cfg=SimpleNamespace(inner_model=inner)))
    p._multi_concept = webui.JobState(job=SimpleNamespace())
    assert webui.first_pass_state(p).error is None
    p.sampler = SimpleNamespace(model_wrap_cfg=SimpleNamespace(inner_model=inner))
    inner.forward = lambda *a, **k: None   # what Tiled Diffusion's hook does
    state = webui.first_pass_state(p)
    assert "Tiled Diffusion" in str(state.error)


def test_and_brought_in_by_wildcards_is_refused_per_batch():
    state = webui.JobState(job=SimpleNamespace())
    p = SimpleNamespace(_multi_concept=state, prompts=["a man", "a man AND a cat"], sd_model=SimpleNamespace(is_sd1=True))
    webui.process_batch(p, services=None, unet=None)
    assert "AND" in str(state.error)


def test_rows_per_call_follow_free_memory_and_the_setting():
    from modules import shared
    from lib_mc.hosts import webui_models
    gib = 2 ** 30
    assert webui_models.choose_rows(None, 100 * 2 ** 20) is None            # CPU: no limit
    assert webui_models.choose_rows(None, 100 * 2 ** 20, cap=6) == 6
    assert webui_models.choose_rows(3 * gib, gib // 2) == 4                  # 1 GiB kept aside
    assert webui_models.choose_rows(3 * gib, gib // 2, cap=3) == 3
    assert webui_models.choose_rows(gib, gib) == 1                            # never under one row
    try:
        shared.opts.multi_concept_max_rows = 5
        assert webui_models.rows_per_call("sdxl", (128, 128)) == 5            # this CPU: the setting only
    finally:
        del shared.opts.multi_concept_max_rows


def test_the_batch_plan_gets_its_rows_per_call():
    from modules import shared
    from lib_mc.job import parse_job
    from lib_mc.prepare import parse_lora_tags
    from tinyhost import make_unet, random_context

    class Services:
        model_arch = "sd1"

        def find_lora(self, name):
            return None

        def parse_tags(self, prompt):
            return parse_lora_tags(prompt)

        def encode(self, prompt, loras):
            return {"c_crossattn": random_context(1)}
    state = webui.JobState(job=parse_job({"enabled": True, "concepts": [{"name": "a", "region": {"type": "rect", "w": 0.5}}]}))
    p = SimpleNamespace(_multi_concept=state, prompts=["a man"], negative_prompts=[""], width=128, height=128,
                        extra_generation_params={}, sd_model=SimpleNamespace(is_sd1=True))
    try:
        shared.opts.multi_concept_max_rows = 7
        webui.process_batch(p, Services(), make_unet())
    finally:
        del shared.opts.multi_concept_max_rows
    assert state.error is None and state.prepared.plan.options.max_rows_per_call == 7


def test_an_xyz_cell_is_checked_as_a_job_is():
    """XYZ: Mode = regional on a job with an automatic region and start_at 0 is refused, naming start_at."""
    from lib_mc.hosts.webui_xyz import XYZ_ATTR
    job = {"enabled": True, "start_at": 0.0, "concepts": [
        {"name": "a", "class_word": "man", "region": {"type": "auto"}}]}
    p = SimpleNamespace(prompt="a man", sampler_name="Euler a", extra_generation_params={}, refiner_checkpoint=None)
    setattr(p, XYZ_ATTR, {"mode": "regional"})
    webui.process(p, job)
    assert "start_at" in str(p._multi_concept.error)
    setattr(p, XYZ_ATTR, {"mode": "blend"})
    webui.process(p, job)
    assert p._multi_concept.error is None and p._multi_concept.job.mode == "blend"
