"""Gradient passes on a model built under inference mode, as Forge builds its models (inside
`torch.inference_mode()`): its UNet weights and the LoRA tensors loaded during a job are
inference tensors, which autograd may not save for a backward. Conductor's layout alignment and
regional concept enhancement must run there, give the image they give on normal weights, and
leave the model as it was."""

import pytest
import torch

import test_conductor_align as align_tests
import test_regional_enhance as enhance_tests
from tinyhost import two_lora_world


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    normal = two_lora_world(tmp_path_factory.mktemp("normal"))
    with torch.inference_mode():   # the same seeds: the same weights, as inference tensors
        inference = two_lora_world(tmp_path_factory.mktemp("inference"))
    assert all(p.is_inference() for p in inference["unet"].parameters())
    assert not any(p.is_inference() for p in normal["unet"].parameters())
    return normal, inference


def weights(world):
    return {name: p.clone() for name, p in world["unet"].named_parameters()}


def test_layout_alignment_runs_on_inference_weights_as_on_normal_ones(worlds):
    normal, inference = worlds
    reference = align_tests.reference_latent()
    expected, _, session = align_tests.conduct(normal, reference, steps=6)
    assert session.stats.align_rows > 0
    before = weights(inference)
    with torch.inference_mode():   # Forge samples inside inference mode
        out, _, session = align_tests.conduct(inference, reference, steps=6)
    assert session.stats.align_rows > 0
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    assert align_tests.unpatched(inference["unet"])
    after = weights(inference)
    assert all(torch.equal(after[n], before[n]) and inference["unet"].get_parameter(n).is_inference() for n in before)


def test_concept_enhancement_runs_on_inference_weights_as_on_normal_ones(worlds):
    normal, inference = worlds
    expected, session = enhance_tests.run(normal, enhance_tests.plan_of(normal))
    assert session.stats.enhance_rows > 0
    with torch.inference_mode():
        out, session = enhance_tests.run(inference, enhance_tests.plan_of(inference))
    assert session.stats.enhance_rows > 0
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    assert align_tests.unpatched(inference["unet"])
