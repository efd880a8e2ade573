"""Grounding DINO boxes for class words, with transformers' GroundingDinoForObjectDetection.

Either format loads on the CPU: a transformers folder as it is, an original .pth through our key
mapping (convert.py) with the config beside it or implied by its name (files.py). The image is
prepared as the original's inference does (shorter side 800, longer at most 1333, PIL bilinear,
ImageNet mean/std), the phrases become one caption "man . woman .".
"""

from __future__ import annotations

import json
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from ..kept import KeptModel
from ..sam import ModelFileError
from .convert import convert_state_dict, hf_config, text_config
from .files import is_hf_folder, original_args, tokenizer_folders as pth_tokenizer_folders

MIN_TRANSFORMERS = (4, 40)
HF_CACHE_DIR = None   # None: transformers' own cache (only ever read: local_files_only)
# transformers' Grounding DINO hard-codes bert-base-uncased's ids of its separator tokens
BERT_IDS = {"[CLS]": 101, "[SEP]": 102, ".": 1012, "?": 1029}
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
NMS_IOU = 0.5


@dataclass(frozen=True)
class Detection:
    box: tuple[float, float, float, float]   # (x, y, w, h) fractions of the image
    score: float


def transformers_problem(path: str) -> str | None:
    """Why the installed transformers cannot run Grounding DINO (None: it can)."""
    try:
        import transformers
    except ImportError as exc:
        return f"Grounding DINO checkpoint {path}: transformers is not installed ({exc})"
    version = str(transformers.__version__)
    found = re.match(r"(\d+)\.(\d+)", version)
    if found is None or tuple(int(v) for v in found.groups()) < MIN_TRANSFORMERS:
        return (f"Grounding DINO checkpoint {path}: transformers {version} is installed; Grounding DINO "
                f"needs transformers {'.'.join(map(str, MIN_TRANSFORMERS))} or newer (Forge ships 4.46.1)")
    return None


def _check_transformers(path: str) -> None:
    problem = transformers_problem(path)
    if problem is not None:
        raise ModelFileError(problem)


def _bert_heads(folder: str | None) -> int | None:
    try:
        if folder is None:
            from transformers import BertConfig
            return BertConfig.from_pretrained("bert-base-uncased", local_files_only=True,
                                              cache_dir=HF_CACHE_DIR).num_attention_heads
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
        return int(config["num_attention_heads"]) if config.get("model_type") == "bert" else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _tokenizer(path: str, folders: list[str]):
    """BERT tokenizer from the first folder with a vocabulary, else bert-base-uncased from the
    Hugging Face cache (never downloaded). Returns (tokenizer, folder or None for the cache)."""
    from transformers import BertTokenizerFast

    for folder in folders:
        if any(os.path.isfile(os.path.join(folder, f)) for f in ("vocab.txt", "tokenizer.json")):
            try:
                tokenizer = BertTokenizerFast.from_pretrained(folder, local_files_only=True)
            except (OSError, ValueError) as exc:
                raise ModelFileError(f"Grounding DINO checkpoint {path}: the tokenizer in {folder} "
                                     f"could not be read: {exc}") from exc
            return _checked(tokenizer, path, folder), folder
    try:
        tokenizer = BertTokenizerFast.from_pretrained("bert-base-uncased", local_files_only=True, cache_dir=HF_CACHE_DIR)
    except (OSError, ValueError) as exc:
        raise ModelFileError(
            f"Grounding DINO checkpoint {path}: no BERT tokenizer (bert-base-uncased's vocab.txt) in "
            f"{', '.join(folders)} nor bert-base-uncased in the Hugging Face cache; put vocab.txt in one "
            "of those folders (nothing is downloaded)") from exc
    return _checked(tokenizer, path, "the Hugging Face cache"), None


def _checked(tokenizer, path: str, where: str):
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in BERT_IDS}
    if ids != BERT_IDS:
        raise ModelFileError(f"Grounding DINO checkpoint {path}: the tokenizer in {where} is not bert-base-uncased's "
                             f"vocabulary (Grounding DINO needs the ids {BERT_IDS}, it has {ids})")
    return tokenizer


@contextmanager
def _no_kernel_build():
    """Building transformers' Grounding DINO JIT-compiles a CUDA kernel for its deformable attention
    when CUDA and ninja are there (minutes with nvcc, a warning without). The pure-torch path (the
    one the tests compare with the original) is used instead: no compiler runs while loading."""
    from transformers.models.grounding_dino import modeling_grounding_dino as modeling

    saved = getattr(modeling, "is_ninja_available", None)
    if saved is not None:
        modeling.is_ninja_available = lambda: False
    try:
        yield
    finally:
        if saved is not None:
            modeling.is_ninja_available = saved


