"""Gradient passes (conductor's layout alignment, regional concept enhancement) through a UNet
as Forge builds and runs it: built inside `torch.inference_mode()` (its weights and the LoRA
tensors loaded during a job are inference tensors, which autograd may not save for a backward),
and with transformer blocks that add their attention outputs to x in place (`x += n`, after a
LayerNorm saved x). Both must run there, give the image they give on A1111's kind of model, and
leave the model as it was."""

import pytest
import torch

import test_conductor_align as align_tests
import test_regional_enhance as enhance_tests
from k_diffusion.external import CompVisDenoiser
from ldm.modules.attention import BasicTransformerBlock

from lib_mc.engine import make_session
from tinyhost import CFGHost, sample, two_lora_world


class InPlaceResidualBlock(BasicTransformerBlock):
    """Forge's BasicTransformerBlock: the attention outputs added to x in place."""

    def _forward(self, x, context=None):
        n = self.attn1(self.norm1(x), context=context if self.disable_self_attn else None)
        x += n
        n = self.attn2(self.norm2(x), context=context)
        x += n
        return self.ff(self.norm3(x)) + x


def forge_like(world):
    """The world's UNet with Forge's in-place residual adds in every transformer block."""
    for module in world["unet"].modules():
        if type(module) is BasicTransformerBlock:
            module.__class__ = InPlaceResidualBlock
    return world


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    normal = two_lora_world(tmp_path_factory.mktemp("normal"))
    with torch.inference_mode():   # the same seeds: the same weights, as inference tensors
        inference = forge_like(two_lora_world(tmp_path_factory.mktemp("inference")))
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


class ForgeLikeDenoiser(CompVisDenoiser):
    """Forge's eps prediction: x0 = x - eps * sigma with the very sigma the sampler passed (a
    tensor made in inference mode), which autograd saves for the backward."""

    def forward(self, x, sigma, **kwargs):
        c_in = 1 / (sigma ** 2 + 1) ** 0.5
        eps = self.get_eps(x * c_in[:, None, None, None], self.sigma_to_t(sigma), **kwargs)
        return x - eps * sigma[:, None, None, None]


def enhanced(world, forge_like_denoiser=False, steps=4):
    session = make_session("regional", world["unet"], enhance_tests.plan_of(world))
    host = CFGHost(world["ldm"], world["cond"], world["uncond"])
    if forge_like_denoiser:
        host.inner = ForgeLikeDenoiser(world["ldm"])
    host.route = session.denoise
    with session.single_pass():
        return sample(host, steps=steps), session


def test_concept_enhancement_runs_on_inference_weights_as_on_normal_ones(worlds):
    normal, inference = worlds
    expected, session = enhanced(normal)
    assert session.stats.enhance_rows > 0
    with torch.inference_mode():
        out, session = enhanced(inference, forge_like_denoiser=True)
    assert session.stats.enhance_rows > 0
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    assert align_tests.unpatched(inference["unet"])


def test_the_forge_like_blocks_add_in_place_and_fail_a_plain_backward(worlds):
    """The stand-in is faithful: a backward through one of its blocks fails as Forge's does."""
    _, inference = worlds
    block = next(m for m in inference["unet"].modules() if isinstance(m, InPlaceResidualBlock))
    x = torch.randn(1, 4, block.norm1.normalized_shape[0], requires_grad=True)
    context = torch.randn(1, 8, block.attn2.to_k.in_features)
    with pytest.raises(RuntimeError, match="modified by an inplace operation|Inference tensors"):
        block(x * 1, context=context).sum().backward()
