"""The few gradio 3.x / 4.x differences the panel meets, in one place."""

from __future__ import annotations

import gradio as gr

GRADIO_MAJOR = int(gr.__version__.split(".")[0])


def js_kwargs(code: str) -> dict:
    """Client-side JS for an event: `_js=` in gradio 3, `js=` in gradio 4."""
    return {"_js": code} if GRADIO_MAJOR < 4 else {"js": code}


def latest_wins() -> dict:
    """Gradio 4 drops an event fired while the same one is pending (trigger_mode "once"); the
    canvas and the controls need the last edit to land, as gradio 3 does by default."""
    return {} if GRADIO_MAJOR < 4 else {"trigger_mode": "always_last"}


def not_in_api() -> dict:
    """The panel's events are the page's own, not API endpoints (the WebUI's API takes the job
    as a script argument). Left out of gradio's API info, which gradio 4 builds when it first
    serves the page, matching every input of every event against every component: with the
    panel's events each taking all its controls, that took seconds, past the 3 s gradio's
    launch waits for its own page on a busy machine."""
    return {"api_name": False}


def mask_upload(label: str, **kwargs):
    """An image upload that hands Python a PIL image."""
    if GRADIO_MAJOR < 4:
        return gr.Image(label=label, source="upload", type="pil", **kwargs)
    return gr.Image(label=label, sources=["upload"], type="pil", **kwargs)


def update(**kwargs):
    return gr.update(**kwargs)


def value_when_served(component, value_of) -> None:
    """The component's value in the page is `value_of()` at the time the page's config is built,
    not the value it was created with. The WebUI writes saved UI defaults (ui-config.json) into
    the other controls after they are built; the job composed from them must show the same.
    Both gradio 3 and 4 build a component's page config by calling its `get_config()`."""
    built = component.get_config

    def get_config():
        return {**built(), "value": value_of()}
    component.get_config = get_config
