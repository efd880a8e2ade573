"""Face concepts in `prepare`: the photos' ArcFace embedding (antelopev2), and, where InstantID
acts (blend and conductor mode, face_weight or face_control above 0, an SDXL checkpoint), the
identity tokens from InstantID's IP-Adapter and the models the engine hooks in. Everything
missing or wrong is named here, before any sampling."""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from .job import IMAGE_MODES, Job, JobError
from .methods.faces.identity import FaceIdentity, InstantID


def _model_error(exc: Exception, where: str) -> JobError:
    return JobError(where, str(exc))


class FacePreparer:
    """One prepare call's face concepts; `cache` (the job's pictures cache) keeps each photo's
    embedding across the batches of a job."""

    def __init__(self, job: Job, services, unet, cache: dict):
        self.job, self.services, self.unet, self.cache = job, services, unet, cache
        self.ip = None   # the IP-Adapter, loaded at the first concept it acts for
        self.net = None
        self.models: InstantID | None = None

    def _analysis(self, where: str):
        get = getattr(self.services, "face_analysis", None)
        if get is None:
            raise JobError(where, "face concepts are not available on this host (it has no face analysis)")
        try:
            return get()
        except Exception as exc:   # ModelFileError names the files and folders
            raise _model_error(exc, where) from exc

    def _embedding(self, photos: list[str], where: str) -> tuple[np.ndarray, np.ndarray]:
        key = ("face", hashlib.sha256("\n".join(photos).encode("ascii", "replace")).hexdigest())
        if key not in self.cache:
            from .faces.identity import reference_embedding
            from .regions import decode_png
            pictures = [np.asarray(decode_png(png, f"{where}[{k}]").convert("RGB")) for k, png in enumerate(photos)]
            self.cache[key] = reference_embedding(self._analysis(where), pictures, field=where)
        return self.cache[key]

    def identity(self, index: int) -> FaceIdentity | None:
        spec = self.job.concepts[index]
        if not spec.faces:
            return None
        where = f"concepts[{index}].faces"
        embedding, kps = self._embedding(spec.faces, where)
        face = FaceIdentity(np.asarray(embedding), np.asarray(kps), spec.face_weight, spec.face_control)
        if self.job.mode not in IMAGE_MODES or (spec.face_weight <= 0 and spec.face_control <= 0):
            return face   # scored only
        self._load(where, need_control=spec.face_control > 0)
        with torch.no_grad():
            cond, uncond = self.ip.tokens(torch.as_tensor(face.embedding, dtype=torch.float32))
        face.cond_tokens, face.uncond_tokens = cond.detach(), uncond.detach()
        return face

    def _load(self, where: str, need_control: bool) -> None:
        arch = getattr(self.services, "model_arch", "sdxl")
        if arch != "sdxl":
            raise JobError(where, f"InstantID works with SDXL checkpoints; the model is {arch.upper()} (use an SDXL "
                                  "checkpoint, or set face_weight and face_control to 0 to only score the face)")
        get = getattr(self.services, "instantid", None)
        if get is None:
            raise JobError(where, "InstantID is not available on this host")
        if self.ip is None or (need_control and self.net is None):
            try:
                self.ip, net = get(self.unet, need_control)
            except Exception as exc:   # ModelFileError names the files and folders
                raise _model_error(exc, where) from exc
            self.net = net if net is not None else self.net   # a module: no truth value to lean on
            if self.net is not None:
                _check_residuals(self.net, self.unet, where)
        self.models = InstantID(dict(self.ip.layers), self.net)


def _check_residuals(net, unet, where: str) -> None:
    """The IdentityNet gives one residual per UNet input block and one for the middle."""
    count = len(net.controlnet_down_blocks) + 1
    blocks = len(getattr(unet, "input_blocks", []))
    if count != blocks + 1:
        raise JobError(where, f"the IdentityNet gives {count} residuals; this UNet has {blocks} input blocks "
                              "and a middle block (is it an SDXL IdentityNet?)")
