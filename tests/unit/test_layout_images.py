"""save_layout outputs: each layout image, its regions, and for automatic regions that were
refined, the attention masks they started from (each step visible)."""

import torch
from torch import nn

from lib_mc.hosts.layout_images import layout_outputs
from lib_mc.plan import build_plan
from tinyhost import random_context


class LatentAsImage(nn.Module):
    """Decodes by reading the first three latent channels as RGB: enough to check the outputs."""

    def __init__(self):
        super().__init__()
        self.first_stage_model = nn.Linear(1, 1)

    def decode_first_stage(self, x):
        return nn.functional.interpolate(x[:, :3], scale_factor=8)


def test_outputs_per_image_with_found_and_first_masks():
    plan = build_plan([dict(name="auto", cond=random_context(1), auto_tokens=[1]),
                       dict(name="drawn", cond=random_context(2), mask=torch.zeros(64, 64).index_fill_(0, torch.arange(56, 64), 1))],
                      (64, 64))
    first = torch.zeros(2, 1, 8, 8)
    first[0, 0, :, :4] = 1
    first[1, 0, :, 4:] = 1
    plan.resolve_auto(first)
    plan.attention_masks = first
    latents = torch.zeros(2, 4, 8, 8)   # grey layout images
    assert len(layout_outputs(LatentAsImage(), [(latents, plan)], ["auto", "drawn"])) == 4   # unchanged: no extra
    refined = first.clone()
    refined[0, 0, 0, :] = 1
    plan.resolve_auto(refined)
    images = layout_outputs(LatentAsImage(), [(latents, plan)], ["auto", "drawn"])
    assert len(images) == 6 and all(im.size == (64, 64) for im in images)
    # each image's overlay shows its own masks: the auto concept (red) is left in image 0, right in 1
    red_left = [images[k].getpixel((20, 45)) for k in (1, 4)]
    assert red_left[0][0] > red_left[0][1] + 40 and abs(red_left[1][0] - red_left[1][1]) < 10
    assert images[2].getpixel((20, 45)) == images[1].getpixel((20, 45))   # the first masks' overlay
