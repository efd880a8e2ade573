"""Grounding DINO boxes for automatic regions (setting `multi_concept_boxes`): the layout image
is searched for each automatic concept's class word, and the boxes found tell attention and SAM
where each subject is, as the SDXL + InstantID paper places its subjects. Checkpoints: an HF
folder or IDEA-Research's .pth in models/grounding-dino, or where sd-webui-segment-anything
keeps them; run with transformers 4.40+ (Forge), else an original .pth with IDEA-Research's own
code (sd-webui-segment-anything's, on A1111); missing: a note, and attention finds the boxes."""

from __future__ import annotations

import os
from typing import Callable

import numpy as np

from modules import devices, paths, shared

from ..auto import dino
from ..auto.boxes import assign_boxes
from ..auto.sam import ModelFileError
from . import webui_models

SETTING = "multi_concept_boxes"
INFOTEXT = "Multi-Concept boxes"   # written when Grounding DINO placed the boxes; pasting restores the setting
ATTENTION, GROUNDING_DINO = "attention", "Grounding DINO"
BOX_THRESHOLD, TEXT_THRESHOLD = 0.35, 0.25   # Grounding DINO's demo defaults
MODELS = dino.DinoModels()


def _segment_anything() -> str | None:
    extensions = webui_models.extensions_dir()
    return os.path.join(extensions, "sd-webui-segment-anything") if extensions else None


def folders() -> list[str]:
    found = [os.path.join(paths.models_path, "grounding-dino")]
    if _segment_anything():
        found.append(os.path.join(_segment_anything(), "models", "grounding-dino"))
    return found


def code_folders() -> list[str]:
    """Where IDEA-Research's own code is when transformers is too old for its Grounding DINO:
    sd-webui-segment-anything's local_groundingdino (a pip `groundingdino` is found anyway)."""
    return [_segment_anything()] if _segment_anything() else []


def wanted() -> bool:
    return getattr(shared.opts, SETTING, ATTENTION) == GROUNDING_DINO


def find_boxes(images: Callable[[], list[np.ndarray]], concepts: list, warnings: list[str]) -> list[list] | None:
    """Per image, per automatic concept its box: the drawn one, else Grounding DINO's for its
    class word (None where none was found). None: the setting is attention, or no model."""
    if not wanted():
        return None
    searched = folders()
    path = dino.find_checkpoint(searched)
    if path is None:
        webui_models.note(dino.missing_message(searched), warnings)
        return None
    words = [c.auto_word for c in concepts]
    phrases = list(dict.fromkeys(words))   # one prompt per image, each class word once
    hints, drawn, names = [c.auto_hint for c in concepts], [c.auto_box for c in concepts], [c.name for c in concepts]
    try:
        model = MODELS.model(path, devices.device, tokenizer_folders=searched, code_folders=code_folders())
        out = []
        for image in images():
            detections = dict(zip(phrases, model.detect(image, phrases, BOX_THRESHOLD, TEXT_THRESHOLD)))
            boxes, notes = assign_boxes(detections, words, hints, drawn, names)
            out.append(boxes)
            warnings.extend(n for n in notes if n not in warnings)
        return out
    except ModelFileError as exc:
        webui_models.note(f"automatic regions: {exc}: used attention boxes", warnings)
        return None
    except RuntimeError as exc:   # out of memory, a device error: the job goes on without the boxes
        webui_models.note(f"automatic regions: Grounding DINO failed ({exc}): used attention boxes", warnings)
        return None
    finally:
        webui_models.release(MODELS)
