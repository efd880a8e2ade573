"""Grounding DINO on IDEA-Research's own model code, for a transformers older than 4.40 (A1111 1.10
ships 4.30.2, which has no GroundingDinoForObjectDetection).

The code: the pip `groundingdino` package, else sd-webui-segment-anything's copy of it,
`local_groundingdino` (already imported by that extension's scripts, or imported from its folder).
An original .pth is built as that extension builds it: the config beside it through the package's
own SLConfig.fromfile (it runs the file, as the extension does), else the released config;
`build_model(args)`; the weights over it. The builder would download bert-base-uncased: while it
runs, its two text-encoder loaders return our tokenizer and a BertModel shaped from the checkpoint.
Image preparation and post-processing are model.py's, so both backends decide alike.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import Callable

import torch

from ..sam import ModelFileError
from .convert import text_config
from .files import BUILT_IN, ORIGINAL_FILES, config_file
from .model import OnDevice, _bert_heads, check_fit, original_tokenizer, phrase_tokens, read_original

PACKAGES = ("groundingdino", "local_groundingdino")   # the pip package first, as the extension does
# what the released config sets besides the shapes (files.BUILT_IN): training options build_model reads
BUILD_ONLY = dict(
    batch_size=1, modelname="groundingdino", backbone_freeze_keywords=None, dropout=0.0, dn_box_noise_scale=1.0,
    dn_label_noise_ratio=0.5, dn_label_coef=1.0, dn_bbox_coef=1.0, dn_labelbook_size=2000, use_checkpoint=True,
    use_transformer_ckpt=True, text_dropout=0.0, fusion_dropout=0.0, fusion_droppath=0.1,
)
# keys of the released files that the original model no longer has (its loader passes strict=False):
# the training-only denoising label embedding and the position ids older transformers saved
IGNORED = re.compile(r"label_enc\.|bert\.embeddings\.position_ids$")


@dataclass(frozen=True)
class Code:
    name: str
    build_model: Callable
    SLConfig: type
    tokenlizer: ModuleType   # <name>.util.get_tokenlizer: the builder calls its loaders through it


def _import(name: str) -> Code:
    importlib.import_module(name)   # the package first: a hidden one stops here
    models = importlib.import_module(name + ".models")
    slconfig = importlib.import_module(name + ".util.slconfig")
    tokenlizer = importlib.import_module(name + ".util.get_tokenlizer")
    attention = sys.modules.get(name + ".models.GroundingDINO.ms_deform_attn")
    # IDEA-Research's package sends CUDA tensors to its compiled _C; when that failed to build
    # (sd-webui-segment-anything then uninstalls it) it would fail on the GPU
    if (torch.cuda.is_available() and attention is not None
            and hasattr(attention, "MultiScaleDeformableAttnFunction") and getattr(attention, "_C", None) is None):
        raise ImportError(f"{name} has no compiled _C for its CUDA deformable attention")
    return Code(name, models.build_model, slconfig.SLConfig, tokenlizer)


def find_code(code_folders=()) -> Code | None:
    """IDEA-Research's Grounding DINO code: the pip package, else `local_groundingdino` already
    imported or in one of code_folders (put on sys.path only while importing)."""
    for name in PACKAGES:
        if name == PACKAGES[0] or name in sys.modules:
            try:
                return _import(name)
            except Exception:   # not there, or broken: importing a package can raise anything
                pass
    for folder in code_folders:
        if not folder or not os.path.isdir(os.path.join(folder, PACKAGES[1])):
            continue
        added = folder not in sys.path
        if added:
            sys.path.insert(0, folder)
        try:
            return _import(PACKAGES[1])
        except Exception:
            continue
        finally:
            if added:
                sys.path.remove(folder)
    return None


@contextmanager
def patched(patches):
    """Sets (object, attribute, value) for the duration; the originals come back even on errors."""
    saved = [(target, name, getattr(target, name)) for target, name, _ in patches]
    try:
        for target, name, value in patches:
            setattr(target, name, value)
        yield
    finally:
        for target, name, value in saved:
            setattr(target, name, value)


def _config(path: str, code: Code):
    """The build arguments: the config file beside the .pth, else the released one its name implies."""
    found = config_file(path)
    if found is not None:
        try:
            return code.SLConfig.fromfile(found), found
        except Exception as exc:   # it runs the file: anything a Python file can raise
            raise ModelFileError(f"Grounding DINO config {found} could not be read: {exc}") from exc
    name = os.path.basename(path).lower()
    if name not in BUILT_IN:
        raise ModelFileError(f"Grounding DINO checkpoint {path}: cannot tell its config (the file name is not "
                             f"{' or '.join(ORIGINAL_FILES)} and no {os.path.splitext(os.path.basename(path))[0]}.py "
                             "config is beside it)")
    return code.SLConfig(cfg_dict=dict(BUILD_ONLY, **BUILT_IN[name])), f"the released config of {name}"


class OriginalGroundingDino(OnDevice):
    """An original .pth on IDEA-Research's code, with GroundingDino's interface (to, detect)."""

    def __init__(self, path: str, tokenizer_folders=(), code: Code | None = None, *, size: int = 800,
                 max_size: int = 1333):
        from transformers import BertConfig, BertModel

        code = code or find_code()
        if code is None:
            raise ModelFileError(f"Grounding DINO checkpoint {path}: IDEA-Research's Grounding DINO code "
                                 "(groundingdino or sd-webui-segment-anything's local_groundingdino) is not importable")
        args, source = _config(path, code)
        state = read_original(path)
        self.tokenizer, folder = original_tokenizer(path, getattr(args, "text_encoder_type", None), tokenizer_folders)
        try:
            text = text_config(state, _bert_heads(folder))
        except ModelFileError as exc:
            raise ModelFileError(f"Grounding DINO checkpoint {path}: {exc}") from exc
        bert = BertConfig(**{k: v for k, v in text.items() if k != "model_type"})
        # the builder's text encoder: ours, never a download; the checkpoint's bert.* load over it
        loaders = [(code.tokenlizer, "get_tokenlizer", lambda *_: self.tokenizer),
                   (code.tokenlizer, "get_pretrained_language_model", lambda *_: BertModel(bert))]
        try:
            with patched(loaders):
                model = code.build_model(args)
        except Exception as exc:   # the builder asserts on bad options, reads missing ones as attributes
            raise ModelFileError(f"Grounding DINO checkpoint {path} could not be built from {source} "
                                 f"with {code.name}: {exc!r}") from exc
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as exc:   # shapes that do not fit the config
            raise ModelFileError(f"Grounding DINO checkpoint {path} does not fit {source}: {exc}") from exc
        check_fit(path, source, [k for k in missing if not IGNORED.match(k)],
                  [k for k in unexpected if not IGNORED.match(k)], self.tokenizer, bert.vocab_size)
        self.model = model.eval()
        self.code = code.name
        self.path = path
        self.size, self.max_size = size, max_size

    @torch.no_grad()
    def outputs(self, pixels: torch.Tensor, caption: str) -> dict:
        """The original's outputs for a prepared image: pred_logits (1, queries, 256), pred_boxes."""
        return self.model(pixels.to(self.device), captions=[caption])

    def predict(self, pixels: torch.Tensor, caption: str, spans) -> tuple:
        out = self.outputs(pixels, caption)
        # the model tokenizes the caption with this same tokenizer
        offsets = self.tokenizer(caption, return_offsets_mapping=True)["offset_mapping"]
        return out["pred_logits"][0], out["pred_boxes"][0], phrase_tokens(offsets, spans, self.model.max_text_len)