def read_original(path: str) -> dict:
    """The state dict of an original .pth ({'model': state_dict}), read as tensors only, without the
    "module." prefix training under DistributedDataParallel left on the keys."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:   # not a zip/pickle, truncated, or objects other than tensors
        raise ModelFileError(f"Grounding DINO checkpoint {path} could not be read: {exc}") from exc
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelFileError(f"Grounding DINO checkpoint {path} holds no state dict (an original checkpoint "
                             "is {'model': state_dict})")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def original_tokenizer(path: str, text_encoder_type, extra_folders):
    """The tokenizer of an original .pth: (tokenizer, its folder or None for the Hugging Face cache)."""
    folders = pth_tokenizer_folders(path, extra_folders)
    if os.path.isdir(str(text_encoder_type)):   # a config naming its BERT folder
        folders.append(text_encoder_type)
    return _tokenizer(path, folders)


def _load_original(path: str, extra_folders):
    from transformers import GroundingDinoForObjectDetection

    args = original_args(path)
    state = read_original(path)
    tokenizer, folder = original_tokenizer(path, args.get("text_encoder_type"), extra_folders)
    try:
        config = hf_config(args, text_config(state, _bert_heads(folder)))
        config.disable_custom_kernels = True
        converted = convert_state_dict(state)
        with _no_kernel_build():
            model = GroundingDinoForObjectDetection(config)
        missing, unexpected = model.load_state_dict(converted, strict=False)
    except ModelFileError as exc:
        raise ModelFileError(f"Grounding DINO checkpoint {path}: {exc}") from exc
    except (RuntimeError, ValueError) as exc:   # shapes that do not fit the config
        raise ModelFileError(f"Grounding DINO checkpoint {path} does not fit its config "
                             f"({args['backbone']}, hidden_dim {args['hidden_dim']}): {exc}") from exc
    check_fit(path, f"its config ({args['backbone']})", missing, unexpected, tokenizer, config.text_config.vocab_size)
    return model, tokenizer


def check_fit(path: str, config: str, missing, unexpected, tokenizer, vocab_size: int) -> None:
    """A loaded original checkpoint must fill the model built from `config` exactly, and its
    tokenizer must not give ids past the text encoder's vocabulary."""
    if missing or unexpected:
        raise ModelFileError(f"Grounding DINO checkpoint {path} does not fit {config}: "
                             f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    if len(tokenizer) > vocab_size:
        raise ModelFileError(f"Grounding DINO checkpoint {path}: its tokenizer has {len(tokenizer)} tokens, "
                             f"the text encoder {vocab_size}")


def _load_hf(path: str, extra_folders):
    from transformers import GroundingDinoForObjectDetection

    try:
        with _no_kernel_build():
            model = GroundingDinoForObjectDetection.from_pretrained(path, local_files_only=True,
                                                                    disable_custom_kernels=True)
    except Exception as exc:   # transformers raises OSError, ValueError or RuntimeError for bad files
        raise ModelFileError(f"Grounding DINO folder {path} could not be loaded: {exc}") from exc
    tokenizer, _ = _tokenizer(path, [path] + [f for f in extra_folders if f])
    return model, tokenizer


def resized_size(height: int, width: int, size: int, max_size: int) -> tuple[int, int]:
    """The original's RandomResize([size], max_size) rule: (new height, new width)."""
    short, long = float(min(height, width)), float(max(height, width))
    if long / short * size > max_size:
        size = int(round(max_size * short / long))
    if min(height, width) == size:
        return height, width
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


def preprocess(image: np.ndarray, size: int = 800, max_size: int = 1333) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (1, 3, h, w) normalised, as the original inference prepares it."""
    from PIL import Image

    if not (isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8):
        raise ValueError(f"Grounding DINO: the image must be (H, W, 3) uint8 RGB, got "
                         f"{getattr(image, 'shape', type(image))} {getattr(image, 'dtype', '')}")
    height, width = resized_size(image.shape[0], image.shape[1], size, max_size)
    pil = Image.fromarray(image).resize((width, height), Image.BILINEAR)
    pixels = torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0).permute(2, 0, 1)
    pixels = (pixels - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    return pixels[None]


def caption_and_spans(phrases) -> tuple[str, list[tuple[int, int]]]:
    """"man . woman ." and each phrase's character span in it."""
    caption, spans = "", []
    for phrase in phrases:
        words = " ".join(str(phrase).lower().split())
        if not words:
            raise ValueError(f"Grounding DINO: empty phrase in {list(phrases)!r}")
        if caption:
            caption += " "
        spans.append((len(caption), len(caption) + len(words)))
        caption += words + " ."
    return caption, spans


def phrase_tokens(offsets, spans, limit: int) -> list[list[int]]:
    """Per phrase the indices of its tokens among the model's first `limit` text tokens."""
    tokens = [[] for _ in spans]
    for j, (start, end) in enumerate(list(offsets)[:limit]):
        if end <= start:   # special tokens
            continue
        for i, (s, e) in enumerate(spans):
            if s <= start and end <= e:
                tokens[i].append(j)
    return tokens


def post_process(logits: torch.Tensor, pred_boxes: torch.Tensor, tokens, box_threshold: float,
                 text_threshold: float) -> list[list[Detection]]:
    """One image's (queries, text tokens) logits and (cx, cy, w, h) boxes -> per phrase its boxes,
    best first: a query counts when its best token's probability is above box_threshold (the
    original's box filter) and it goes to every phrase with a token above text_threshold (the
    original names its phrase by those tokens); box NMS per phrase."""
    from torchvision.ops import box_convert, nms

    probs = logits.float().sigmoid().cpu()
    boxes = box_convert(pred_boxes.float().cpu(), "cxcywh", "xyxy").clamp(0.0, 1.0)
    confident = probs.max(dim=-1).values > box_threshold
    found = []
    for phrase in tokens:
        if not phrase:   # past the model's 256 text tokens
            found.append([])
            continue
        scores = probs[:, phrase].max(dim=-1).values
        rows = torch.nonzero(confident & (scores > text_threshold)).flatten()
        kept = rows[nms(boxes[rows], scores[rows], NMS_IOU)]
        found.append([Detection(box=(float(x0), float(y0), float(x1 - x0), float(y1 - y0)), score=float(s))
                      for (x0, y0, x1, y1), s in zip(boxes[kept].tolist(), scores[kept].tolist())])
    return found


class OnDevice:
    """What both backends share: `self.model` on one device, moved only when asked for another, and
    `detect` over the backend's `predict(pixels, caption, spans)` -> (logits (queries, 256), boxes
    (queries, 4) cx, cy, w, h, each phrase's token positions)."""
    model: torch.nn.Module
    size: int
    max_size: int

    def predict(self, pixels: torch.Tensor, caption: str, spans) -> tuple:
        raise NotImplementedError

    @torch.no_grad()
    def detect(self, image: np.ndarray, phrases: list[str], box_threshold: float = 0.35,
               text_threshold: float = 0.25) -> list[list[Detection]]:
        """Per phrase its boxes, best first (see post_process)."""
        if not phrases:
            return []
        caption, spans = caption_and_spans(phrases)
        logits, boxes, tokens = self.predict(preprocess(image, self.size, self.max_size), caption, spans)
        return post_process(logits, boxes, tokens, box_threshold, text_threshold)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device):
        if self.device != torch.device(device):
            self.model.to(device)
        return self


