"""Prompt variants (Concept Conductor): a concept with identity words and no prompt of its own
gets the main prompt with every concept's class word replaced by them, in every mode and for
each image's own prompt; a class word missing from the prompt is a warning, not a variant."""

import pytest

from lib_mc.job import parse_job
from lib_mc.prepare import prepare
from lib_mc.prompt_variants import concept_variant, has_word, prompt_variant
from test_prepare import Services, job, run
from tinyhost import make_unet

LEFT = {"type": "rect", "x": 0, "y": 0, "w": 0.5, "h": 1}
RIGHT = {"type": "rect", "x": 0.5, "y": 0, "w": 0.5, "h": 1}


@pytest.fixture(scope="module")
def unet():
    return make_unet()


def test_every_class_word_becomes_the_identity_words():
    assert prompt_variant("a man and a woman on a beach", ["man", "woman"], "alice woman") == \
        "a alice woman and a alice woman on a beach"
    assert prompt_variant("a man and a woman on a beach", ["man", "woman"], "bob man") == \
        "a bob man and a bob man on a beach"


def test_whole_words_in_any_case_and_never_inside_tags():
    text = "A Man, (woman:1.2), womanly manners, men <lora:woman_style:0.5> [man:dog:5]"
    assert prompt_variant(text, ["man", "woman"], "alice woman") == \
        "A alice woman, (alice woman:1.2), womanly manners, men <lora:woman_style:0.5> [alice woman:dog:5]"
    assert prompt_variant("a young woman and a woman", ["woman", "young woman"], "alice") == "a alice and a alice"
    assert prompt_variant("a man", ["man"], "  ") == "a man" and prompt_variant("a man", ["", " "], "x") == "a man"
    assert has_word("a Woman here", "woman") and not has_word("womanly", "woman")
    assert not has_word("<lora:woman:1> a man", "woman")


def test_only_a_concept_with_a_token_no_prompt_and_its_class_word_in_the_prompt_gets_one():
    specs = parse_job({"concepts": [
        {"name": "a", "class_word": "man", "token": "bob man"},
        {"name": "b", "class_word": "woman", "token": "alice woman", "prompt": "photo of alice"},
        {"name": "c", "class_word": "woman"},
        {"name": "d", "class_word": "dog", "token": "rex dog"}]}).concepts
    prompt = "a man and a woman"
    assert concept_variant(prompt, specs, 0) == "a bob man and a bob man"
    assert [concept_variant(prompt, specs, i) for i in (1, 2, 3)] == [None, None, None]


def concepts():
    return ({"name": "bob", "class_word": "man", "token": "bob man", "region": LEFT},
            {"name": "alice", "class_word": "woman", "token": "alice woman", "region": RIGHT})


@pytest.mark.parametrize("mode", ["blend", "regional", "conductor"])
def test_each_branch_is_encoded_with_its_variant_in_every_mode(unet, mode):
    services = Services({})
    prepared, _ = run(unet, services, job(*concepts(), mode=mode))
    encoded = [text for text, _ in services.encoded]
    assert encoded == ["a bob man and a bob man on a beach", "a alice woman and a alice woman on a beach"]
    assert not prepared.warnings


def test_an_own_prompt_is_kept_and_no_token_keeps_the_main_prompt(unet):
    services = Services({})
    run(unet, services, job({**concepts()[0], "prompt": "photo of bob"}, {**concepts()[1], "token": ""}))
    assert [text for text, _ in services.encoded] == ["photo of bob", "a man and a woman on a beach"]


def test_a_class_word_missing_from_the_prompt_warns_naming_the_concept(unet):
    services = Services({})
    prepared, messages = run(unet, services, job({"name": "rex", "class_word": "dog", "token": "rex dog",
                                                   "region": LEFT}, concepts()[1]))
    # the job's class words are dog and woman: alice's variant leaves "man" as it is
    assert [text for text, _ in services.encoded] == ["a man and a woman on a beach",
                                                      "a man and a alice woman on a beach"]
    assert len(prepared.warnings) == 1 and "'rex'" in prepared.warnings[0] and "'dog'" in prepared.warnings[0]
    assert "main prompt" in prepared.warnings[0] and any("'rex'" in m for m in messages)
    services = Services({})
    prepared, _ = run(unet, services, job({"name": "nameless", "token": "rex dog", "region": LEFT}))
    assert "'nameless'" in prepared.warnings[0] and "no class word" in prepared.warnings[0]


def test_each_image_of_a_batch_gets_the_variant_of_its_own_prompt(unet):
    services = Services({})
    prompts = ["a man and a woman on a beach", "a man and a woman in a forest", "a woman in a city"]
    prepared = prepare(job(*concepts()), base_prompt=prompts[0], base_prompts=prompts, base_negative="",
                       image_hw=(256, 256), unet=unet, services=services, warn=lambda m: None)
    encoded = [text for text, _ in services.encoded]
    assert encoded == ["a bob man and a bob man on a beach", "a bob man and a bob man in a forest",
                       "a woman in a city",   # image 3 has no man: bob's branch takes its main prompt
                       "a alice woman and a alice woman on a beach", "a alice woman and a alice woman in a forest",
                       "a alice woman in a city"]
    assert [c.cond["c_crossattn"].shape[0] for c in prepared.plan.concepts] == [3, 3]
    assert len(prepared.warnings) == 1 and "'bob'" in prepared.warnings[0] and "image 3" in prepared.warnings[0]
