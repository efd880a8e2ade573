"""A method's gradient pass (layout alignment, concept enhancement) through the host's UNet as
Forge builds and runs it.

- Forge builds its models inside `torch.inference_mode()`: their parameters are inference
  tensors, which autograd may not save for a backward ("Inference tensors cannot be saved for
  backward"). During the pass every module holding such parameters runs with normal copies of
  them, made inside its forward (inside a checkpointed block they are made again in the
  backward instead of being kept, so about one block's copies are in memory at once).
- Forge's transformer blocks add their attention outputs to x in place (`x += n`) after a
  LayerNorm has saved x for its backward ("one of the variables needed for gradient computation
  has been modified by an inplace operation"). During the pass every LayerNorm normalises a copy
  of its input, so what it saves is never written to afterwards.

A1111's models hold no inference tensors and add out of place: there the copies cost a
LayerNorm input each and change nothing.
"""

from __future__ import annotations

import torch
from torch import nn

from ..patcher import PatchSet


def gradient_pass_patches(root: nn.Module) -> PatchSet:
    """Forward patches for the modules of `root` a gradient pass needs changed. Apply them around
    the pass only; they act only while gradients are on outside inference mode."""
    patches = PatchSet()
    for module in root.modules():
        names = [name for name, p in module.named_parameters(recurse=False) if p.is_inference()]
        if names:
            patches.add(module, "forward", lambda original, module=module, names=names: _with_copies(original, module,
                                                                                                     names))
        if isinstance(module, nn.LayerNorm):
            patches.add(module, "forward", _on_a_copy)
    return patches


def _recording() -> bool:
    return torch.is_grad_enabled() and not torch.is_inference_mode_enabled()


def _with_copies(original, module: nn.Module, names: list[str]):
    def forward(*args, **kwargs):
        if not _recording():
            return original(*args, **kwargs)
        held = {name: module._parameters[name] for name in names}
        try:
            for name in names:
                module._parameters[name] = held[name].detach().clone()   # read as module.<name> by the layer
            return original(*args, **kwargs)
        finally:
            module._parameters.update(held)
    return forward


def _on_a_copy(original):
    def forward(x, *args, **kwargs):
        return original(x.clone() if _recording() and x.requires_grad else x, *args, **kwargs)
    return forward
