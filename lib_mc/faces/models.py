"""Where users keep insightface's antelopev2 pack, and finding its two files there."""

from __future__ import annotations

import os

from ..auto.sam import ModelFileError

ANTELOPE_FILES = ("scrfd_10g_bnkps.onnx", "glintr100.onnx")   # detector with keypoints, ArcFace


def antelopev2_folders(models_path: str, extensions_path: str | None = None) -> list[str]:
    """Search order. insightface's FaceAnalysis(root=R, name="antelopev2") reads R/models/antelopev2.
    Forge's built-in InstantID preprocessor and IP-Adapter use R = <models>/insightface (Forge
    downloads the pack there and has no other folder for it); sd-webui-controlnet's uses
    R = <extension>/annotator/downloads/insightface. <models>/insightface/antelopev2 is where
    users unzip the pack by hand."""
    folders = [os.path.join(models_path, "insightface", "models", "antelopev2"),
               os.path.join(models_path, "insightface", "antelopev2")]
    if extensions_path and os.path.isdir(extensions_path):
        # the extension's folder name varies (sd-webui-controlnet, sd-webui-controlnet-main, ...)
        names = sorted(n for n in os.listdir(extensions_path) if "controlnet" in n.lower())
        names.sort(key=lambda n: n != "sd-webui-controlnet")
        folders += [os.path.join(extensions_path, n, "annotator", "downloads", "insightface", "models", "antelopev2")
                    for n in names]
    return folders


def _find(name: str, folder: str) -> str | None:
    """The file in the folder or below (the pack's zip unpacks into antelopev2/antelopev2)."""
    if not os.path.isdir(folder):
        return None
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        if name in files:
            return os.path.join(root, name)
    return None


def find_antelopev2(folders: list[str]) -> tuple[str, str]:
    """(detector path, recogniser path), each the first found in folder order."""
    found = {name: next((p for p in (_find(name, f) for f in folders) if p), None) for name in ANTELOPE_FILES}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        raise ModelFileError(
            f"insightface's antelopev2 face models are needed ({' and '.join(ANTELOPE_FILES)}); missing: "
            f"{', '.join(missing)}. Searched: {'; '.join(folders) or '(no folders)'}. Put the antelopev2 pack "
            f"in {folders[0] if folders else 'models/insightface/models/antelopev2'}")
    return found[ANTELOPE_FILES[0]], found[ANTELOPE_FILES[1]]
