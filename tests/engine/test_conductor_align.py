"""Conductor mode's layout from a reference picture (Concept Conductor's layout alignment) on the
real ldm UNet with kohya LoRAs and k-diffusion's samplers: the reference DDIM-inverted over the
sampler's own sigmas with the paper's layer's keys kept at every level, the latent moved by
gradient descent on the keys' MSE during the first steps and handed to the sampler, automatic
regions found in the reference, and nothing of it without a reference."""

import pytest
import torch
from k_diffusion import sampling
from k_diffusion.external import CompVisDenoiser

from lib_mc.conds import pad_context
from lib_mc.engine import make_session
from lib_mc.errors import EngineError
from lib_mc.methods.base import HostPass
from lib_mc.methods.calls import CallImages
from lib_mc.methods.conductor.align import LayoutAlignment, key_loss
from lib_mc.methods.conductor.layers import alignment_layer
from lib_mc.methods.schedule import SamplerSchedule
from lib_mc.plan import build_plan
from planted import cells, covers, plant
from tinyhost import CFGHost, TinyLDM, euler_pass, make_unet, random_context, two_lora_world

IMAGE = (128, 128)   # latent 16 x 16; the alignment layer (latent / 4) has 4 x 4 tokens


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return two_lora_world(tmp_path_factory.mktemp("loras"))


@pytest.fixture(scope="module")
def calm_world(tmp_path_factory):
    """The same kind of world with the UNet's output projection scaled down: a smoother random
    denoiser, on which DDIM inversion's first-order error is small enough to watch it converge."""
    world = two_lora_world(tmp_path_factory.mktemp("calm"))
    with torch.no_grad():
        world["unet"].out[-1].weight.mul_(0.1)
        world["unet"].out[-1].bias.mul_(0.1)
    return world


def reference_latent(seed=7):
    return torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(seed)) * 0.8


def left_half():
    mask = torch.zeros(IMAGE)
    mask[:, :64] = 1
    return mask


def plan_of(world, **options):
    return build_plan([dict(name="alice", cond=world["alice_cond"], loras=[(world["alice"], 0.8)], mask=left_half())],
                      IMAGE, **{"start_at": 0.0, "mask_refine": False, **options})


def unpatched(unet):
    return not [n for n, m in unet.named_modules() if "forward" in vars(m)]


class AligningHost(CFGHost):
    """A1111's CFG denoiser shape (tests/tinyhost.py) that, as the A1111 glue does, writes the
    latents the engine moved during a call into the sampler's own x when the call returns. It
    keeps the x the sampler continues from after each call, and whether gradients were on."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pending: dict = {}
        self.seen: list = []
        self.grad: list = []

    def moved(self, latents):
        self.pending.update(latents)

    def __call__(self, x, sigma):
        out = super().__call__(x, sigma)
        for b, latent in self.pending.items():
            x[b] = latent
        self.pending = {}
        self.seen.append((x.clone(), sigma.clone()))
        self.grad.append(torch.is_grad_enabled())
        return out


def conduct(world, reference, steps=8, plan=None, **options):
    """One conductor run through session.sample with k-diffusion's Euler. -> (image, host, session)."""
    plan = plan or plan_of(world, **options)
    session = make_session("conductor", world["unet"], plan)
    host = AligningHost(world["ldm"], world["cond"], world["uncond"])
    host.route = session.denoise
    initial = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(0))
    out = session.sample(euler_pass(host, steps, initial, reference=reference, latent_moved=host.moved))
    return out, host, session


