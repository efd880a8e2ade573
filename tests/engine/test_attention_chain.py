"""Other extensions' attention patches keep acting under the engine (issue 13 item 4).

An IP-Adapter-shaped patch, as sd-webui-controlnet installs one on every attn2 module
(scripts/ipadapter/plugable_ipadapter.py: the query also attends over image-embedding keys and
values, and that attention is added to the module's output), is put on the real ldm attention
modules of the tiny UNet before the engine's patches (so ours chain onto it) and after them
(it chains onto ours). In stage 2, with layout replay, self-attention replay and a concept prompt
of another length, it must act on every row of every call, and each concept's region must be
what a plain run of that concept (its LoRA merged, the same patch on) predicts.
"""

import pytest
import torch
import torch.nn.functional as F
from k_diffusion.external import CompVisDenoiser
from torch import nn

from lib_mc.engine import MultiConceptSession
from lib_mc.hooks.attention import attend
from lib_mc.hooks.state import CallState
from lib_mc.patcher import PatchSet
from lib_mc.plan import build_plan
from lib_mc.rows import RowPlan
from tinyhost import CONTEXT_DIM, TinyLDM, merged_copy, two_lora_world

IMAGE = (128, 128)   # latent 16 x 16


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return two_lora_world(tmp_path_factory.mktemp("loras"))


class ImagePromptPatch:
    """Per attn2 module (by name, so it goes on copies of the UNet too): softmax(q K_ip^T) V_ip
    through to_out's weight, added to the module's output, as if added before to_out the way
    IP-Adapter adds it. Counts the rows it saw."""

    def __init__(self, unet: nn.Module, seed: int = 7, tokens: int = 4):
        gen = torch.Generator().manual_seed(seed)
        self.image_tokens = torch.randn((1, tokens, CONTEXT_DIM), generator=gen)
        self.kv = {}
        for name, module in unet.named_modules():
            if name.endswith("attn2"):
                inner = module.to_q.out_features
                self.kv[name] = (torch.randn((inner, CONTEXT_DIM), generator=gen) * 0.5,
                                 torch.randn((inner, CONTEXT_DIM), generator=gen) * 0.5)
        self.rows: list[int] = []

    def patches(self, unet: nn.Module) -> PatchSet:
        patches = PatchSet()
        for name, module in unet.named_modules():
            if name in self.kv:
                patches.add(module, "forward", lambda original, module=module, name=name: self._forward(module, name, original))
        return patches

    def _forward(self, module, name, original):
        def forward(x, context=None, mask=None, **kwargs):
            out = original(x, context=context, mask=mask, **kwargs)
            self.rows.append(x.shape[0])
            to_k, to_v = self.kv[name]
            q = module.to_q(x)
            image = self.image_tokens.expand(x.shape[0], -1, -1)
            heads = module.heads
            split = [t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)
                     for t in (q, F.linear(image, to_k), F.linear(image, to_v))]
            extra = F.scaled_dot_product_attention(*split).transpose(1, 2).reshape(q.shape)
            # to_out is affine: to_out(a + b) = to_out(a) + to_out(b) - bias (LoRA deltas included)
            return out + module.to_out(extra) - module.to_out[0].bias
        return forward


def plan_of(world, layout_replay=True):
    left, right = torch.zeros(IMAGE), torch.zeros(IMAGE)
    left[:, :48] = 1
    right[:64, 80:] = 1
    # alice's prompt has 12 tokens, the main prompt 8: contexts of other lengths in one call
    return build_plan([dict(name="alice", cond=world["alice_cond"], loras=[(world["alice"], 0.8)], mask=left),
                       dict(name="bob", cond=world["bob_cond"], loras=[(world["bob"], 1.0)], mask=right)],
                      IMAGE, start_at=0.0, layout_replay=layout_replay, self_attn_replay_until=1.0)


