"""Background dilution++ (PnP-MIX): an image concept's reference row sees its subject on a
faded background, so the reference's own surroundings do not leak into the concept:

    z = beta * z_inpaint * (1 - M_E) + z_ref * M_E,

M_E the reference subject's box (from its mask; the whole picture without one) grown by
`expand` of the image side on each side, z_inpaint the kept background's inverted latent at the
same level (without a background: the image's current latent)."""

from __future__ import annotations

import torch


def expanded_box(mask: torch.Tensor | None, latent_hw: tuple[int, int], expand: float) -> torch.Tensor:
    """(h, w) latent cells: 1 inside the subject's bounding box grown by `expand` (a fraction of
    the image's height / width on each side), 0 outside; all ones without a mask."""
    h, w = latent_hw
    box = torch.zeros((h, w))
    if mask is None:
        return box + 1
    ys, xs = torch.nonzero(mask > 0.5, as_tuple=True)
    if not len(ys):
        ys, xs = torch.nonzero(mask > 0, as_tuple=True)
    mh, mw = mask.shape
    top, bottom = float(ys.min()) / mh - expand, float(ys.max() + 1) / mh + expand
    left, right = float(xs.min()) / mw - expand, float(xs.max() + 1) / mw + expand
    y0, y1 = max(0, int(top * h)), min(h, int(-(-bottom * h // 1)))
    x0, x1 = max(0, int(left * w)), min(w, int(-(-right * w // 1)))
    box[y0:y1, x0:x1] = 1
    return box


def diluted(z_ref: torch.Tensor, z_inpaint: torch.Tensor, box: torch.Tensor, beta: float) -> torch.Tensor:
    box = box.to(z_ref.device, z_ref.dtype)
    return beta * z_inpaint.to(z_ref) * (1 - box) + z_ref * box
