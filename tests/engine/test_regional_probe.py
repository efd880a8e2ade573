"""Regional re-initialisation's probe when the host's sampler returns without a cond call."""

import pytest
import torch

from lib_mc.engine import HostPass, make_session
from lib_mc.errors import EngineError
from lib_mc.plan import build_plan
from tinyhost import two_lora_world

IMAGE = (128, 128)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return two_lora_world(tmp_path_factory.mktemp("loras"))


def session_of(world):
    left = torch.zeros(IMAGE)
    left[:, :64] = 1
    plan = build_plan([dict(name="a", cond=world["alice_cond"], loras=[(world["alice"], 0.8)], mask=left,
                            class_tokens=[2])], IMAGE, start_at=0.0, reinit=True)
    return make_session("regional", world["unet"], plan)


@pytest.mark.parametrize("interrupted", [True, False])
def test_a_sampler_that_returns_before_any_call_is_an_interrupt_or_an_error(world, interrupted):
    """A1111's launch_sampling swallows its InterruptedException and returns: an interrupted
    probe ends the job quietly; a probe with no cond call at all (a broken host) is an error."""
    initial = torch.randn((1, 4, 16, 16))
    samples = []

    def sample(noise):
        samples.append(noise)
        return noise   # the host's sampler stopped before calling the model
    host = HostPass(sample=sample, initial=initial, replay_noise=lambda: initial,
                    interrupted=lambda: interrupted)
    session = session_of(world)
    if interrupted:
        assert torch.equal(session.sample(host), initial)
        assert len(samples) == 1   # the probe's run only: nothing sampled after the interrupt
    else:
        with pytest.raises(EngineError, match="no call with conditional rows"):
            session.sample(host)
    assert not [n for n, m in world["unet"].named_modules() if "forward" in vars(m)]
