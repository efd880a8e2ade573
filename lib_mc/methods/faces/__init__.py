"""Face concepts (InstantID) in the methods whose concepts have rows of their own (blend, conductor)."""

from .batch import FaceBatch, face_batch
from .identity import FaceIdentity, InstantID
from .patches import add_face_patches, add_identity

__all__ = ["FaceBatch", "FaceIdentity", "InstantID", "add_face_patches", "add_identity", "face_batch"]
