"""Forge's UNet calls routed into the engine, as functions its patcher takes. No Forge imports:
the tests run these in CI with the ldm UNet; `forge.py` installs them on a patcher clone.

Forge calls its UNet (through `model_function_wrapper(apply_model, args)`) with the rows of
`args["cond_or_uncond"]` chunks, in whatever order it batched them ([uncond, cond] is usual);
the engine wants [cond rows, uncond rows]. The wrapper reorders, lets the engine make its own
batched calls, gives each call the `transformer_options` (cond_or_uncond, cond_mark, ...) and
ControlNet residuals of its own rows, and puts the result back in Forge's order.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..engine import CallImages
from .row_sources import COND, call_rows, pick_rows

BLOCKS = ("input", "middle", "output")
MAX_BLOCK, MAX_TRANSFORMER = 16, 16   # as Forge's set_model_replace_all


def engine_order(flags: list[int], chunk: int) -> torch.Tensor:
    """Forge's rows in engine order: the cond chunks, then the uncond chunks."""
    picked = [i for i, f in enumerate(flags) if f == COND] + [i for i, f in enumerate(flags) if f != COND]
    return torch.cat([torch.arange(i * chunk, (i + 1) * chunk) for i in picked])


def call_options(options: dict, row_flags: list[int], chunk: int, sigmas: torch.Tensor) -> dict:
    """A copy of Forge's transformer_options that describes this call's rows (the UNet writes
    into it, so every call gets its own)."""
    flags = row_flags[::chunk]
    out = dict(options)
    out["cond_or_uncond"] = flags
    out["sigmas"] = sigmas
    out["cond_mark"] = torch.tensor(row_flags, dtype=sigmas.dtype, device=sigmas.device)
    out["cond_indices"] = [i for i, f in enumerate(row_flags) if f == COND]
    out["uncond_indices"] = [i for i, f in enumerate(row_flags) if f != COND]
    return out


def map_control(control: dict | None, rows: torch.Tensor, batch: int) -> dict | None:
    """ControlNet residuals (lists per block kind, batch = Forge's rows) for the given rows.
    Fresh lists: the UNet pops them."""
    return None if control is None else pick_rows(control, rows, batch)


def make_unet_wrapper(session, step: Callable[[], int], total_steps: Callable[[], int]):
    """Forge's `model_function_wrapper`: every UNet call of the sampler goes through the session."""
    def wrapper(apply_model, args):
        x, timestep, c = args["input"], args["timestep"], args["c"]
        flags = list(args["cond_or_uncond"])
        chunk = x.shape[0] // len(flags)
        order = engine_order(flags, chunk).to(x.device)
        n_cond = chunk * flags.count(COND)
        tensors = {k: v[order] for k, v in c.items() if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == x.shape[0]}
        others = {k: v for k, v in c.items() if k not in tensors}
        sigmas = timestep[:chunk]

        def model_fn(xx, tt, cc):
            row_flags, source = call_rows(session.run.call, n_cond, xx.shape[0])
            extra = dict(others)
            if isinstance(others.get("transformer_options"), dict):
                extra["transformer_options"] = call_options(others["transformer_options"], row_flags, chunk, sigmas)
            if others.get("control") is not None:
                extra["control"] = map_control(others["control"], order.cpu()[source], x.shape[0])
            return apply_model(xx, tt, **cc, **extra)

        n_uncond_chunks = len(flags) - flags.count(COND)
        images = CallImages(tuple(range(chunk)) * flags.count(COND), tuple(range(chunk)) * n_uncond_chunks)
        out = session.denoise(model_fn, x[order], timestep[order], tensors, n_cond=n_cond,
                              step=step(), total_steps=total_steps(), images=images)
        result = torch.empty_like(out)
        result[order] = out
        return result
    return wrapper


def make_attention_replace(session, *, cross: bool, decoder: bool, host_attention, previous=None, module=None):
    """An attention replace patch `fn(q, k, v, extra_options)`: the engine's attention, with the
    pass-through going to the patch that was there before (another extension's) or Forge's own
    attention function `host_attention(q, k, v, heads)`. `module`: the attention module of this
    block (a method that projects another context through its to_k / to_v needs it)."""
    def replace(q, k, v, extra_options):
        heads = extra_options["n_heads"]
        if previous is not None:
            def host(q_, k_, v_):
                return previous(q_, k_, v_, extra_options)
        else:
            def host(q_, k_, v_):
                return host_attention(q_, k_, v_, heads)
        return session.attention(q, k, v, heads, cross=cross, decoder=decoder, host=host, module=module)
    return replace


def attention_module(unet, block: str, number: int, index: int, name: str):
    """The attn1 / attn2 module of transformer `index` in UNet block (block, number), as Forge
    keys its replace patches; None where there is none."""
    if block == "middle" and number:
        return None
    try:
        container = {"input": lambda: unet.input_blocks[number], "middle": lambda: unet.middle_block,
                     "output": lambda: unet.output_blocks[number]}[block]()
    except (IndexError, AttributeError):
        return None
    for child in container.modules():
        blocks = getattr(child, "transformer_blocks", None)
        if blocks is not None:
            return getattr(blocks[index], name, None) if index < len(blocks) else None
    return None


def make_output_patch(session, name: str):
    """An attention output patch `fn(n, extra_options)` (n: after to_out, before the residual
    add) for the methods that act there; a layer is named by (attn1/attn2, block, index)."""
    def patch(n, extra_options):
        block = extra_options.get("block")
        return session.attention_output(n, layer=(name, block, extra_options.get("block_index", 0)),
                                        decoder=block is not None and block[0] == "output")
    return patch


def install_attention(patcher, session, host_attention) -> None:
    """Attention replace patches on every transformer block of a (cloned) UnetPatcher, keeping
    the ones other extensions set as their pass-through; attention output patches where the
    session's method acts on the outputs (Forge applies to_out itself, after the replace patch)."""
    if session.acts_on_attention_output:
        patcher.set_model_attn1_output_patch(make_output_patch(session, "attn1"))
        patcher.set_model_attn2_output_patch(make_output_patch(session, "attn2"))
    replaced = patcher.model_options.get("transformer_options", {}).get("patches_replace", {})
    for name, cross in (("attn1", False), ("attn2", True)):
        before = dict(replaced.get(name, {}))
        for block in BLOCKS:
            for number in range(MAX_BLOCK):
                for index in range(MAX_TRANSFORMER):
                    previous = before.get((block, number, index)) or before.get((block, number))
                    module = attention_module(session.unet, block, number, index, name)
                    patch = make_attention_replace(session, cross=cross, decoder=block == "output",
                                                   host_attention=host_attention, previous=previous, module=module)
                    patcher.set_model_patch_replace(patch, name, block, number, index)
