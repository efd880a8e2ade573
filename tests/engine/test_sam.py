"""SAM refinement of automatic regions: the official model classes and checkpoint format.

The checkpoint is a random-weight `vit_b` written as the official file is (a plain state dict),
loaded through `lib_mc.auto.sam` (weights_only); SAM's masks are then meaningless, so the tests
check what the extension decides with them: shapes, disjointness, agreement with attention,
fallbacks and messages.
"""

import numpy as np
import pytest
import torch

segment_anything = pytest.importorskip("segment_anything", reason="segment_anything needs torchvision")

from lib_mc.auto import sam   # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = segment_anything.sam_model_registry["vit_b"]()
    path = tmp_path_factory.mktemp("sam") / sam.KNOWN_FILES["vit_b"]
    torch.save(model.state_dict(), path)
    return path


def test_checkpoint_is_found_loaded_and_refines_to_disjoint_image_masks(checkpoint):
    assert sam.find_checkpoint(str(checkpoint.parent)) == str(checkpoint)
    models = sam.SamModels()
    predictor = models.predictor(str(checkpoint), torch.device("cpu"))
    assert models.predictor(str(checkpoint), torch.device("cpu")) is predictor   # kept between jobs
    image = (np.random.default_rng(0).random((128, 96, 3)) * 255).astype(np.uint8)
    coarse = torch.zeros(2, 16, 12)
    coarse[0, 2:14, 1:5] = 1
    coarse[1, 4:12, 7:11] = 1
    masks, notes = sam.refine(predictor, image, coarse)
    assert masks.shape == (2, 128, 96)
    assert (masks.sum(0) <= 1).all() and masks[0].sum() > 0 and masks[1].sum() > 0
    for note in notes:
        assert "kept attention" in note
    models.free()
    assert models.loaded is None


def test_the_candidate_that_agrees_with_attention_wins():
    coarse = np.zeros((8, 8), bool)
    coarse[:, :4] = True
    whole, left, corner = np.ones((8, 8), bool), coarse.copy(), np.zeros((8, 8), bool)
    corner[0, 0] = True
    chosen, agreement = sam.choose_mask(np.stack([whole, left, corner]), coarse)
    assert np.array_equal(chosen, left) and agreement == 1.0


def test_missing_or_broken_checkpoints_are_named(tmp_path, checkpoint):
    assert sam.find_checkpoint(str(tmp_path)) is None
    assert sam.find_checkpoint(str(tmp_path / "nowhere")) is None
    message = sam.missing_message(str(tmp_path))
    assert str(tmp_path) in message and "sam_vit_b_01ec64.pth" in message and "attention" in message
    broken = tmp_path / "sam_vit_l_0b3195.pth"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(sam.ModelFileError, match="sam_vit_l_0b3195.pth could not be loaded as vit_l"):
        sam.SamModels().predictor(str(broken), torch.device("cpu"))
    with pytest.raises(sam.ModelFileError, match="cannot tell the SAM model type"):
        sam.model_type("/models/sam/mystery.pth")
    # a checkpoint of another size under a vit_l name: the shapes do not fit, and it says so
    misnamed = tmp_path / "sam_vit_l_copy.pth"
    misnamed.write_bytes(checkpoint.read_bytes())
    with pytest.raises(sam.ModelFileError, match="could not be loaded as vit_l"):
        sam.SamModels().predictor(str(misnamed), torch.device("cpu"))


def test_a_drawn_box_is_sams_box_prompt_in_image_pixels(checkpoint):
    predictor = sam.SamModels().predictor(str(checkpoint), torch.device("cpu"))
    boxes_seen = []

    class Spy:   # the real predictor, with the box it is given written down
        model = predictor.model

        def set_image(self, image):
            predictor.set_image(image)

        def predict(self, **kwargs):
            boxes_seen.append(kwargs["box"].tolist())
            return predictor.predict(**kwargs)
    image = (np.random.default_rng(1).random((128, 96, 3)) * 255).astype(np.uint8)
    coarse = torch.zeros(2, 16, 12)
    coarse[0, 8:12, 3:9] = 1
    coarse[1, 4:12, 7:11] = 1
    masks, _ = sam.refine(Spy(), image, coarse, boxes=[(0.0, 0.25, 0.5, 0.5), None])
    assert boxes_seen == [[0.0, 32.0, 48.0, 96.0],      # drawn: x 0-0.5 of 96 px, y 0.25-0.75 of 128 px
                          [56.0, 32.0, 88.0, 96.0]]     # not drawn: the box around its attention mask
    assert masks.shape == (2, 128, 96) and (masks.sum(0) <= 1).all()