def inverted(world, reference, steps):
    """The reference inverted by the engine over Euler's sigmas for `steps` (keys at every level),
    as the first host call of a conductor pass does it."""
    session = make_session("conductor", world["unet"], plan_of(world, align_until=1.0))
    denoiser = CompVisDenoiser(world["ldm"])
    sigmas = denoiser.get_sigmas(steps)
    alignment = LayoutAlignment(session, HostPass(sample=None, initial=None, replay_noise=None, reference=reference,
                                                  schedule=SamplerSchedule(sigmas)))
    x = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(1)) * sigmas[0]
    cond = {"c_crossattn": torch.cat([world["cond"], world["uncond"]])}
    with torch.no_grad(), session.single_pass():
        # a call past the alignment window: the inversion only
        alignment.before_call(lambda xx, ss, cc: denoiser(xx, ss, cond=cc), torch.cat([x, x]), sigmas[:1].repeat(2),
                              cond, CallImages((0,), (0,)), step=steps, total_steps=steps)
    assert unpatched(world["unet"])
    return alignment.references[0], sigmas, session


def main_prompt(world):
    """The main prompt as the branch calls pad it (to alice's longer prompt)."""
    return {"c_crossattn": pad_context(world["cond"], world["alice_cond"].shape[1])}


def base_keys(world, x, sigma):
    """The alignment layer's keys of the plain UNet (main prompt, no LoRA) on x at sigma."""
    _, attn = alignment_layer(world["unet"])
    keys = []
    handle = attn.to_k.register_forward_hook(lambda m, args, out: keys.append(out.detach().clone()))
    try:
        with torch.no_grad():
            CompVisDenoiser(world["ldm"])(x, sigma, cond=main_prompt(world))
    finally:
        handle.remove()
    return keys[0]


def test_inversion_keeps_the_alignment_layers_keys_at_every_sigma_and_reconstructs_the_reference(calm_world):
    world, reference = calm_world, reference_latent()
    errors = {}
    for steps in (10, 40):
        inv, sigmas, session = inverted(world, reference, steps)
        assert sorted(inv.keys) == sorted(float(s) for s in sigmas[:-1])
        assert session.stats.invert_rows == steps + 1   # the clean latent's noise, then one per level
        top = float(sigmas[0])
        assert inv.keys[top].shape == (1, 16, 64)
        # the keys at a level are the layer's own on the inverted latent there
        torch.testing.assert_close(inv.keys[top], base_keys(world, inv.top, sigmas[:1]), rtol=1e-4, atol=1e-5)
        assert (inv.keys[top] - inv.keys[float(sigmas[-2])]).abs().max() > 1e-2
        # DDIM (Euler in sigma space, no CFG) from the top inverted latent comes back to the reference
        denoiser = CompVisDenoiser(world["ldm"])
        with torch.no_grad():
            back = sampling.sample_euler(lambda x, s: denoiser(x, s, cond=main_prompt(world)), inv.top.clone(),
                                         sigmas, disable=True)
            from_noise = sampling.sample_euler(lambda x, s: denoiser(x, s, cond=main_prompt(world)),
                                               torch.randn(reference.shape, generator=torch.Generator().manual_seed(2)) * sigmas[0],
                                               sigmas, disable=True)
        errors[steps] = float((back - reference).abs().mean())
        assert errors[steps] < 0.05 * float((from_noise - reference).abs().mean())
    scale = float(reference.abs().mean())
    assert errors[40] < 0.2 * scale and errors[40] < 0.6 * errors[10], (errors, scale)   # first order: converges


def test_alignment_moves_the_samplers_latent_towards_the_references_keys(world):
    reference, steps = reference_latent(), 8
    inv, _, _ = inverted(world, reference, steps)
    aligned, host, session = conduct(world, reference, steps)
    plain, plain_host, _ = conduct(world, None, steps)
    window = round(0.3 * steps)   # align_until's default
    assert session.stats.align_rows == window * 2 and session.stats.invert_rows == steps + 1   # base + alice
    losses = []
    for (x, sigma), (x_plain, _) in zip(host.seen[:window], plain_host.seen[:window]):
        target = inv.keys[float(sigma[0])]
        losses.append((float(key_loss(base_keys(world, x, sigma), target)),
                       float(key_loss(base_keys(world, x_plain, sigma), target))))
    for moved_loss, plain_loss in losses:   # the paper's step size (10): a few percent a step here
        assert moved_loss < plain_loss, losses
    assert sum(m for m, _ in losses) < 0.95 * sum(p for _, p in losses), losses
    assert not torch.allclose(aligned, plain, atol=1e-3)
    assert unpatched(world["unet"]) and torch.is_grad_enabled()
    assert host.grad == [False] * steps   # the host's calls still run without gradients


