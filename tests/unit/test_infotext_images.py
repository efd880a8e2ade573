"""Image concepts and the kept background in the infotext: the PnP-MIX options (defaults and
the modes that do not read them left out), the pictures as small copies with the originals'
hashes, and a paste that restores a job that runs."""

import base64
import io
import json

from PIL import Image

from lib_mc.infotext import infotext_to_job, job_to_infotext
from lib_mc.job import parse_job
from lib_mc.regions import decode_png
from lib_mc.ui.panel_state import compose, decompose

RECT = {"type": "rect", "x": 0, "y": 0, "w": 0.5, "h": 1}


def picture(size, left=(230, 220, 10), right=(20, 40, 200), mode="RGB") -> str:
    """A picture whose left half is `left`, the right `right`."""
    image = Image.new(mode, size, right)
    image.paste(left, (0, 0, size[0] // 2, size[1]))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def image_job(mode="blend", **top):
    return parse_job({"mode": mode, "background": {"png": picture((640, 480))}, "appearance_alpha": 0.3,
                      "dilution_beta": 0.5, "dilution_expand": 0.2, "keep_background": False, **top,
                      "concepts": [{"name": "dog", "region": RECT, "reference": {"png": picture((800, 600))},
                                    "reference_mask": {"png": picture((800, 600), 255, 0, "L")}},
                                   {"name": "man", "region": {"type": "rect", "x": 0.5, "w": 0.5}}]})


def test_the_options_and_small_pictures_are_written_and_paste_back():
    job = image_job()
    text = job_to_infotext(job)
    data = json.loads(text)
    assert (data["appearance_alpha"], data["dilution_beta"], data["dilution_expand"], data["keep_background"]) == \
        (0.3, 0.5, 0.2, False)
    background, reference, mask = data["background"], data["concepts"][0]["reference"], \
        data["concepts"][0]["reference_mask"]
    assert decode_png(background["png"], "b").size == (96, 72) and len(background["sha"]) == 12
    small = decode_png(reference["png"], "r").convert("RGB")
    assert small.size == (128, 96) and len(reference["png"]) < 8000 and len(reference["sha"]) == 12
    assert small.getpixel((10, 48))[2] < 100 and small.getpixel((118, 48))[2] > 150   # its look kept
    assert decode_png(mask["png"], "m").size == (128, 96) and len(mask["sha"]) == 12
    assert "reference" not in data["concepts"][1] and len(text) < 12000
    for pasted in (infotext_to_job(text), parse_job(compose(*decompose(text)))):
        assert (pasted.appearance_alpha, pasted.dilution_beta, pasted.dilution_expand, pasted.keep_background) == \
            (0.3, 0.5, 0.2, False)
        assert pasted.concepts[1].reference == ""
        for got, sent in ((pasted.background, background), (pasted.concepts[0].reference, reference),
                          (pasted.concepts[0].reference_mask, mask)):   # the panel holds them as pictures
            assert decode_png(got, "got").size == decode_png(sent["png"], "sent").size


def test_defaults_and_other_modes_leave_them_out():
    plain = json.loads(job_to_infotext(parse_job({"concepts": [{"name": "bob"}]})))
    assert not {"background", "keep_background", "appearance_alpha", "dilution_beta", "dilution_expand"} & set(plain)
    assert "reference" not in plain["concepts"][0] and "reference_mask" not in plain["concepts"][0]
    conductor = json.loads(job_to_infotext(image_job("conductor")))
    assert conductor["appearance_alpha"] == 0.3 and "png" in conductor["background"]
    regional = parse_job({"mode": "regional", "appearance_alpha": 0.3, "keep_background": False,
                          "concepts": [{"name": "bob"}]})
    assert not {"appearance_alpha", "keep_background"} & set(json.loads(job_to_infotext(regional)))
