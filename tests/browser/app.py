"""A gradio app that mounts the real Multi-Concept panel the way the WebUI does, for browser tests.

It builds txt2img's width/height controls (same element ids as A1111/Forge) and a button that
sets them from Python (as Forge's UI presets do), an output gallery (`txt2img_gallery`), the panel from
`build_panel` (and, last, the panel built again for img2img with img2img's size controls), a Generate button whose handler records the job JSON that Python receives, and
a Load button that pastes a job into the panel's paste box as infotext does. The extension's
javascript/*.js go into <head> and style.css into <body>, as `file=` URLs, exactly like the
WebUI's template patch (modules/ui_gradio_extensions.py).

Usage: python tests/browser/app.py PORT RECORD_FILE
"""

from __future__ import annotations

import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import gradio as gr            # noqa: E402
from PIL import Image          # noqa: E402
import gradio.routes           # noqa: E402

from lib_mc.ui.panel import build_panel   # noqa: E402


def webpath(path: pathlib.Path) -> str:
    return f"file={path.as_posix()}?{os.path.getmtime(path)}"


def inject_extension_files() -> None:
    scripts = "".join(f'<script type="text/javascript" src="{webpath(p)}"></script>\n'
                      for p in sorted((ROOT / "javascript").glob("*.js")))
    css = f'<link rel="stylesheet" property="stylesheet" href="{webpath(ROOT / "style.css")}">'
    original = gradio.routes.templates.TemplateResponse

    def template_response(*args, **kwargs):
        response = original(*args, **kwargs)
        response.body = response.body.replace(b"</head>", f"{scripts}</head>".encode())
        response.body = response.body.replace(b"</body>", f"{css}</body>".encode())
        response.init_headers()
        return response
    gradio.routes.templates.TemplateResponse = template_response


def build(record: pathlib.Path) -> gr.Blocks:
    with gr.Blocks(analytics_enabled=False) as demo:
        with gr.Row():
            width = gr.Slider(64, 2048, 512, step=8, label="Width", elem_id="txt2img_width", interactive=True)
            height = gr.Slider(64, 2048, 512, step=8, label="Height", elem_id="txt2img_height", interactive=True)
        # sets the size from Python, as Forge's UI presets do: no input events in the page
        preset = gr.Button("Size preset", elem_id="size_preset")
        preset.click(lambda: (512, 640), outputs=[width, height])
        panel = build_panel(lambda: ["alice_v1", "bob_v1"])
        generate = gr.Button("Generate", elem_id="txt2img_generate")
        received = gr.Textbox(label="received", elem_id="received")
        load_text = gr.Textbox(label="load", elem_id="load_text")
        load = gr.Button("Load", elem_id="load_button")
        # an output shown in txt2img's gallery (same element id): the panel can take it as reference;
        # last, so that it moves nothing the other tests scroll to
        output = Image.new("RGB", (96, 64), (0, 200, 0))
        output.paste((200, 0, 200), (48, 0, 96, 64))   # green left, purple right
        gr.Gallery([output], elem_id="txt2img_gallery", label="Output")
        # the panel built again for the img2img tab, as the WebUI builds every script's ui() per tab:
        # its own ids and its tab's size controls (768x512 here, txt2img's stay 512x512); below
        # everything else, so it moves nothing the txt2img tests look at
        with gr.Row():
            gr.Slider(64, 2048, 768, step=8, label="Width", elem_id="img2img_width", interactive=True)
            gr.Slider(64, 2048, 512, step=8, label="Height", elem_id="img2img_height", interactive=True)
        img2img_panel = build_panel(lambda: ["alice_v1", "bob_v1"], is_img2img=True)
        img2img_generate = gr.Button("Generate img2img", elem_id="img2img_generate")

        def run(job: str) -> str:
            record.write_text(job)
            return str(len(job))
        generate.click(run, inputs=[panel.job], outputs=[received])
        img2img_generate.click(run, inputs=[img2img_panel.job], outputs=[received])
        load.click(lambda text: text, inputs=[load_text], outputs=[panel.paste_box])
    return demo


def main() -> None:
    port, record = int(sys.argv[1]), pathlib.Path(sys.argv[2])
    inject_extension_files()
    demo = build(record)
    demo.queue()
    print("gradio", gr.__version__, flush=True)
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=False,
                allowed_paths=[str(ROOT)], show_api=False, quiet=True)


if __name__ == "__main__":
    main()
