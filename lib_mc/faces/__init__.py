"""Face concepts: insightface's antelopev2 pack on onnxruntime (find, detect, align, embed), the
identity score, InstantID's keypoint drawing; InstantID's own models are in `instantid/`."""