def test_the_base_rows_are_evaluated_on_the_latent_the_sampler_continues_from(world):
    """At an alignment step the base rows' UNet input is the moved latent, and that latent is
    the one the sampler takes its step from."""
    inputs = []
    handle = world["unet"].register_forward_pre_hook(
        lambda m, args, kwargs: inputs.append((args[0] if args else kwargs["x"]).detach().clone()), with_kwargs=True)
    try:
        _, host, _ = conduct(world, reference_latent(), steps=8)
    finally:
        handle.remove()
    sigma0 = float(host.seen[0][1][0])
    initial = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(0)) * sigma0
    moved = host.seen[0][0]
    assert (moved - initial).abs().max() > 1e-3
    conducted = [x for x in inputs if x.shape[0] == 4][0]   # base [cond, uncond], alice [cond, uncond]
    c_in = 1 / (sigma0 ** 2 + 1) ** 0.5
    for row in range(4):
        torch.testing.assert_close(conducted[row], moved[0] * c_in, rtol=1e-5, atol=1e-6)


def test_a_host_that_calls_cond_and_uncond_apart_gets_the_moved_latent_in_both(world):
    session = make_session("conductor", world["unet"], plan_of(world))
    denoiser = CompVisDenoiser(world["ldm"])
    sigmas = denoiser.get_sigmas(4)
    moved = {}
    host = HostPass(sample=None, initial=None, replay_noise=None, reference=reference_latent(),
                    schedule=SamplerSchedule(sigmas), latent_moved=moved.update)
    session._host, session._alignment = host, LayoutAlignment(session, host)
    inputs = []
    handle = world["unet"].register_forward_pre_hook(
        lambda m, args, kwargs: inputs.append((args[0] if args else kwargs["x"]).detach().clone()), with_kwargs=True)
    x = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(0)) * sigmas[0]

    def model(xx, ss, cc):
        return denoiser(xx, ss, cond=cc)
    try:
        with torch.no_grad(), session.single_pass():
            session.denoise(model, x, sigmas[:1], {"c_crossattn": world["cond"]}, n_cond=1, step=0, total_steps=4,
                            images=CallImages((0,), ()))
            inputs.clear()
            session.denoise(model, x, sigmas[:1], {"c_crossattn": world["uncond"]}, n_cond=0, step=0, total_steps=4,
                            images=CallImages((), (0,)))
    finally:
        handle.remove()
        session._alignment = None
    assert set(moved) == {0} and (moved[0] - x[0]).abs().max() > 1e-3
    ((uncond_rows),) = inputs   # base and alice's uncond rows, one call
    c_in = 1 / (float(sigmas[0]) ** 2 + 1) ** 0.5
    for row in range(uncond_rows.shape[0]):
        torch.testing.assert_close(uncond_rows[row], moved[0] * c_in, rtol=1e-5, atol=1e-6)


def test_without_a_reference_nothing_of_it_runs(world):
    out, host, session = conduct(world, None)
    assert session.stats.invert_rows == session.stats.align_rows == 0
    # the pass as it was before alignment existed: single_pass around the host's sampler
    plan = plan_of(world)
    bare = make_session("conductor", world["unet"], plan)
    bare_host = CFGHost(world["ldm"], world["cond"], world["uncond"])
    bare_host.route = bare.denoise
    sigmas = bare_host.inner.get_sigmas(8)
    initial = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(0))
    bare_host.step, bare_host.total_steps = 0, 8
    with torch.no_grad(), bare.single_pass():
        expected = sampling.sample_euler(bare_host, initial * sigmas[0], sigmas, disable=True)
    assert torch.equal(out, expected)
    assert session.stats.unet_rows == bare.stats.unet_rows
    # a reference with alignment off and no automatic region to find: nothing either
    off, _, session_off = conduct(world, reference_latent(), align_until=0.0)
    assert torch.equal(off, expected) and session_off.stats.invert_rows == 0


