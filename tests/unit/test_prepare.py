"""Job -> Plan through the HostServices protocol: LoRA resolution, tags, text-encoder LoRAs,
architecture and shape misfits, masks. Real LoRA files on the tiny real UNet; the host side is
the small protocol `prepare` asks of an adapter."""

import pytest
import torch
from ldm.modules.diffusionmodules.openaimodel import UNetModel

from lib_mc.job import JobError, parse_job
from lib_mc.prepare import LoraFile, parse_lora_tags, prepare
from lib_mc.regions import encode_png
from tinyhost import make_unet, random_context, write_lora


class Services:
    """The host side of `prepare`: a LoRA list, a text encoder that records its calls."""

    def __init__(self, files: dict[str, LoraFile], model_arch: str = "sd1"):
        self.files, self.model_arch, self.encoded = files, model_arch, []

    def lora_names(self):
        return list(self.files)

    def find_lora(self, name):
        return self.files.get(name)

    def parse_tags(self, prompt):
        return parse_lora_tags(prompt)

    def word_positions(self, prompt, word):   # one token per word, after the start token
        words = prompt.split()
        return [[1 + i] for i, w in enumerate(words) if w == word]

    def encode(self, prompt, loras):
        self.encoded.append((prompt, [(lora.name, weight) for lora, weight in loras]))
        return {"c_crossattn": random_context(len(self.encoded))}


@pytest.fixture(scope="module")
def unet():
    return make_unet()


