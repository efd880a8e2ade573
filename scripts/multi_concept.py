"""Multi-Concept: the WebUI's AlwaysOn script. Thin glue: everything lives in lib_mc."""

import modules.scripts as scripts

from lib_mc.hosts import detect
from lib_mc.infotext import KEY as INFOTEXT_KEY

HOST = detect()
if HOST == "forge":
    from lib_mc.hosts import forge as adapter
elif HOST == "a1111":
    from lib_mc.hosts import a1111 as adapter
else:
    adapter = None
    print(f"[Multi-Concept] host {HOST!r} is not supported; the panel is hidden")
if adapter is not None:
    from lib_mc.hosts.webui_models import register_settings
    from lib_mc.hosts.webui_xyz import register_xyz_axes
    register_xyz_axes()
    register_settings()


class MultiConceptScript(scripts.Script):
    def title(self):
        return "Multi-Concept"

    def show(self, is_img2img):
        """In txt2img and img2img (there the init image is the layout and the kept background)."""
        return scripts.AlwaysVisible if adapter is not None else False

    def ui(self, is_img2img):
        from lib_mc.ui.panel import build_panel
        panel = build_panel(adapter.lora_names, adapter.refresh_lora_names, is_img2img=is_img2img)
        self.infotext_fields = [(panel.paste_box, INFOTEXT_KEY)]
        self.paste_field_names = [INFOTEXT_KEY]
        return [panel.job]

    def process(self, p, job):
        adapter.process(p, job)

    def process_batch(self, p, job, **kwargs):
        adapter.process_batch(p, **kwargs)

    def process_before_every_sampling(self, p, job, **kwargs):
        adapter.process_before_every_sampling(p, **kwargs)

    def postprocess_image(self, p, pp, job):
        adapter.postprocess_image(p, pp)

    def postprocess(self, p, processed, job):
        adapter.postprocess(p, processed)
