"""Job -> Plan for image concepts and a kept background: each picture encoded by the host
(`encode_picture`) once per job and size, the reference mask at the generation's size as the
reference is cropped, the background's latent on the plan, the PnP-MIX options in the plan,
and a host without a picture encoder named."""

import base64
import io

import pytest
import torch
from PIL import Image

from lib_mc.job import JobError
from lib_mc.prepare import prepare
from test_job_images import png
from test_prepare import Services, job, run
from tinyhost import make_unet

RECT = {"type": "rect", "x": 0, "y": 0, "w": 0.5, "h": 1}


class PictureServices(Services):
    """Services with the host's VAE encoder: a latent that tells the picture and size apart."""

    def __init__(self):
        super().__init__({})
        self.pictures = []

    def encode_picture(self, picture, image_hw):
        self.pictures.append((picture, image_hw))
        seed = int.from_bytes(picture.encode()[-8:], "little") % 2 ** 31
        return torch.randn(1, 4, image_hw[0] // 8, image_hw[1] // 8, generator=torch.Generator().manual_seed(seed))


def left_white(size=(32, 16), white=20) -> str:
    """A mask picture (w, h) whose `white` left columns are white."""
    image = Image.new("L", size, 0)
    image.paste(255, (0, 0, white, size[1]))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


@pytest.fixture(scope="module")
def unet():
    return make_unet()


@pytest.mark.parametrize("mode", ["blend", "conductor"])
def test_a_reference_its_mask_and_the_background_reach_the_plan(unet, mode):
    services = PictureServices()
    dog, room = png(colour=(90, 60, 20)), png((40, 30), colour=(10, 120, 200))
    prepared, _ = run(unet, services, job({"name": "dog", "region": RECT, "reference": {"png": dog},
                                           "reference_mask": {"png": left_white()}},
                                          {"name": "plain", "region": {"type": "rect", "x": 0.5, "w": 0.5}},
                                          mode=mode, background={"png": room}))
    plan = prepared.plan
    assert services.pictures == [(dog, (256, 256)), (room, (256, 256))]
    assert torch.equal(plan.concepts[0].reference, services.encode_picture(dog, (256, 256)))
    assert plan.concepts[1].reference is None and plan.concepts[1].reference_mask is None
    assert torch.equal(plan.background, services.encode_picture(room, (256, 256)))
    mask = plan.concepts[0].reference_mask
    # 32x16 scaled to cover 256x256 (512x256), centre-cropped: its white columns 0..20 land on 0..192
    # (stretched, they would end at 160)
    assert mask.shape == (256, 256) and mask.dtype == torch.float32
    assert bool((mask[:, :184] == 1).all()) and bool((mask[:, 200:] == 0).all())


def test_a_reference_without_a_mask_has_none(unet):
    prepared, _ = run(unet, PictureServices(), job({"name": "dog", "region": RECT, "reference": {"png": png()}}))
    assert prepared.plan.concepts[0].reference is not None and prepared.plan.concepts[0].reference_mask is None
    assert prepared.plan.background is None


def test_each_picture_is_encoded_once_per_job_and_size(unet):
    services, cache = PictureServices(), {}
    same = png(colour=(1, 2, 3))
    the_job = job({"name": "a", "region": RECT, "reference": {"png": same}},
                  {"name": "b", "region": RECT, "reference": {"png": same}}, background={"png": same})

    def batch(hw=(256, 256)):
        return prepare(the_job, base_prompt="a dog", base_negative="", image_hw=hw, unet=unet,
                       services=services, warn=lambda m: None, pictures_cache=cache).plan
    first, second = batch(), batch()   # two batches of one job
    assert services.pictures == [(same, (256, 256))]
    kept = first.concepts[0].reference   # one tensor's storage for all three, both batches
    assert all(t.data_ptr() == kept.data_ptr() for t in (first.concepts[1].reference, second.background))
    batch((128, 192))   # another generation size: encoded for it
    assert services.pictures == [(same, (256, 256)), (same, (128, 192))]


def test_the_pnp_mix_options_reach_the_plan(unet):
    prepared, _ = run(unet, PictureServices(), job({"name": "dog", "region": RECT, "reference": {"png": png()}},
                                                   mode="conductor", appearance_alpha=0.4, dilution_beta=0.6,
                                                   dilution_expand=0.25, keep_background=False))
    o = prepared.plan.options
    assert (o.appearance_alpha, o.dilution_beta, o.dilution_expand, o.keep_background) == (0.4, 0.6, 0.25, False)
    defaults, _ = run(unet, PictureServices(), job({"name": "dog", "region": RECT}))
    d = defaults.plan.options
    assert (d.appearance_alpha, d.dilution_beta, d.dilution_expand, d.keep_background) == (0.15, 0.8, 0.1, True)


def test_a_host_without_a_picture_encoder_is_named(unet):
    with pytest.raises(JobError, match=r"^concepts\[0\]\.reference: image concepts and a kept background are not "
                                       r"available on this host"):
        run(unet, Services({}), job({"name": "dog", "region": RECT, "reference": {"png": png()}}))
    with pytest.raises(JobError, match=r"^background: image concepts and a kept background are not available"):
        run(unet, Services({}), job({"name": "dog", "region": RECT}, background={"png": png()}))
    run(unet, Services({}), job({"name": "dog", "region": RECT}))   # no picture: nothing to encode


@pytest.mark.parametrize("mask, problem", [
    (png(colour=(0, 0, 0)), "is empty: paint the subject white"),
    (base64.b64encode(Image.new("RGB", (4, 4)).tobytes()).decode(), "is not a picture"),
])
def test_a_bad_reference_mask_is_named(unet, mask, problem):
    with pytest.raises(JobError, match=rf"^concepts\[0\]\.reference_mask(\.png)?: {problem}"):
        run(unet, PictureServices(), job({"name": "dog", "region": RECT, "reference": {"png": png()},
                                          "reference_mask": {"png": mask}}))


def test_a_reference_without_a_mask_finds_its_subject_by_its_class_word(unet):
    """The engine finds the subject in the reference by the class word's attention in the
    concept's own prompt: its positions reach the plan; without a class word in that prompt a
    warning names the concept (the whole picture is the subject)."""
    prepared, _ = run(unet, PictureServices(), job({"name": "dog", "region": RECT, "reference": {"png": png()},
                                                    "prompt": "a photo of a dog", "class_word": "dog"}))
    assert prepared.plan.concepts[0].own_class_tokens == [5]
    assert not prepared.warnings
    masked, _ = run(unet, PictureServices(), job({"name": "dog", "region": RECT, "reference": {"png": png()},
                                                  "reference_mask": {"png": left_white()},
                                                  "prompt": "a photo of a dog", "class_word": "dog"}))
    assert masked.plan.concepts[0].own_class_tokens is None   # the mask says where the subject is
    unnamed, _ = run(unet, PictureServices(), job({"name": "cat", "region": RECT, "reference": {"png": png()},
                                                   "prompt": "a photo of a cat"}))
    assert unnamed.plan.concepts[0].own_class_tokens is None
    assert any("image concept 'cat'" in w and "whole reference picture" in w for w in unnamed.warnings)
