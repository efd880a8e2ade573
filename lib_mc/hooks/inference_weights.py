"""Gradient passes on a UNet built under inference mode.

Forge builds its models inside `torch.inference_mode()`, so their parameters are inference
tensors, and autograd may not save an inference tensor for a backward ("Inference tensors
cannot be saved for backward"): a layer whose input needs a gradient saves its weight. During a
method's gradient pass (layout alignment, concept enhancement) every module holding such
parameters runs with normal copies of them, made inside its forward: inside a checkpointed
block they are made again in the backward instead of being kept, so the copies in memory at
once are about one block's. A1111's models hold no inference tensors: nothing is patched.
"""

from __future__ import annotations

import torch
from torch import nn

from ..patcher import PatchSet


def inference_weight_patches(root: nn.Module) -> PatchSet:
    """Forward patches for every module of `root` with parameters that are inference tensors
    (empty when there are none). Apply them around the gradient pass only."""
    patches = PatchSet()
    for module in root.modules():
        names = [name for name, p in module.named_parameters(recurse=False) if p.is_inference()]
        if names:
            patches.add(module, "forward", lambda original, module=module, names=names: _with_copies(original, module,
                                                                                                     names))
    return patches


def _with_copies(original, module: nn.Module, names: list[str]):
    def forward(*args, **kwargs):
        if not torch.is_grad_enabled() or torch.is_inference_mode_enabled():
            return original(*args, **kwargs)
        held = {name: module._parameters[name] for name in names}
        try:
            for name in names:
                module._parameters[name] = held[name].detach().clone()   # read as module.<name> by the layer
            return original(*args, **kwargs)
        finally:
            module._parameters.update(held)
    return forward
