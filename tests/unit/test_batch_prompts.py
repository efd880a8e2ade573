"""Per-image prompts in a batch (Dynamic Prompts, wildcards, Prompt Matrix): the main prompt of
each image gives its own class-word positions and its own default concept prompt."""

import pytest
import torch

from lib_mc.job import JobError, parse_job
from lib_mc.prepare import parse_lora_tags, prepare
from tinyhost import make_unet


class Services:
    """`prepare`'s host side: a text encoder whose rows say which prompt they encode, and the
    prompt's token count (a longer prompt encodes to more tokens, as A1111's 75-token chunks do)."""

    model_arch = "sd1"

    def __init__(self):
        self.encoded = []

    def lora_names(self):
        return []

    def find_lora(self, name):
        return None

    def parse_tags(self, prompt):
        return parse_lora_tags(prompt)

    def word_positions(self, prompt, word):
        return [[1 + i] for i, w in enumerate(prompt.split()) if w == word]

    def encode(self, prompt, loras):
        self.encoded.append(prompt)
        tokens = 4 if len(prompt.split()) < 8 else 6
        row = torch.full((1, tokens, 32), float(len(self.encoded)))
        row[:, -1] = -float(len(self.encoded))   # the last token vector, which A1111 repeats to pad
        return {"c_crossattn": row}


@pytest.fixture(scope="module")
def unet():
    return make_unet()


def auto_job():
    return parse_job({"enabled": True, "concepts": [
        {"name": "him", "class_word": "man", "region": {"type": "auto"}},
        {"name": "her", "class_word": "woman", "region": {"type": "auto"}}]})


def test_class_words_are_found_in_each_images_prompt(unet):
    prompts = ["a man and a woman on a beach", "on a red beach a woman and a tall man"]
    prepared = prepare(auto_job(), base_prompt=prompts[0], base_prompts=prompts, base_negative="",
                       image_hw=(128, 128), unet=unet, services=Services())
    him, her = prepared.plan.concepts
    assert him.auto_tokens == [2] and her.auto_tokens == [5]
    assert him.auto_tokens_per_image == [[2], [10]] and her.auto_tokens_per_image == [[5], [6]]


def test_a_class_word_missing_from_one_images_prompt_names_that_image(unet):
    prompts = ["a man and a woman", "a man and a dog"]
    with pytest.raises(JobError, match=r"concepts\[1\].class_word.*image 2 \('a man and a dog'\)"):
        prepare(auto_job(), base_prompt=prompts[0], base_prompts=prompts, base_negative="",
                image_hw=(128, 128), unet=unet, services=Services())


def test_a_concept_without_its_own_prompt_takes_each_images_prompt(unet):
    prompts = ["a man on a beach", "a man in a very long and winding street at night", "a man on a beach"]
    the_job = parse_job({"enabled": True, "concepts": [
        {"name": "him", "region": {"type": "rect", "w": 0.5}},
        {"name": "her", "prompt": "a woman", "region": {"type": "rect", "x": 0.5, "w": 0.5}}]})
    services = Services()
    plan = prepare(the_job, base_prompt=prompts[0], base_prompts=prompts, base_negative="", image_hw=(128, 128),
                   unet=unet, services=services).plan
    rows = plan.concepts[0].cond["c_crossattn"]
    assert rows.shape == (3, 6, 32)               # the short prompt padded to the long one
    first, second = services.encoded.index(prompts[0]) + 1, services.encoded.index(prompts[1]) + 1
    assert rows[0, 0, 0] == first and rows[2, 0, 0] == first and rows[1, 0, 0] == second
    assert torch.equal(rows[0, 3:], torch.full((3, 32), -float(first)))   # padded with its last vector
    assert plan.concepts[1].cond["c_crossattn"].shape[0] == 1   # its own prompt: one row for all


def test_the_same_prompt_for_every_image_encodes_once(unet):
    services = Services()
    the_job = parse_job({"enabled": True, "concepts": [{"name": "him", "region": {"type": "rect", "w": 0.5}}]})
    plan = prepare(the_job, base_prompt="a man", base_prompts=["a man"] * 4, base_negative="", image_hw=(128, 128),
                   unet=unet, services=services).plan
    assert services.encoded == ["a man"] and plan.concepts[0].cond["c_crossattn"].shape[0] == 1

