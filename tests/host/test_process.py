"""The WebUI hooks' checks of the job and the processing object, before any model work."""

from types import SimpleNamespace

from lib_mc.hosts import webui


def test_a_prompt_list_never_turns_the_extension_off_with_a_type_error():
    """Prompt Matrix sets p.prompt to a list; AND in any of them is refused by name."""
    p = SimpleNamespace(prompt=["a man", "a man, red"], sampler_name="Euler a", extra_generation_params={})
    webui.process(p, {"enabled": True, "concepts": [{"name": "a", "region": {"type": "rect", "w": 0.5}}]})
    assert p._multi_concept.error is None and p._multi_concept.job is not None
    p.prompt = ["a man", "a man AND a dog"]
    webui.process(p, {"enabled": True, "concepts": [{"name": "a", "region": {"type": "rect", "w": 0.5}}]})
    assert "AND" in str(p._multi_concept.error)
