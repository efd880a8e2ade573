// Multi-Concept region canvas, part 4: mounting into the panel and talking to the page.
// The editor lives in window.MultiConcept.editor; when gradio re-renders the panel, the same
// editor (with what was drawn) is put back into the new slot.
(function () {
    "use strict";
    const MC = (window.MultiConcept = window.MultiConcept || {});
    const SLOT_ID = "multi_concept_canvas_slot";
    const DATA_ID = "multi_concept_canvas_data";   // the hidden textbox Python reads
    const JOB_ID = "multi_concept_job";            // the job JSON (the script's argument)
    const TABS_ID = "multi_concept_tabs";          // one tab per concept, "Concept 1", "Concept 2", ...

    function root() {
        const app = document.querySelector("gradio-app");
        return (app && app.shadowRoot) || document;
    }

    function numberOf(id) {
        const input = root().querySelector(`#${id} input[type=number]`) || root().querySelector(`#${id} input`);
        return input ? Number(input.value) : NaN;
    }

    MC.readImageSize = function () {
        const width = numberOf("txt2img_width"), height = numberOf("txt2img_height");
        return width > 0 && height > 0 ? [width, height] : null;
    };

    MC.sendToPython = function (text) {
        const box = root().querySelector(`#${DATA_ID} textarea`);
        if (!box) return;
        box.value = text;
        box.dispatchEvent(new Event("input", {bubbles: true}));
    };

    function selectedOutputElement() {
        const gallery = root().querySelector("#txt2img_gallery");
        return gallery ? gallery.querySelector(".preview img, button.selected img, img") : null;
    }

    MC.selectedOutputImage = function () {
        const image = selectedOutputElement();
        return image ? image.src : null;
    };

    // The selected output's pixels as a PNG data URL ("" when none is shown yet), for Python to
    // take as the reference picture: the page already holds it, so nothing is fetched again.
    MC.selectedOutputPicture = function () {
        const image = selectedOutputElement();
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

    // Called by gradio (js= / _js=) with the job JSON whenever the job changes.
    MC.fromJob = function (job) {
        MC.mount();
        if (MC.editor) MC.editor.fromJob(job);
        if (MC.editor) MC.showConceptCount(MC.editor.concepts.length);
        return [];
    };

    MC.mount = function () {
        const slot = root().querySelector(`#${SLOT_ID}`);
        if (!slot) return false;
        if (!MC.editor) MC.editor = new MC.Editor();
        if (!MC.editor.concepts.length) {   // first mount: draw what the job already holds
            const job = root().querySelector(`#${JOB_ID} textarea`);
            if (job && job.value) MC.editor.fromJob(job.value);
        }
        MC.showConceptCount(MC.editor.concepts.length);
        if (MC.editor.root.parentNode !== slot) {
            slot.replaceChildren(MC.editor.root);
            MC.editor.syncImageSize();
            MC.editor.requestRender();
        }
        return true;
    };

    // The concept drawn on the canvas and the concept tab shown go together, whichever is picked.
    function conceptTabs() {
        const tabs = root().querySelector(`#${TABS_ID}`);
        return tabs ? Array.from(tabs.querySelectorAll(".tab-nav button")) : [];
    }
    const tabNumber = (button) => Number((button.textContent.match(/\d+/) || [0])[0]);

    MC.showConceptTab = function (index) {
        const button = conceptTabs().find((b) => tabNumber(b) === index + 1);
        if (button && !button.classList.contains("selected")) button.click();
    };

    // Gradio 3 keeps the tab buttons of hidden tabs: style.css hides those past the concept count.
    MC.showConceptCount = function (count) {
        const tabs = root().querySelector(`#${TABS_ID}`);
        if (!tabs || !(count > 0) || tabs.dataset.mcCount === String(count)) return;
        tabs.dataset.mcCount = String(count);
        const buttons = conceptTabs();
        const selected = buttons.find((b) => b.classList.contains("selected"));
        if (selected && tabNumber(selected) > count) {
            const last = buttons.find((b) => tabNumber(b) === count);
            if (last) last.click();
        }
    };

    function watchConceptTabs() {
        document.addEventListener("click", (event) => {
            const button = event.target && event.target.closest && event.target.closest(`#${TABS_ID} .tab-nav button`);
            if (button && MC.editor && tabNumber(button) > 0) MC.editor.setActive(tabNumber(button) - 1, false);
        }, true);
    }

    function watchImageSize() {   // width/height sliders and number boxes, by their events
        const handler = (event) => {
            const target = event.target;
            if (target && target.closest && target.closest("#txt2img_width, #txt2img_height") && MC.editor) {
                MC.editor.syncImageSize();
            }
        };
        document.addEventListener("input", handler, true);
        document.addEventListener("change", handler, true);
    }

    function start() {
        watchImageSize();
        watchConceptTabs();
        // Mount now if the panel is there, and again whenever the page re-renders it. The observer
        // only checks one id per batch of DOM changes: no polling, no busy loop.
        let queued = false;
        const observer = new MutationObserver(() => {
            if (queued) return;
            queued = true;
            requestAnimationFrame(() => {
                queued = false;
                const slot = root().querySelector(`#${SLOT_ID}`);
                if (slot && (!MC.editor || MC.editor.root.parentNode !== slot)) MC.mount();
            });
        });
        observer.observe(document.body, {childList: true, subtree: true});
        MC.mount();
    }

    if (!MC.started) {
        MC.started = true;
        if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
        else start();
    }
})();
