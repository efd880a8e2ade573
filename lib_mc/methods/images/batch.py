"""One batch's image concepts in a blend or conductor session: each reference picture (and the
kept background) inverted at the first call that needs it (cached by content for the job),
and per host call one reference row per image concept, its latent diluted with the background."""

from __future__ import annotations

import torch

from ...conds import override, rows_of
from ...errors import EngineError
from ...hooks.attention import is_attention
from ...hooks.state import CallState
from ...patcher import PatchSet
from ...rows import RowGroup, RowPlan
from ..branches import Part, stacked_conds
from ..calls import CallImages
from .dilution import diluted, expanded_box
from .inversion import at_level, content_key, invert_levels
from .subject import SubjectAttention


def image_batch(session, host) -> "ImageBatch | None":
    """The batch's image concepts when the plan has any (None: nothing of this runs)."""
    if not session.plan.image_concepts:
        return None
    if host.schedule is None:
        raise EngineError("image concepts: the host did not say which noise levels its sampler uses")
    return ImageBatch(session, host)


class ImageBatch:
    def __init__(self, session, host):
        self.session, self.plan, self.schedule = session, session.plan, host.schedule
        to_x0 = host.to_x0 or (lambda x, out, sigma: out)
        self.to_x0 = to_x0
        self.cache = session.inversions
        self.keys: dict[tuple, str] = {}   # ("reference", concept) / ("background", image) -> cache key
        self.subject: SubjectAttention | None = None   # the class words' attention while references invert

    # ---- inversion ------------------------------------------------------------------------

    def _prompt_row(self, cond, images: CallImages) -> tuple[dict, int]:
        """The host's conditioning of one row of the call (a cond row when there is one) and its image."""
        row = 0 if images.cond else len(images.cond)
        return rows_of(cond, slice(row, row + 1)), images.all[row]

    def ensure(self, model_fn, x, sigma, cond, images: CallImages) -> None:
        """Invert, in one batched pass over the levels, every picture this call needs that is not
        inverted yet: each image concept's reference under its own prompt (no LoRA, no CFG) and
        the kept background of the call's image under the main prompt."""
        plan = self.plan
        host_row, image = self._prompt_row(cond, images)
        wanted = []   # (what, clean latent (1, C, h, w), conditioning of one row, class word positions)
        for i in plan.image_concepts:
            concept = plan.concepts[i]
            if ("reference", i) not in self.keys:
                find = concept.own_class_tokens if concept.reference_mask is None else None
                wanted.append((("reference", i), concept.reference, override(host_row, concept.cond, (image,)), find))
        if plan.background is not None and ("background", image) not in self.keys:
            background = plan.background[min(image, plan.background.shape[0] - 1)][None]
            wanted.append((("background", image), background, host_row, None))
        todo = []
        for what, clean, conditioning, find in wanted:
            key = content_key(clean, *conditioning.values(), extra=(tuple(float(v) for v in self.schedule.levels), find))
            self.keys[what] = key
            if self.cache.get(key) is None and all(key != k for k, _, _, _ in todo):
                todo.append((key, clean, conditioning, find))
        # at most as many rows as the host's call has (a host maps each engine row to one of its
        # rows, e.g. Forge's ControlNet residuals) and the row cap allows
        size = max(1, min(x.shape[0], plan.options.max_rows_per_call or x.shape[0]))
        for start in range(0, len(todo), size):
            self._invert(model_fn, x, sigma, todo[start:start + size])

    def _invert(self, model_fn, x, sigma, todo) -> None:
        session, plan = self.session, self.plan
        n = len(todo)
        own = [c for _, _, c, _ in todo]
        conds = stacked_conds(plan, session.context_key, own, own)
        rows = RowPlan()
        rows.add("base", n, 0)
        clean = torch.cat([latent.to(x.device, x.dtype) for _, latent, _, _ in todo])
        finding = {row: find for row, (_, _, _, find) in enumerate(todo) if find}
        self.subject = SubjectAttention(finding) if finding else None

        def evaluate(xx, level, on_path):
            levels = torch.full((n,), float(level), dtype=sigma.dtype, device=sigma.device)
            session.run.call = CallState(rows)   # no branch rows: no LoRA, no injection, no replay
            try:
                out = model_fn(xx.to(x.dtype), levels, conds)
            finally:
                session.run.call = None
            session.stats.invert_rows += n
            return out

        def x0_of(xx, out, level):
            return self.to_x0(xx, out, torch.full((xx.shape[0],), float(level), dtype=sigma.dtype, device=sigma.device))
        try:
            with self._watching_cross():
                inverted = invert_levels(evaluate, clean, self.schedule, x0_of)
            subject, self.subject = self.subject, None
        finally:
            self.subject = None
        for row, (key, latent, _, find) in enumerate(todo):
            entry = {level: z[row:row + 1].detach() for level, z in inverted.items()}
            entry["clean"] = clean[row:row + 1]
            if find:   # the subject found by its class word's attention (None: nothing recorded)
                entry["subject"] = subject.mask(row, plan.regions)
            self.cache.put(key, entry)

    def watch_cross(self, q, k, heads: int) -> None:
        """Forge: a cross-attention's q, k during an inversion (the session's `_attend`)."""
        if self.subject is not None:
            self.subject.record(q, k, heads)

    def _watching_cross(self):
        """A1111: the cross-attention modules' q and k during the inversion, when a subject is found."""
        patches = PatchSet()
        if self.subject is None or not self.session.attention_on_modules:
            return patches
        for name, module in self.session.unet.named_modules():
            if name.endswith("attn2") and is_attention(module):
                patches.add(module, "forward", lambda original, module=module: self._cross_forward(module, original))
        return patches

    def _cross_forward(self, module, original):
        def forward(x, context=None, *args, **kwargs):
            out = original(x, context, *args, **kwargs)
            if context is not None and self.subject is not None:
                with torch.no_grad():
                    self.subject.record(module.to_q(x), module.to_k(context), module.heads)
            return out
        return forward

    def box(self, index: int) -> torch.Tensor:
        """The concept's subject box grown by dilution_expand, at latent size: from its mask, else
        the subject found in the reference, else the whole picture."""
        concept = self.plan.concepts[index]
        mask = concept.reference_mask
        if mask is None:
            mask = self.cache.get(self.keys[("reference", index)]).get("subject")
        return expanded_box(mask, self.plan.regions.latent_hw, self.plan.options.dilution_expand)

    def latents(self, what) -> tuple[dict[float, torch.Tensor], torch.Tensor]:
        entry = self.cache.get(self.keys[what])
        return {k: v for k, v in entry.items() if isinstance(k, float)}, entry["clean"]

    def at(self, what, level: float) -> torch.Tensor:
        inverted, clean = self.latents(what)
        return at_level(inverted, clean, self.schedule, level)

    # ---- reference rows ------------------------------------------------------------------

    def reference_latent(self, index: int, x, sigma, images: CallImages) -> torch.Tensor:
        """Concept `index`'s reference row for this call: its inverted latent at the call's level,
        diluted outside its grown box with the background's (or the image's current latent)."""
        row = 0 if images.cond else len(images.cond)
        image, level = images.all[row], float(sigma[row])
        z_ref = self.at(("reference", index), level).to(x.device, x.dtype)
        if self.plan.background is not None:
            z_inpaint = self.at(("background", image), level)
        else:
            z_inpaint = x[row:row + 1]
        return diluted(z_ref, z_inpaint, self.box(index), self.plan.options.dilution_beta)

    def with_references(self, parts: list[Part], model_fn, x, sigma, cond, images: CallImages) -> list[Part]:
        """The call's branch parts with one reference part (one cond row: the concept's prompt)
        just before each image concept's part."""
        self.ensure(model_fn, x, sigma, cond, images)
        host_row, image = self._prompt_row(cond, images)
        row = 0 if images.cond else len(images.cond)
        out = []
        for part in parts:
            index = part.group.index
            if part.group.kind == "concept" and self.plan.concepts[index].reference is not None:
                conditioning = override(host_row, self.plan.concepts[index].cond, (image,))
                out.append(Part(RowGroup("reference", index, 0, 1, 0), self.reference_latent(index, x, sigma, images),
                                sigma[row:row + 1], [conditioning]))
            out.append(part)
        return out
