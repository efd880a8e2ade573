"""sd-webui-controlnet's A1111 hook in miniature, for driving the host glue offline.

Reproduced from Mikubill/sd-webui-controlnet v1.1.455 (56cec5b2):
- scripts/hook.py: the prompt marker (`POSITIVE_MARK_TOKEN` 1024, `MARK_EPS`,
  `prompt_context_is_marked`, `mark_prompt_context` for a prompt's (tokens, dim) tensor,
  `unmark_prompt_context`) and `UnetHook.hook`'s UNet forward for ControlNet units: strip the
  marker, set `cond_mark` on the UNet, run every unit's ControlNet on this call's rows
  (x, hint, timesteps, context), scale by the weight (times `cond_mark` in "ControlNet is more
  important" mode), add the residuals to the skip connections and the middle block.
- scripts/cldm.py ControlNet.forward: the hint through `input_hint_block`, added after the first
  input block; one zero conv per input block and `middle_block_out`. Built here from the real
  ldm UNet's blocks at the tiny config (the installed ldm has no `cldm` package).
- scripts/ipadapter/plugable_ipadapter.py: `attn_forward_hacked` replaces attn2's forward (no
  chaining) and adds, per row, attention over the image embedding chosen by `cond_mark`
  (`ImageEmbed.eval`, scripts/ipadapter/ipadapter_model.py).
"""

from __future__ import annotations

import copy
from types import SimpleNamespace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from ldm.modules.diffusionmodules.util import timestep_embedding
from torch import nn

from tinyhost import CONTEXT_DIM, make_unet

POSITIVE_MARK_TOKEN = 1024
NEGATIVE_MARK_TOKEN = -POSITIVE_MARK_TOKEN
MARK_EPS = 1e-3


def prompt_context_is_marked(x):
    t = x[..., 0, :]
    m = torch.abs(t) - POSITIVE_MARK_TOKEN
    m = torch.mean(torch.abs(m)).detach().cpu().float().numpy()
    return float(m) < MARK_EPS


def mark_prompt_context(cond: torch.Tensor, positive: bool) -> torch.Tensor:
    """One prompt's (tokens, dim) conditioning, as ScheduledPromptConditioning.cond is marked."""
    if prompt_context_is_marked(cond):
        return cond
    mark = POSITIVE_MARK_TOKEN if positive else NEGATIVE_MARK_TOKEN
    return torch.cat([torch.zeros_like(cond)[:1] + mark, cond], dim=0)


def unmark_prompt_context(x):
    if not prompt_context_is_marked(x):
        mark_batch = torch.ones(size=(x.shape[0], 1, 1, 1), dtype=x.dtype, device=x.device)
        return mark_batch, [], [], x
    mark = x[:, 0, :]
    context = x[:, 1:, :]
    mark = torch.mean(torch.abs(mark - NEGATIVE_MARK_TOKEN), dim=1)
    mark = (mark > MARK_EPS).float()
    mark_batch = mark[:, None, None, None].to(x.dtype).to(x.device)
    mark = mark.detach().cpu().numpy().tolist()
    uc_indices = [i for i, item in enumerate(mark) if item < 0.5]
    c_indices = [i for i, item in enumerate(mark) if not item < 0.5]
    return mark_batch, uc_indices, c_indices, context


def marked_batch(context: torch.Tensor, positive: bool) -> torch.Tensor:
    """A (rows, tokens, dim) batch of prompts, each marked as process_sample marks them."""
    return torch.stack([mark_prompt_context(row, positive) for row in context])


class TinyControlNet(nn.Module):
    """cldm.py's ControlNet at the tiny UNet's config: its own copy of the encoder blocks."""

    def __init__(self, seed: int = 21):
        super().__init__()
        encoder = make_unet(seed)
        self.model_channels = encoder.model_channels
        self.time_embed, self.input_blocks = encoder.time_embed, encoder.input_blocks
        self.middle_block = encoder.middle_block
        torch.manual_seed(seed)
        self.input_hint_block = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.SiLU(), nn.Conv2d(16, 16, 3, padding=1, stride=2), nn.SiLU(),
            nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.SiLU(), nn.Conv2d(32, self.model_channels, 3, padding=1, stride=2))
        channels = self._channels()
        # cldm zero-initialises these; random here so the residuals matter
        self.zero_convs = nn.ModuleList(nn.Conv2d(c, c, 1) for c in channels[:-1])
        self.middle_block_out = nn.Conv2d(channels[-1], channels[-1], 1)
        self.eval()

    @torch.no_grad()
    def _channels(self) -> list[int]:
        h, emb = torch.zeros(1, 4, 16, 16), self.time_embed(timestep_embedding(torch.zeros(1), self.model_channels))
        context = torch.zeros(1, 1, CONTEXT_DIM)
        out = []
        for module in self.input_blocks:
            h = module(h, emb, context)
            out.append(h.shape[1])
        return out + [self.middle_block(h, emb, context).shape[1]]

    def forward(self, x, hint, timesteps, context, y=None, **kwargs):
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels, repeat_only=False))
        guided_hint = self.input_hint_block(hint)
        outs = []
        h = x
        for module, zero_conv in zip(self.input_blocks, self.zero_convs):
            h = module(h, emb, context)
            if guided_hint is not None:
                h = h + guided_hint
                guided_hint = None
            outs.append(zero_conv(h))
        h = self.middle_block(h, emb, context)
        outs.append(self.middle_block_out(h))
        return outs


