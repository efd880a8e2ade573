"""Regional concept enhancement: attention losses whose gradient guides the cond rows."""

import pytest
import torch

from lib_mc.engine import make_session
from lib_mc.errors import EngineError
from lib_mc.methods.regional import enhance as enhance_module
from lib_mc.methods.regional.call import RegionalCall
from lib_mc.methods.regional.enhance import Capture, enhancement_loss
from lib_mc.plan import build_plan
from tinyhost import CFGHost, count_unet_rows, sample, two_lora_world

IMAGE = (128, 128)   # latent 16 x 16, latent/4 grid 4 x 4


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return two_lora_world(tmp_path_factory.mktemp("loras"))


def halves():
    left, right = torch.zeros(IMAGE), torch.zeros(IMAGE)
    left[:, :64] = 1
    right[:, 64:] = 1
    return left, right


def plan_of(world, enhance=True, tokens=True):
    left, right = halves()
    return build_plan([
        dict(name="alice", cond=world["alice_cond"], loras=[(world["alice"], 0.8)], mask=left,
             own_class_tokens=[3] if tokens else None),
        dict(name="bob", cond=world["bob_cond"], loras=[(world["bob"], 1.0)], mask=right,
             own_class_tokens=[2] if tokens else None),
    ], IMAGE, start_at=0.0, enhance=enhance)


def run(world, plan, steps=4):
    session = make_session("regional", world["unet"], plan)
    host = CFGHost(world["ldm"], world["cond"], world["uncond"])
    host.route = session.denoise
    with session.single_pass():
        return sample(host, steps=steps), session


def loss_at(world, plan, x, sigma):
    """The enhancement loss of the cond rows at latent x, through the session's own capture."""
    session = make_session("regional", world["unet"], plan)
    host = CFGHost(world["ldm"], world["cond"], world["uncond"])
    grid = plan.regions.grids[2]
    capture = Capture([c.own_class_tokens for c in plan.concepts], grid[0] * grid[1])
    with session.single_pass():
        call = RegionalCall(plan, [0], session._contexts({"c_crossattn": world["cond"]}, _images()),
                            isolate=True, capture=capture)
        session.run.call = call
        with torch.no_grad():
            host.model_fn(x, sigma, {"c_crossattn": world["cond"]})
        session.run.call = None
        regions = (call.weights_at(grid, x)[1:] > 0.5).float().transpose(0, 1)
        return float(enhancement_loss(capture, regions, grid))


def _images():
    from lib_mc.engine import CallImages
    return CallImages((0,), ())


def test_the_guidance_gradient_lowers_the_enhancement_loss(world):
    plan = plan_of(world)
    session = make_session("regional", world["unet"], plan)
    host = CFGHost(world["ldm"], world["cond"], world["uncond"])
    x = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(3)) * 2
    sigma = torch.full((1,), 2.0)
    with session.single_pass():
        grad = session._enhance(host.model_fn, x, sigma, {"c_crossattn": world["cond"]}, (0,), 0, 10)
    assert grad.shape == x.shape and grad.abs().sum() > 0
    before = loss_at(world, plan, x, sigma)
    after = loss_at(world, plan, x - 0.05 * grad / grad.abs().max(), sigma)
    assert after < before, (before, after)


def test_enhancement_adds_one_gradient_forward_of_the_cond_rows_per_guided_step(world):
    rows = count_unet_rows(world["unet"])
    try:
        plain_out, plain = run(world, plan_of(world, enhance=False))
        plain_rows = rows.count
        out, session = run(world, plan_of(world))
    finally:
        rows.remove()
    assert plain.stats.enhance_rows == 0
    guided = len(session._enhance_losses)
    assert 1 <= guided <= 2   # half of 4 steps
    assert session.stats.enhance_rows == guided
    assert rows.count - plain_rows == plain_rows + guided
    assert torch.isfinite(out).all() and not torch.allclose(out, plain_out)


def test_without_class_tokens_enhancement_does_nothing(world):
    off, _ = run(world, plan_of(world, enhance=False))
    on, session = run(world, plan_of(world, tokens=False))
    assert torch.equal(off, on) and session.stats.enhance_rows == 0


def test_out_of_memory_in_enhancement_stops_with_a_message_and_unpatches(world, monkeypatch):
    def boom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr("lib_mc.methods.regional.session.enhancement_loss", boom)
    with pytest.raises(EngineError, match="Concept enhancement off"):
        run(world, plan_of(world))
    assert not [name for name, m in world["unet"].named_modules() if "forward" in vars(m)]
    assert enhance_module.out_of_memory(RuntimeError("CUDA error: out of memory"))
