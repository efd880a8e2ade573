"""Face concepts in a real browser: photos uploaded into a concept's face slots and its two
sliders reach the job Python receives; a pasted job's face photos show in their concept's tab
(its face box opens) and go out again with the next generation."""

from __future__ import annotations

import json

from PIL import Image

from lib_mc.job import parse_job
from lib_mc.regions import decode_png
from panel_page import PANEL, add_face_photos, generate, wait_for_job
from test_canvas import png_b64


def test_face_photos_and_their_sliders_reach_python(page, panel_app, tmp_path):
    job = add_face_photos(page, tmp_path, 1)
    assert "faces" not in job["concepts"][0]
    received = parse_job(json.dumps(generate(page, panel_app)))
    face = received.concepts[1]
    assert [decode_png(png, "f").convert("RGB").getpixel((40, 50)) for png in face.faces] == \
        [(200, 40, 40), (40, 40, 200)]   # slots 1 and 3, in order
    assert (face.face_weight, face.face_control) == (1.25, 0.0) and received.concepts[0].faces == []


def test_a_pasted_jobs_face_photos_show_in_its_tab_and_go_out_again(page, panel_app):
    photo = Image.new("RGB", (144, 192), (30, 160, 90))
    job = {"version": 1, "enabled": True, "mode": "conductor", "concepts": [
        {"name": "alice", "region": {"type": "auto"}, "class_word": "woman",
         "faces": [{"png": png_b64(photo), "sha": "0123abcd"}], "face_control": 0.4},
        {"name": "bob", "region": {"type": "rect", "x": 0.5, "w": 0.5}}]}
    page.fill("#load_text textarea", json.dumps(job))
    page.click("#load_button")
    wait_for_job(page, "job.concepts[0].faces && job.concepts[0].faces.length === 1 "
                       "&& job.concepts[0].face_control === 0.4 && job.concepts[0].face_weight === 0.8")
    shown = page.locator(f"{PANEL}_face_1_0 img").first
    shown.wait_for(state="visible", timeout=20000)   # concept 1's tab, its face box opened by the paste
    assert not page.locator(f"{PANEL}_face_2_0 img").first.is_visible()
    assert page.locator(f"{PANEL}_face_control_0 input[type=number]").input_value() == "0.4"
    received = parse_job(json.dumps(generate(page, panel_app))).concepts
    assert len(received[0].faces) == 1 and received[1].faces == []
    assert decode_png(received[0].faces[0], "f").convert("RGB").getpixel((70, 90)) == (30, 160, 90)
    assert (received[0].face_weight, received[0].face_control) == (0.8, 0.4)
