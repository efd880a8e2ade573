"""The A1111 host glue on an SDXL model: A1111 v1.10's CFG denoiser with SDXL's dict conditioning
({"crossattn", "vector"} + "c_concat", catenated and sliced per key as its catenate_conds and
subscript_cond do), the real sgm UNet behind sgm's OpenAIWrapper (tests/tinyxl.py), and the
adapter's routing (`a1111.process_before_every_sampling`, context key "crossattn")."""

from types import SimpleNamespace

import pytest
import torch
from modules import shared

from a1111like import A1111CFGDenoiser, A1111Sampler, processing
from lib_mc.hosts import a1111, webui
from lib_mc.lora import load_network
from lib_mc.plan import build_plan
from tinyxl import TinyXL, make_xl_unet, write_xl_lora, xl_cond

IMAGE = (128, 128)


def catenate(conds):
    return {key: torch.cat([c[key] for c in conds]) for key in conds[0]}


def subscript(cond, a, b):
    return {key: t[a:b] for key, t in cond.items()}


class XLCFGDenoiser(A1111CFGDenoiser):
    """A1111CFGDenoiser.forward for dict conds (what A1111 does for SDXL): the same call layouts."""

    def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond=0.0, image_cond=None):
        batch_size = x.shape[0]
        image_cond = x.new_zeros(batch_size, 5, 1, 1) if image_cond is None else image_cond
        x_in, sigma_in = torch.cat([x, x]), torch.cat([sigma, sigma])
        image_cond_in = torch.cat([image_cond, image_cond])

        def make(c, ic):
            return {**c, "c_concat": [ic]}
        x_out = torch.zeros_like(x_in)
        if cond["crossattn"].shape[1] == uncond["crossattn"].shape[1]:
            cond_in = catenate([cond, uncond])
            if self.opts.batch_cond_uncond:
                x_out = self.inner_model(x_in, sigma_in, cond=make(cond_in, image_cond_in))
            else:
                for a in range(0, x_out.shape[0], batch_size):
                    b = a + batch_size
                    x_out[a:b] = self.inner_model(x_in[a:b], sigma_in[a:b],
                                                  cond=make(subscript(cond_in, a, b), image_cond_in[a:b]))
        else:   # a negative prompt of another chunk count: cond and uncond calls apart
            x_out[:batch_size] = self.inner_model(x_in[:batch_size], sigma_in[:batch_size],
                                                  cond=make(cond, image_cond_in[:batch_size]))
            x_out[batch_size:] = self.inner_model(x_in[batch_size:], sigma_in[batch_size:],
                                                  cond=make(uncond, image_cond_in[batch_size:]))
        denoised_uncond = x_out[-batch_size:]
        self.step += 1
        return denoised_uncond + (x_out[:batch_size] - denoised_uncond) * cond_scale


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("xl_loras")
    unet = make_xl_unet()
    write_xl_lora(folder / "xl_alice.safetensors", unet, seed=10)
    write_xl_lora(folder / "xl_bob.safetensors", unet, seed=11, convs=True)
    return dict(unet=unet, ldm=TinyXL(unet), alice=load_network(str(folder / "xl_alice.safetensors")),
                bob=load_network(str(folder / "xl_bob.safetensors")), cond=xl_cond(1), uncond=xl_cond(2),
                alice_cond=xl_cond(3, tokens=12), bob_cond=xl_cond(4))


@pytest.fixture(autouse=True)
def host_options():
    saved = dict(vars(shared.opts))
    yield shared.opts
    vars(shared.opts).update(saved)


def column(lo, hi):
    mask = torch.zeros(IMAGE)
    mask[:, lo:hi] = 1
    return mask


def drawn_plan(world, start_at=0.5):
    return build_plan([
        dict(name="alice", cond=world["alice_cond"], loras=[(world["alice"], 0.8)], mask=column(0, 56)),
        dict(name="bob", cond=world["bob_cond"], loras=[(world["bob"], 1.0)], mask=column(72, 128)),
    ], IMAGE, start_at=start_at)


def generate(world, plan=None, sampler="Euler a", batch=2, steps=4, split=False, long_negative=False):
    """One SDXL txt2img batch as A1111 runs it; plan None: a plain generation."""
    shared.opts.batch_cond_uncond = not split
    p = processing(*IMAGE[::-1], steps=steps, batch=batch, seed=3)
    p.sd_model = SimpleNamespace(model=SimpleNamespace(diffusion_model=world["unet"]), is_sdxl=True)
    p.sampler = A1111Sampler(sampler, world["ldm"], shared.opts)
    p.sampler.model_wrap_cfg = XLCFGDenoiser(p.sampler.model_wrap_cfg.inner_model, shared.opts)
    state = None
    if plan is not None:
        state = webui.JobState(job=SimpleNamespace(save_layout=False, mode="blend"))
        state.prepared = SimpleNamespace(plan=plan, warnings=[])
        p._multi_concept = state
        a1111.process_before_every_sampling(p)
    cond = {k: v.expand(batch, *v.shape[1:]) for k, v in world["cond"].items()}
    uncond = dict(world["uncond"])
    if long_negative:   # 2 chunks of negative prompt against 1 of prompt
        uncond["crossattn"] = torch.cat([uncond["crossattn"], xl_cond(9)["crossattn"]], 1)
    uncond = {k: v.expand(batch, *v.shape[1:]) for k, v in uncond.items()}
    return p.sampler.sample(p, p.rng.next(), cond, uncond), (state.session if state else None)


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ SDE", "DDIM"])
def test_start_at_end_is_the_plain_sdxl_image(world, sampler):
    plain, _ = generate(world, sampler=sampler)
    again, session = generate(world, drawn_plan(world, start_at=1.0), sampler=sampler)
    assert torch.equal(plain, again)
    assert session.stats.replayed_calls > 0 and session.context_key == "crossattn"


def test_sdxl_blending_is_the_same_whether_the_host_batches_or_splits(world):
    plain, _ = generate(world)
    batched, session = generate(world, drawn_plan(world))
    split, _ = generate(world, drawn_plan(world), split=True)
    assert session.stats.unet_calls > 0 and (batched - plain).abs().max() > 1e-2
    assert torch.allclose(batched, split, rtol=1e-4, atol=1e-4), (batched - split).abs().max()


def test_sdxl_negative_prompt_of_another_length_is_called_apart_replayed_and_blended(world):
    plain, _ = generate(world, long_negative=True)
    again, _ = generate(world, drawn_plan(world, start_at=1.0), long_negative=True)
    blended, session = generate(world, drawn_plan(world), long_negative=True)
    assert torch.equal(plain, again)
    assert session.stats.unet_calls > 0 and (blended - plain).abs().max() > 1e-2
