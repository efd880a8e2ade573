"""The face concepts' patches on the UNet, added to a session's PatchSet (applied and removed
with the method's own): identity attention on every cross-attention the IP-Adapter has weights
for, and the IdentityNet around the UNet call with its residuals added in the skip connections."""

from __future__ import annotations

from ...errors import EngineError
from .attention import IPWeights, add_identity, make_identity_forward
from .control import make_middle_forward, make_skip_forward, make_unet_forward

__all__ = ["add_face_patches", "add_identity"]


def add_face_patches(patches, unet, plan, run, attention_on_modules: bool) -> dict:
    """-> {cross-attention module: (to_k_ip, to_v_ip)} for hosts that route attention themselves
    (`add_identity` in the session's attention); {} without face concepts."""
    models = plan.instantid
    if not plan.face_concepts or models is None:
        return {}
    modules = dict(unet.named_modules())
    missing = [name for name in models.ip_layers if name not in modules]
    if missing:
        raise EngineError(f"InstantID's IP-Adapter names cross-attention layers this UNet lacks: {missing[:3]}")
    weights = {modules[name]: IPWeights(*pair) for name, pair in models.ip_layers.items()}
    if attention_on_modules:
        for module, pair in weights.items():
            patches.add(module, "forward",
                        lambda original, module=module, pair=pair: make_identity_forward(module, original, run, pair))
    net = models.identitynet
    if net is not None and any(plan.concepts[i].face.control > 0 for i in plan.face_concepts):
        inputs = len(unet.input_blocks)
        patches.add(unet, "forward", lambda original: make_unet_forward(original, run, net))
        for j, block in enumerate(unet.output_blocks):
            patches.add(block[0], "forward",
                        lambda original, index=inputs - 1 - j: make_skip_forward(original, run, index))
        patches.add(unet.middle_block[-1], "forward", lambda original: make_middle_forward(original, run))
    return weights