def one_call(world, session, patch=None, when=None, batch=2):
    """Stage 1 and stage 2 of one A1111-shaped denoiser call; `patch` installed `when`
    ("before" the engine's patches, "after" them, or None)."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn((batch, 4, 16, 16), generator=gen) * 3
    x_in, sigma_in = torch.cat([x, x]), torch.full((2 * batch,), 3.0)
    cond_in = {"c_crossattn": torch.cat([world["cond"].expand(batch, -1, -1), world["uncond"].expand(batch, -1, -1)])}
    denoiser = CompVisDenoiser(world["ldm"])
    model_fn = lambda xx, ss, cc: denoiser(xx, ss, cond=cc)   # noqa: E731
    other = patch.patches(world["unet"]) if patch is not None else PatchSet()
    with torch.no_grad():
        if when == "before":
            other.apply()
        try:
            with session.stage1():
                session.denoise(model_fn, x_in, sigma_in, cond_in, n_cond=batch, step=0, total_steps=1)
            if patch is not None:
                patch.rows.clear()
            with session.stage2():
                if when == "after":
                    other.apply()
                try:
                    out = session.denoise(model_fn, x_in, sigma_in, cond_in, n_cond=batch, step=0, total_steps=1)
                finally:
                    if when == "after":
                        other.remove()
        finally:
            other.remove()
    return x_in, sigma_in, out


def padded(context, tokens=12):
    """As the engine stacks it beside alice's 12-token prompt (A1111's stack_conds padding)."""
    return torch.cat([context, context[:, -1:].expand(-1, tokens - context.shape[1], -1)], 1)


def plain_prediction(world, patch, parts, cond, x_in, sigma_in, batch=2):
    """A plain run of the UNet with the concept's LoRA merged and the same patch on."""
    unet = merged_copy(world["unet"], parts)
    denoiser = CompVisDenoiser(TinyLDM(unet))
    context = torch.cat([padded(cond).expand(batch, -1, -1), padded(world["uncond"]).expand(batch, -1, -1)])
    with torch.no_grad(), patch.patches(unet):
        return denoiser(x_in, sigma_in, cond={"c_crossattn": context})


@pytest.mark.parametrize("when", ["before", "after"])
def test_an_image_prompt_patch_acts_on_every_row_in_stage2(world, when):
    patch = ImagePromptPatch(world["unet"])
    session = MultiConceptSession(world["unet"], plan_of(world))
    x_in, sigma_in, out = one_call(world, session, patch, when)
    # one stage-2 UNet call: layout 2 + base 4 + two concepts x 4 rows, through every attn2
    assert patch.rows == [14] * len(patch.kv)
    weights = session.plan.regions.latent
    for index, parts, cond in ((1, [(world["alice_parts"], 0.8)], world["alice_cond"]),
                               (2, [(world["bob_parts"], 1.0)], world["bob_cond"])):
        reference = plain_prediction(world, patch, parts, cond, x_in, sigma_in)
        inside = weights[index] == 1
        torch.testing.assert_close(out[..., inside], reference[..., inside], atol=2e-5, rtol=1e-4)


def test_the_patch_changes_the_concepts_prediction(world):
    """Not vacuous: the same concept without the patch predicts something else."""
    patch = ImagePromptPatch(world["unet"])
    session = MultiConceptSession(world["unet"], plan_of(world))
    _, _, with_patch = one_call(world, session, patch, "before")
    _, _, without = one_call(world, MultiConceptSession(world["unet"], plan_of(world)))
    inside = session.plan.regions.latent[1] == 1
    assert (with_patch[..., inside] - without[..., inside]).abs().max() > 1e-2


def test_replay_is_taken_from_the_chained_attention_output(world):
    """Forge's form: `attend` runs the host's (chained) attention on every row, then the base
    cond rows take the layout rows' cross-attention output, or the layout rows' self-attention
    probabilities over their own values."""
    rows = RowPlan()
    rows.add("layout", 1, 0)
    rows.add("base", 1, 1)
    rows.add("concept", 1, 1, index=0)
    call = CallState(rows, replay_cross=True, replay_self_max_tokens=16)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn((5, 16, 8), generator=gen) for _ in range(3))
    seen = []

    def host(q_, k_, v_):   # an attention with another extension's term added to every row
        seen.append(q_.shape[0])
        split = [t.view(5, 16, 2, 4).transpose(1, 2) for t in (q_, k_, v_)]
        return F.scaled_dot_product_attention(*split).transpose(1, 2).reshape(5, 16, 8) + 1.0

    chained = host(q, k, v)
    cross = attend(q, k, v, 2, call, cross=True, decoder=False, host=host)
    assert seen == [5, 5]
    torch.testing.assert_close(cross[1], chained[0])        # base cond row = the layout row's output
    torch.testing.assert_close(cross[[0, 2, 3, 4]], chained[[0, 2, 3, 4]])
    self_out = attend(q, k, v, 2, call, cross=False, decoder=False, host=host)
    split = [t.view(t.shape[0], 16, 2, 4).transpose(1, 2) for t in (q[:1], k[:1], v[1:2])]
    probs = (split[0] @ split[1].transpose(-1, -2) * 0.5).softmax(-1)
    expected = (probs @ split[2]).transpose(1, 2).reshape(1, 16, 8)
    torch.testing.assert_close(self_out[1:2], expected)
    torch.testing.assert_close(self_out[[0, 2, 3, 4]], chained[[0, 2, 3, 4]])