def test_automatic_regions_are_found_in_the_reference_so_concepts_act_from_step_0(world):
    def planted_world():
        unet = plant(make_unet(), [2], [[cells(3, 1, 13, 6)]])
        return dict(world, unet=unet, ldm=TinyLDM(unet))

    def auto_plan():
        return build_plan([dict(name="a", cond=random_context(3), auto_tokens=[2])], IMAGE, start_at=0.0,
                          mask_refine=False)
    planted = planted_world()
    plan = auto_plan()
    out, host, session = conduct(planted, reference_latent(), plan=plan)
    assert plan.found_masks is not None and covers(plan.found_masks[0, 0], cells(3, 1, 13, 6))
    assert session.stats.unet_rows == 8 * 4   # every step conducted: base and the concept, cond and uncond
    assert torch.isfinite(out).all()
    with pytest.raises(EngineError, match="no cross-attention was recorded"):
        conduct(planted, None, plan=auto_plan())
    assert unpatched(planted["unet"])


def test_alignment_out_of_memory_is_named_and_leaves_the_unet_as_it_was(world):
    def hook(module, args, kwargs):
        if torch.is_grad_enabled():
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    handle = world["unet"].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with pytest.raises(EngineError, match="layout alignment ran out of memory"):
            conduct(world, reference_latent())
    finally:
        handle.remove()
    assert unpatched(world["unet"]) and torch.is_grad_enabled()


def test_a_reference_of_another_size_is_named(world):
    with pytest.raises(EngineError, match="reference latent .* does not match"):
        conduct(world, torch.zeros((1, 4, 8, 8)))
    assert unpatched(world["unet"])


def test_forge_routing_inverts_finds_regions_and_aligns_as_the_a1111_path(world):
    """Through forge_routing (rows [uncond, cond], attention by replace patches handing over q,
    k, v, to_out after them) the inversion records the class word's attention, the keys stop
    the forward at the same layer, and the moved latent and the output are the A1111 path's."""
    from lib_mc.hosts.forge_routing import install_attention, make_unet_wrapper
    from test_forge_routing import PatcherOptions, forge_block_attention, host_attention

    def auto_plan():
        return build_plan([dict(name="alice", cond=world["alice_cond"], loras=[(world["alice"], 0.8)], auto_tokens=[2]),
                           dict(name="bob", cond=world["bob_cond"], loras=[(world["bob"], 1.0)], mask=left_half())],
                          IMAGE, start_at=0.0, mask_refine=False)
    denoiser = CompVisDenoiser(world["ldm"])
    sigmas = denoiser.get_sigmas(4)
    x = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(0)) * sigmas[0]
    sigma = sigmas[:1]

    def run(session, one_call):
        moved = {}
        out = session.sample(HostPass(sample=lambda noise: one_call(), initial=x, replay_noise=None,
                                      reference=reference_latent(), schedule=SamplerSchedule(sigmas),
                                      latent_moved=moved.update))
        return out, moved, session

    a1111 = make_session("conductor", world["unet"], auto_plan())
    cond = {"c_crossattn": torch.cat([world["cond"], world["uncond"]])}
    with torch.no_grad():
        out_a, moved_a, _ = run(a1111, lambda: a1111.denoise(lambda xx, ss, cc: denoiser(xx, ss, cond=cc),
                                                             torch.cat([x, x]), sigma.repeat(2), cond, n_cond=1,
                                                             step=0, total_steps=4))
    forge = make_session("conductor", world["unet"], auto_plan(), attention_on_modules=False)
    patcher = PatcherOptions()
    install_attention(patcher, forge, host_attention)
    wrapper = make_unet_wrapper(forge, step=lambda: 0, total_steps=lambda: 4)

    def apply_model(xx, tt, c_crossattn=None, transformer_options=None, control=None, **kwargs):
        return denoiser(xx, tt, cond={"c_crossattn": c_crossattn})
    args = {"input": torch.cat([x, x]), "timestep": sigma.repeat(2), "cond_or_uncond": [1, 0],
            "c": {"c_crossattn": torch.cat([world["uncond"], world["cond"]]), "transformer_options": {"sigmas": sigma},
                  "control": None}}
    with torch.no_grad(), forge_block_attention(world["unet"], patcher):
        out_f, moved_f, _ = run(forge, lambda: wrapper(apply_model, args))
    assert forge.plan.found_masks is not None and torch.equal(forge.plan.found_masks, a1111.plan.found_masks)
    assert forge.stats.align_rows == a1111.stats.align_rows == 3 and forge.stats.invert_rows == 5
    torch.testing.assert_close(moved_f[0], moved_a[0], rtol=1e-4, atol=1e-4)
    assert (moved_a[0] - x[0]).abs().max() > 1e-3
    torch.testing.assert_close(torch.cat([out_f[1:], out_f[:1]]), out_a, rtol=1e-4, atol=1e-4 * float(out_a.abs().max()))
    assert unpatched(world["unet"])


