"""insightface's FaceAnalysis for the antelopev2 pack, without the insightface package: the SCRFD
detector (boxes and 5 keypoints, lib_mc.auto.faces) and the ArcFace recogniser on the face
aligned by its keypoints, both with onnxruntime. Both models take RGB (insightface feeds BGR
pictures with swapRB=True); pictures here are RGB already."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..auto.faces import FaceDetector
from ..auto.sam import ModelFileError
from .align import norm_crop


@dataclass
class Face:
    box: np.ndarray                 # (4,) x0, y0, x1, y1 in image pixels
    kps: np.ndarray                 # (5, 2) eyes, nose, mouth corners (insightface's order), image pixels
    score: float
    embedding: np.ndarray | None    # (512,) raw ArcFace output (InstantID feeds the raw one); None: not asked


def normed(embedding) -> np.ndarray:
    vector = np.asarray(embedding, dtype=np.float64).reshape(-1)
    return vector / max(float(np.linalg.norm(vector)), 1e-12)


def cosine(a, b) -> float:
    return float(normed(a) @ normed(b))


def _input_scale(path: str) -> tuple[float, float]:
    """(mean, std) of the recogniser's input. As insightface: MXNet-converted models normalise
    inside the graph (their first nodes are Sub and Mul) and take 0..255; the others
    (glintr100 among them) take (x - 127.5) / 127.5. Without the onnx package: the latter."""
    try:
        import onnx
    except ImportError:
        return 127.5, 127.5
    first = [node.name for node in onnx.load(path, load_external_data=False).graph.node[:8]]
    sub = any(n.startswith(("Sub", "_minus")) for n in first)
    mul = any(n.startswith(("Mul", "_mul")) for n in first)
    return (0.0, 1.0) if sub and mul else (127.5, 127.5)


class FaceAnalysis:
    def __init__(self, detector_path: str, recogniser_path: str):
        self.detector = FaceDetector(detector_path)   # ModelFileError names a broken file
        if not self.detector.has_kps:
            raise ModelFileError(f"face detector {detector_path} gives no keypoints; the antelopev2 pack's "
                                 "scrfd_10g_bnkps.onnx does")
        import onnxruntime
        try:
            self.recogniser = onnxruntime.InferenceSession(recogniser_path, providers=["CPUExecutionProvider"])
            self.mean, self.std = _input_scale(recogniser_path)
        except Exception as exc:
            raise ModelFileError(f"face recogniser {recogniser_path} could not be loaded: {exc}") from exc
        shape = self.recogniser.get_inputs()[0].shape
        self.size = shape[2] if isinstance(shape[2], int) else 112
        if len(self.recogniser.get_outputs()) != 1 or (isinstance(shape[3], int) and shape[3] != self.size):
            raise ModelFileError(f"face recogniser {recogniser_path} is not an ArcFace model (one square "
                                 f"picture in, one embedding out); its input is {shape}")
        self.input = self.recogniser.get_inputs()[0].name

    def faces(self, image: np.ndarray, embed: bool = True, threshold: float = 0.5) -> list[Face]:
        """(H, W, 3) uint8 RGB -> its faces, the largest box first."""
        image = np.ascontiguousarray(image[..., :3])
        boxes, kps = self.detector.detect_kps(image, threshold)
        found = [Face(box=boxes[i, :4].astype(np.float64), kps=kps[i].astype(np.float64),
                      score=float(boxes[i, 4]), embedding=None) for i in range(len(boxes))]
        found.sort(key=lambda f: -(f.box[2] - f.box[0]) * (f.box[3] - f.box[1]))
        if embed:
            for face in found:
                face.embedding = self.embed(image, face.kps)
        return found

    def embed(self, image: np.ndarray, kps: np.ndarray) -> np.ndarray:
        """The raw (512,) embedding of the face at kps."""
        crop = norm_crop(np.asarray(image)[..., :3], kps, self.size).astype(np.float32)
        blob = ((crop - self.mean) / self.std).transpose(2, 0, 1)[None]
        return self.recogniser.run(None, {self.input: blob.astype(np.float32)})[0].reshape(-1)