class GroundingDino(OnDevice):
    def __init__(self, path: str, tokenizer_folders=(), *, size: int = 800, max_size: int = 1333):
        _check_transformers(path)
        if os.path.isdir(path):
            if not is_hf_folder(path):
                raise ModelFileError(f"Grounding DINO folder {path} has no config.json of model_type "
                                     "'grounding-dino' with model.safetensors or pytorch_model.bin")
            self.model, self.tokenizer = _load_hf(path, tokenizer_folders)
        elif os.path.isfile(path):
            self.model, self.tokenizer = _load_original(path, tokenizer_folders)
        else:
            raise ModelFileError(f"Grounding DINO checkpoint {path} does not exist")
        self.path = path
        self.size, self.max_size = size, max_size
        self.model.eval()

    @torch.no_grad()
    def outputs(self, pixels: torch.Tensor, caption: str):
        """The model's raw outputs for a prepared image and a caption (tests compare them)."""
        encoded = self.tokenizer(caption, return_tensors="pt", return_offsets_mapping=True)
        device = self.device
        out = self.model(pixel_values=pixels.to(device), input_ids=encoded["input_ids"].to(device),
                         token_type_ids=encoded["token_type_ids"].to(device),
                         attention_mask=encoded["attention_mask"].to(device),
                         pixel_mask=torch.ones(pixels.shape[:1] + pixels.shape[2:], dtype=torch.long, device=device))
        return out, encoded

    def predict(self, pixels: torch.Tensor, caption: str, spans) -> tuple:
        out, encoded = self.outputs(pixels, caption)
        tokens = phrase_tokens(encoded["offset_mapping"][0].tolist(), spans, self.model.config.max_text_len)
        return out.logits[0], out.pred_boxes[0], tokens


def load(path: str, tokenizer_folders=(), code_folders=(), **sizes):
    """The backend for a checkpoint: transformers' model (transformers 4.40+, either format); with an
    older transformers an original .pth runs on IDEA-Research's own code (original.py) when that code
    is importable: the pip `groundingdino` package or sd-webui-segment-anything's `local_groundingdino`
    (found in code_folders, e.g. <extensions>/sd-webui-segment-anything)."""
    problem = transformers_problem(path)
    if problem is None or os.path.isdir(path) or not os.path.isfile(path):
        return GroundingDino(path, tokenizer_folders, **sizes)
    from .original import OriginalGroundingDino, find_code

    code = find_code(code_folders)
    if code is None:
        raise ModelFileError(f"{problem}, or IDEA-Research's Grounding DINO code, which sd-webui-segment-anything "
                             "brings (its local_groundingdino): install that extension, or transformers 4.40+")
    return OriginalGroundingDino(path, tokenizer_folders, code, **sizes)


class DinoModels(KeptModel):
    """One Grounding DINO kept between jobs."""

    def __init__(self):
        super().__init__(lambda detector: detector.model)

    def model(self, path: str, device, tokenizer_folders=(), code_folders=()):
        """The model for `path` on `device`: a GroundingDino or an OriginalGroundingDino (see load)."""
        return self.get((path, tuple(tokenizer_folders), tuple(code_folders)),
                        lambda: load(path, tokenizer_folders, code_folders), device)