@pytest.fixture(scope="module")
def files(unet, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    write_lora(folder / "alice_v1.safetensors", unet, seed=1)
    write_lora(folder / "bob_v1.safetensors", unet, seed=2)
    # same layer names, other widths: a LoRA for another model family
    torch.manual_seed(0)
    wide = UNetModel(image_size=32, in_channels=4, out_channels=4, model_channels=64, attention_resolutions=[1, 2, 4],
                     num_res_blocks=1, channel_mult=(1, 2, 2, 2), num_heads=2, use_spatial_transformer=True,
                     transformer_depth=1, context_dim=32, legacy=False)
    write_lora(folder / "wide.safetensors", wide, seed=4)
    return {
        "alice_v1": LoraFile("alice_v1", str(folder / "alice_v1.safetensors"), "sd1"),
        "bob_v1": LoraFile("bob_v1", str(folder / "bob_v1.safetensors"), None),
        "xl_style": LoraFile("xl_style", str(folder / "alice_v1.safetensors"), "sdxl"),
        "wide": LoraFile("wide", str(folder / "wide.safetensors"), "sd1"),
    }


def job(*concepts, **top):
    return parse_job({"enabled": True, "concepts": list(concepts), **top})


def run(unet, services, the_job, warn=None):
    messages = []
    prepared = prepare(the_job, base_prompt="a man and a woman on a beach", base_negative="blurry",
                       image_hw=(256, 256), unet=unet, services=services, warn=warn or messages.append)
    return prepared, messages


def test_two_concepts_become_a_plan(unet, files):
    services = Services(files)
    prepared, messages = run(unet, services, job(
        {"name": "left", "loras": [{"name": "alice_v1", "weight": 0.8}], "prompt": "photo of alice",
         "region": {"type": "rect", "x": 0, "y": 0, "w": 0.5, "h": 1}},
        {"name": "right", "loras": [{"name": "bob_v1"}], "negative_prompt": "ugly",
         "region": {"type": "rect", "x": 0.5, "y": 0, "w": 0.5, "h": 1}}, start_at=0.25))
    plan = prepared.plan
    assert [c.name for c in plan.concepts] == ["left", "right"] and messages == []
    assert plan.options.start_at == 0.25
    assert [(u.network.name, u.weight) for u in plan.concepts[0].loras] == [("alice_v1", 0.8)]
    assert [(u.network.name, u.weight) for u in plan.concepts[1].loras] == [("bob_v1", 1.0)]
    # the concept's prompt with its own LoRA's text-encoder side; an empty prompt is the base prompt;
    # an empty negative keeps the host's negative rows (None), a given one is encoded with the LoRAs
    assert services.encoded == [("photo of alice", [("alice_v1", 0.8)]),
                                ("a man and a woman on a beach", [("bob_v1", 1.0)]),
                                ("ugly", [("bob_v1", 1.0)])]
    assert plan.concepts[0].uncond is None and plan.concepts[1].uncond is not None
    left = plan.concepts[0].mask
    assert left.shape == (256, 256) and left[:, :128].min() == 1 and left[:, 128:].max() == 0


def test_lora_tags_in_a_concept_prompt_are_taken_out_and_applied(unet, files):
    services = Services(files)
    prepared, _ = run(unet, services, job({"name": "a", "prompt": "photo of <lora:alice_v1:0.6> alice"}))
    assert services.encoded[0] == ("photo of  alice", [("alice_v1", 0.6)])
    assert [(u.network.name, u.weight) for u in prepared.plan.concepts[0].loras] == [("alice_v1", 0.6)]


def test_parse_lora_tags_keeps_other_extra_networks_and_rejects_bad_weights():
    assert parse_lora_tags("a <hypernet:x:1> <lora:y> b") == ("a <hypernet:x:1>  b", [("y", 1.0)])
    with pytest.raises(JobError, match="weight that is not a number"):
        parse_lora_tags("<lora:y:heavy>")


def test_unknown_lora_names_the_field_and_suggests_close_names(unet, files):
    with pytest.raises(JobError) as caught:
        run(unet, Services(files), job({"name": "a"}, {"name": "b", "loras": [{"name": "alice_v2"}]}))
    assert str(caught.value).startswith("concepts[1].loras[0]: unknown LoRA 'alice_v2'")
    assert "'alice_v1'" in str(caught.value)
    with pytest.raises(JobError, match=r"concepts\[0\]\.prompt <lora:zzz>: unknown LoRA 'zzz'.*Lora tab"):
        run(unet, Services(files), job({"name": "a", "prompt": "x <lora:zzz:1>"}))


def test_lora_for_another_architecture_is_skipped_by_name(unet, files):
    services = Services(files)
    prepared, messages = run(unet, services, job({"name": "a", "loras": [{"name": "xl_style"}, {"name": "alice_v1"}]}))
    assert [u.network.name for u in prepared.plan.concepts[0].loras] == ["alice_v1"]
    assert prepared.skipped_loras == ["xl_style"]
    assert messages == ["[Multi-Concept] LoRA 'xl_style' (concepts[0]) is for SDXL but the model is SD1: skipped"]
    assert services.encoded[0][1] == [("alice_v1", 1.0)]   # nor does its text-encoder side apply


def test_lora_whose_shapes_do_not_fit_the_model_is_skipped_by_name(unet, files):
    prepared, messages = run(unet, Services(files), job({"name": "a", "loras": [{"name": "wide"}]}))
    assert prepared.plan.concepts[0].loras == [] and prepared.skipped_loras == ["wide"]
    assert len(messages) == 1 and "'wide'" in messages[0] and messages[0].endswith("(concepts[0]): skipped")


def test_a_lora_file_is_read_once_per_job(unet, files):
    cache = {}
    the_job = job({"name": "a", "loras": [{"name": "alice_v1"}]}, {"name": "b", "loras": [{"name": "alice_v1", "weight": 0.5}]})
    prepared = prepare(the_job, base_prompt="p", base_negative="", image_hw=(64, 64), unet=unet,
                       services=Services(files), networks_cache=cache, warn=lambda m: None)
    first, second = (c.loras[0] for c in prepared.plan.concepts)
    assert list(cache) == [files["alice_v1"].path] and first.network is second.network
    assert (first.weight, second.weight) == (1.0, 0.5)


def test_uploaded_mask_of_another_size_and_bad_masks(unet, files):
    mask = torch.zeros(60, 100)
    mask[:, 50:] = 1
    prepared, _ = run(unet, Services(files), job({"name": "a", "region": {"type": "mask", "png": encode_png(mask)}}))
    assert prepared.plan.concepts[0].mask.shape == (60, 100)
    weights = prepared.plan.regions.latent   # stretched to the image, at latent size (32x32)
    assert weights.shape == (2, 32, 32)
    assert weights[1, :, :15].max() == 0 and weights[1, :, 17:].min() == 1
    with pytest.raises(JobError, match=r"concepts\[0\].*all zero"):
        run(unet, Services(files), job({"name": "a", "region": {"type": "mask", "png": encode_png(torch.zeros(8, 8))}}))


def test_automatic_regions_watch_their_class_words_tokens(unet, files):
    auto = {"type": "auto"}
    boxed = {"type": "auto", "x": 0.5, "y": 0.1, "w": 0.5, "h": 0.9}
    prepared, _ = run(unet, Services(files), job({"name": "him", "class_word": "man", "region": auto},
                                                 {"name": "her", "class_word": "woman", "region": boxed},
                                                 {"name": "drawn", "region": {"type": "rect", "w": 0.5}}))
    him, her, drawn = prepared.plan.concepts   # "a man and a woman on a beach": man = 2, woman = 5
    assert (him.auto_tokens, her.auto_tokens) == ([2], [5]) and him.auto_group != her.auto_group
    assert him.auto_box is None and her.auto_box == (0.5, 0.1, 0.5, 0.9)
    assert (him.auto_word, her.auto_word) == ("man", "woman")   # Grounding DINO is prompted with them
    whole = {"type": "auto", "x": 0, "y": 0, "w": 1, "h": 1}   # "auto in rectangle" never drawn: no box
    unboxed, _ = run(unet, Services(files), job({"name": "him", "class_word": "man", "region": whole}))
    assert unboxed.plan.concepts[0].auto_box is None
    assert him.mask is None and drawn.auto_tokens is None and drawn.mask is not None
    assert prepared.plan.auto_concepts == [0, 1]


def test_one_class_word_for_two_concepts_is_shared_and_split(unet, files):
    auto = {"type": "auto"}
    prepared, _ = run(unet, Services(files), job({"class_word": "man", "region": auto},
                                                 {"name": "Right man", "class_word": "man", "region": auto}))
    first, second = prepared.plan.concepts
    assert first.auto_tokens == second.auto_tokens == [2] and first.auto_group == second.auto_group
    assert (first.auto_hint, second.auto_hint) == ("", "right")


def test_automatic_regions_without_a_usable_class_word_are_named(unet, files):
    with pytest.raises(JobError, match=r"concepts\[0\].class_word: is empty: an automatic region"):
        run(unet, Services(files), job({"name": "a", "region": {"type": "auto"}}))
    with pytest.raises(JobError, match=r"concepts\[1\].class_word: 'women' is not in the main prompt"):
        run(unet, Services(files), job({"class_word": "man", "region": {"type": "auto"}},
                                       {"class_word": "women", "region": {"type": "auto"}}))


def test_refine_regions_turns_on_stage2_refinement(unet, files):
    auto = {"type": "auto"}
    prepared, _ = run(unet, Services(files), job({"class_word": "man", "region": auto}, refine_regions=True))
    assert prepared.plan.options.refine_every == 2
    prepared, _ = run(unet, Services(files), job({"class_word": "man", "region": auto}))
    assert prepared.plan.options.refine_every == 0
