// Multi-Concept region canvas, part 4: mounting into the panel and talking to the page.
// The panel exists once per tab (txt2img, img2img), its element ids starting with the tab's
// prefix; each has its own editor in window.MultiConcept.editors[prefix] (MC.editor is
// txt2img's). When gradio re-renders a panel, the same editor (with what was drawn) is put back
// into the new slot.
(function () {
    "use strict";
    const MC = (window.MultiConcept = window.MultiConcept || {});
    const TXT2IMG = "multi_concept";
    // element-id prefix -> the WebUI tab whose width, height and gallery the panel follows
    const PANELS = {multi_concept: "txt2img", img2img_multi_concept: "img2img"};
    // in each panel: `${prefix}_canvas_slot` (the canvas mounts here), `${prefix}_canvas_data` (the
    // hidden textbox Python reads), `${prefix}_job` (the job JSON, the script's argument),
    // `${prefix}_tabs` (one tab per concept, "Concept 1", "Concept 2", ...)
    MC.editors = MC.editors || {};
    if (!Object.getOwnPropertyDescriptor(MC, "editor")) {
        Object.defineProperty(MC, "editor", {get: () => MC.editors[TXT2IMG], configurable: true});
    }
    const tabOf = (prefix) => PANELS[prefix] || "txt2img";

    function root() {
        const app = document.querySelector("gradio-app");
        return (app && app.shadowRoot) || document;
    }

    function numberOf(id) {
        const input = root().querySelector(`#${id} input[type=number]`) || root().querySelector(`#${id} input`);
        return input ? Number(input.value) : NaN;
    }

    MC.readImageSize = function (prefix = TXT2IMG) {
        const tab = tabOf(prefix);
        const width = numberOf(`${tab}_width`), height = numberOf(`${tab}_height`);
        return width > 0 && height > 0 ? [width, height] : null;
    };

    MC.sendToPython = function (text, prefix = TXT2IMG) {
        const box = root().querySelector(`#${prefix}_canvas_data textarea`);
        if (!box) return;
        box.value = text;
        box.dispatchEvent(new Event("input", {bubbles: true}));
    };

    function selectedOutputElement(prefix) {
        const gallery = root().querySelector(`#${tabOf(prefix)}_gallery`);
        return gallery ? gallery.querySelector(".preview img, button.selected img, img") : null;
    }

    MC.selectedOutputImage = function (prefix = TXT2IMG) {
        const image = selectedOutputElement(prefix);
        return image ? image.src : null;
    };

    // The selected output's pixels as a PNG data URL ("" when none is shown yet), for Python to
    // take as the reference picture: the page already holds it, so nothing is fetched again.
    MC.selectedOutputPicture = function (prefix = TXT2IMG) {
        const image = selectedOutputElement(prefix);
        if (!image || !image.complete || !image.naturalWidth) return "";
        const canvas = document.createElement("canvas");
        canvas.width = image.naturalWidth;
        canvas.height = image.naturalHeight;
        canvas.getContext("2d").drawImage(image, 0, 0);
        try {
            return canvas.toDataURL("image/png");
        } catch (error) {   // an image from another origin cannot be read
            return "";
        }
    };

    // Called by gradio (js= / _js=) with the job JSON whenever a panel's job changes.
    MC.fromJob = function (job, prefix = TXT2IMG) {
        MC.mount(prefix);
        const editor = MC.editors[prefix];
        if (editor) editor.fromJob(job);
        if (editor) MC.showConceptCount(editor.concepts.length, prefix);
        return [];
    };

    MC.mount = function (prefix = TXT2IMG) {
        const slot = root().querySelector(`#${prefix}_canvas_slot`);
        if (!slot) return false;
        if (!MC.editors[prefix]) MC.editors[prefix] = new MC.Editor(prefix);
        const editor = MC.editors[prefix];
        if (!editor.concepts.length) {   // first mount: draw what the job already holds
            const job = root().querySelector(`#${prefix}_job textarea`);
            if (job && job.value) editor.fromJob(job.value);
        }
        MC.showConceptCount(editor.concepts.length, prefix);
        if (editor.root.parentNode !== slot) {
            slot.replaceChildren(editor.root);
            editor.syncImageSize();
            editor.requestRender();
        }
        return true;
    };

    // The concept drawn on the canvas and the concept tab shown go together, whichever is picked.
    function conceptTabs(prefix) {
        const tabs = root().querySelector(`#${prefix}_tabs`);
        return tabs ? Array.from(tabs.querySelectorAll(".tab-nav button")) : [];
    }
    const tabNumber = (button) => Number((button.textContent.match(/\d+/) || [0])[0]);

    MC.showConceptTab = function (index, prefix = TXT2IMG) {
        const button = conceptTabs(prefix).find((b) => tabNumber(b) === index + 1);
        if (button && !button.classList.contains("selected")) button.click();
    };

    // Gradio 3 keeps the tab buttons of hidden tabs: style.css hides those past the concept count.
    MC.showConceptCount = function (count, prefix = TXT2IMG) {
        const tabs = root().querySelector(`#${prefix}_tabs`);
        if (!tabs || !(count > 0) || tabs.dataset.mcCount === String(count)) return;
        tabs.dataset.mcCount = String(count);
        const buttons = conceptTabs(prefix);
        const selected = buttons.find((b) => b.classList.contains("selected"));
        if (selected && tabNumber(selected) > count) {
            const last = buttons.find((b) => tabNumber(b) === count);
            if (last) last.click();
        }
    };

    function watchConceptTabs() {
        document.addEventListener("click", (event) => {
            const target = event.target;
            if (!target || !target.closest) return;
            for (const prefix of Object.keys(PANELS)) {
                const button = target.closest(`#${prefix}_tabs .tab-nav button`);
                const editor = MC.editors[prefix];
                if (button && editor && tabNumber(button) > 0) editor.setActive(tabNumber(button) - 1, false);
            }
        }, true);
    }

    function watchImageSize() {   // width/height sliders and number boxes, by their events
        const handler = (event) => {
            const target = event.target;
            if (!target || !target.closest) return;
            for (const [prefix, tab] of Object.entries(PANELS)) {
                if (MC.editors[prefix] && target.closest(`#${tab}_width, #${tab}_height`)) {
                    MC.editors[prefix].syncImageSize();
                }
            }
        };
        document.addEventListener("input", handler, true);
        document.addEventListener("change", handler, true);
    }

    function start() {
        watchImageSize();
        watchConceptTabs();
        // Mount now if a panel is there, and again whenever the page re-renders it. The observer
        // only checks one id per panel per batch of DOM changes: no polling, no busy loop.
        let queued = false;
        const observer = new MutationObserver(() => {
            if (queued) return;
            queued = true;
            requestAnimationFrame(() => {
                queued = false;
                for (const prefix of Object.keys(PANELS)) {
                    const slot = root().querySelector(`#${prefix}_canvas_slot`);
                    const editor = MC.editors[prefix];
                    if (slot && (!editor || editor.root.parentNode !== slot)) MC.mount(prefix);
                }
            });
        });
        observer.observe(document.body, {childList: true, subtree: true});
        for (const prefix of Object.keys(PANELS)) MC.mount(prefix);
    }

    if (!MC.started) {
        MC.started = true;
        if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
        else start();
    }
})();