class ControlParams(SimpleNamespace):
    """The fields of hook.py's ControlParams this miniature reads (a plain attribute hint_cond,
    as before the property; the routing swaps either)."""


class UnetHook:
    """hook.py UnetHook.hook for ControlNet units: the UNet's forward replaced on its instance.
    `calls` records, per UNet call, what the ControlNet saw."""

    def __init__(self, unet: nn.Module, control_params: list):
        self.model, self.control_params = unet, control_params
        self.calls: list[dict] = []

    def hook(self):
        unet, outer = self.model, self

        def forward(x, timesteps=None, context=None, y=None, **kwargs):
            if isinstance(context, list):   # ldm's DiffusionWrapper concatenates c_crossattn before the UNet
                context = torch.cat(context, 1)
            marked = prompt_context_is_marked(context)
            cond_mark, _, _, context = unmark_prompt_context(context)
            unet.cond_mark = cond_mark
            total = [0.0] * (len(unet.input_blocks) + 1)
            hints = []
            for param in outer.control_params:
                if param.used_hint_cond is None:
                    param.used_hint_cond = param.hint_cond
                hint = param.used_hint_cond
                hints.append(hint)
                control = param.control_model(x=x, hint=hint, timesteps=timesteps, context=context)
                if param.cfg_injection:
                    control = [c * cond_mark for c in control]
                control = [c * param.weight for c in control]
                total = [c + t for c, t in zip(control, total)]
            hs = []
            emb = unet.time_embed(timestep_embedding(timesteps, unet.model_channels, repeat_only=False))
            h = x
            for module in unet.input_blocks:
                h = module(h, emb, context)
                hs.append(h)
            h = unet.middle_block(h, emb, context)
            h = h + total.pop()
            for module in unet.output_blocks:
                h = torch.cat([h, hs.pop() + total.pop()], dim=1)
                h = module(h, emb, context)
            out = unet.out(h)
            outer.calls.append(dict(rows=x.shape[0], marked=marked, cond_mark=cond_mark.flatten().tolist(),
                                    hints=hints, context=context, out=out))
            return out
        unet.forward = forward

    def restore(self):
        self.model.__dict__.pop("forward", None)
        self.model.__dict__.pop("cond_mark", None)


class ImageEmbed(NamedTuple):
    cond_emb: torch.Tensor
    uncond_emb: torch.Tensor

    def eval(self, cond_mark: torch.Tensor) -> torch.Tensor:
        cond_mark = cond_mark[:, :, :, 0].to(self.cond_emb)
        return self.cond_emb * cond_mark + self.uncond_emb * (1 - cond_mark)


class IPAdapter:
    """plugable_ipadapter.py's hack on every attn2 of the UNet. `seen` records, per call, the
    image embedding rows chosen by cond_mark."""

    def __init__(self, unet: nn.Module, seed: int = 31, tokens: int = 4):
        gen = torch.Generator().manual_seed(seed)
        self.unet = unet
        self.image_emb = ImageEmbed(torch.randn((1, tokens, CONTEXT_DIM), generator=gen),
                                    torch.zeros((1, tokens, CONTEXT_DIM)))
        self.modules = [m for name, m in unet.named_modules() if name.endswith("attn2")]
        self.kv = {m: (copy.deepcopy(m.to_k), copy.deepcopy(m.to_v)) for m in self.modules}
        self.seen: list[torch.Tensor] = []

    def hook(self):
        for module in self.modules:
            module.forward = self._hacked(module)

    def restore(self):
        for module in self.modules:
            module.__dict__.pop("forward", None)

    def _hacked(self, attn):
        def forward(x, context=None, **kwargs):
            b, _, inner = x.shape
            h = attn.heads
            context = x if context is None else context
            q, k, v = attn.to_q(x), attn.to_k(context), attn.to_v(context)
            q, k, v = (t.view(b, -1, h, inner // h).transpose(1, 2) for t in (q, k, v))
            out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, inner)
            emb = self.image_emb.eval(self.unet.cond_mark)   # current_model.cond_mark
            self.seen.append(emb[:, 0, 0])
            to_k, to_v = self.kv[attn]
            ip_k, ip_v = (t.view(b, -1, h, inner // h).transpose(1, 2) for t in (to_k(emb), to_v(emb)))
            ip = F.scaled_dot_product_attention(q, ip_k, ip_v).transpose(1, 2).reshape(b, -1, inner)
            return attn.to_out(out + ip)
        return forward