def saved_bytes_and_move(world, reference, checkpointing: bool):
    """One alignment step (step 0 of 4) after the inversion: the bytes autograd kept for the
    backward outside checkpointed blocks, and the moved latent."""
    from lib_mc.patcher import PatchSet
    session = make_session("conductor", world["unet"], plan_of(world, align_until=1.0))
    denoiser = CompVisDenoiser(world["ldm"])
    sigmas = denoiser.get_sigmas(4)
    alignment = LayoutAlignment(session, HostPass(sample=None, initial=None, replay_noise=None, reference=reference,
                                                  schedule=SamplerSchedule(sigmas)))
    if not checkpointing:
        alignment.checkpointed = PatchSet()
    x = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(3)) * sigmas[0]
    cond = {"c_crossattn": torch.cat([world["cond"], world["uncond"]])}
    kept = []

    def pack(t):
        kept.append(t.numel() * t.element_size())
        return t
    model = lambda xx, ss, cc: denoiser(xx, ss, cond=cc)   # noqa: E731
    with torch.no_grad(), session.single_pass():
        alignment.before_call(model, torch.cat([x, x]), sigmas[:1].repeat(2), cond, CallImages((0,), (0,)),
                              step=4, total_steps=4)   # past the window: the inversion only
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            alignment.before_call(model, torch.cat([x, x]), sigmas[:1].repeat(2), cond, CallImages((0,), (0,)),
                                  step=0, total_steps=4)
        assert not torch.is_grad_enabled()
    assert unpatched(world["unet"])
    return sum(kept), alignment.moved[1][0]


def test_the_gradient_pass_checkpoints_the_blocks_before_the_layer_and_moves_the_latent_alike(world):
    """Activation checkpointing keeps a fraction of the activations (SDXL 1024 px: ~5 GB without
    it) and gives the same move: each row's LoRA acts again in the blocks' rerun."""
    reference = reference_latent()
    full, moved_full = saved_bytes_and_move(world, reference, checkpointing=False)
    kept, moved = saved_bytes_and_move(world, reference, checkpointing=True)
    assert kept < 0.3 * full, (kept, full)
    torch.testing.assert_close(moved, moved_full, rtol=1e-4, atol=1e-5)
    x = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(3)) * CompVisDenoiser(world["ldm"]).get_sigmas(4)[0]
    assert (moved - x[0]).abs().max() > 1e-4   # it moved
