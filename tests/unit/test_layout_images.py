"""save_layout outputs: each layout image, its regions, and for automatic regions a sheet with
every step of finding them."""

import torch
from torch import nn

from lib_mc.hosts.layout_images import LABEL_HEIGHT, layout_outputs
from lib_mc.plan import build_plan
from tinyhost import random_context


class LatentAsImage(nn.Module):
    """Decodes by reading the first three latent channels as RGB: enough to check the outputs."""

    def __init__(self):
        super().__init__()
        self.first_stage_model = nn.Linear(1, 1)

    def decode_first_stage(self, x):
        return nn.functional.interpolate(x[:, :3], scale_factor=8)


def _plan():
    return build_plan([dict(name="auto", cond=random_context(1), auto_tokens=[1]),
                       dict(name="drawn", cond=random_context(2),
                            mask=torch.zeros(64, 64).index_fill_(0, torch.arange(56, 64), 1))], (64, 64))


def _reddish(pixel) -> bool:
    return pixel[0] > pixel[1] + 40


def test_outputs_per_image_with_its_found_masks_and_every_step_of_finding_them():
    plan = _plan()
    latents = torch.zeros(2, 4, 8, 8)   # grey layout images
    assert len(layout_outputs(LatentAsImage(), [(latents, plan)], ["auto", "drawn"])) == 4   # drawn only: no sheet
    attention = torch.zeros(2, 1, 8, 8)
    attention[0, 0, :, :4] = 1
    attention[1, 0, :, 4:] = 1
    sam = torch.zeros(2, 1, 64, 64)
    sam[:, 0, 40:, :] = 1            # SAM moved both to the bottom
    refined = torch.zeros(2, 1, 2, 2)
    refined[:, 0, 0, 1] = 1          # refinement: top right quarter
    plan.resolve_auto(refined)
    plan.mask_steps = [("attention", attention * 0.7), ("attention masks", attention), ("SAM", sam),
                       ("refined at step 5", refined)]
    plan.face_boxes = [torch.tensor([[0.0, 0.0, 2.0, 2.0]]), torch.zeros(0, 4)]
    images = layout_outputs(LatentAsImage(), [(latents, plan)], ["auto", "drawn"])
    assert len(images) == 6
    layout, regions, sheet = images[:3]
    assert layout.size == regions.size == (64, 64)
    assert sheet.size == (3 * 64, 2 * (64 + LABEL_HEIGHT))   # 4 panels, 3 columns

    def panel(sheet, k, x, y):
        return sheet.getpixel(((k % 3) * 64 + x, (k // 3) * (64 + LABEL_HEIGHT) + LABEL_HEIGHT + y))
    # image 0: attention on the left, SAM at the bottom, refined top right; the final regions are the refined ones
    assert _reddish(panel(sheet, 1, 10, 30)) and not _reddish(panel(sheet, 1, 50, 30))
    assert _reddish(panel(sheet, 2, 50, 50)) and not _reddish(panel(sheet, 2, 10, 30))
    assert _reddish(panel(sheet, 3, 50, 20)) and not _reddish(panel(sheet, 3, 10, 50))
    assert _reddish(regions.getpixel((50, 20))) and not _reddish(regions.getpixel((10, 30)))
    # the face box (cells 0-2 = pixels 0-16) is outlined in yellow on the attention-masks panel only
    assert panel(sheet, 1, 16, 8) == (255, 255, 0) and panel(sheet, 2, 16, 8) != (255, 255, 0)
    # image 1 gets its own steps: its attention was on the right
    sheet1 = images[5]
    assert _reddish(panel(sheet1, 1, 50, 30)) and not _reddish(panel(sheet1, 1, 10, 30))


def test_an_automatic_concept_keeps_its_colour_on_the_sheet():
    plan = build_plan([dict(name="drawn", cond=random_context(2), mask=torch.ones(64, 64)),
                       dict(name="auto", cond=random_context(1), auto_tokens=[1])], (64, 64))
    found = torch.zeros(1, 1, 8, 8)
    found[0, 0, :, :4] = 1
    plan.resolve_auto(found)
    plan.mask_steps = [("attention masks", found)]
    sheet = layout_outputs(LatentAsImage(), [(torch.zeros(1, 4, 8, 8), plan)], ["drawn", "auto"])[2]
    pixel = sheet.getpixel((10, LABEL_HEIGHT + 40))
    assert pixel[1] > pixel[0] + 40   # green, concept 2's colour in the regions overlay, not red
