// Multi-Concept region canvas, part 3: the editor (display canvas, pointer input, sync with the job).
//
// Python -> editor: `fromJob(jobJson)` whenever the job changes (concept names, count, regions).
// Editor -> Python: after every edit, the regions go as JSON into one hidden textbox, whose input
// event lets Python set each concept's region controls and recompose the job.
(function () {
    "use strict";
    const MC = (window.MultiConcept = window.MultiConcept || {});
    const SCALE = 4;          // layer pixels = image pixels / SCALE
    const DISPLAY_MAX = 512;  // longest side of the display canvas, CSS pixels

    const ECHO_TIMEOUT_MS = 4000;   // a lost echo must not freeze the canvas against outside changes

    // Python's echo of an exported region: rects within rounding (presets are exact thirds), an
    // emptied region comes back as an empty mask.
    // An automatic region with a box ("auto in rectangle") shows and compares as its rectangle.
    const boxed = (r) => !!r && r.type === "auto" && r.w !== undefined;

    function sameRegion(a, b) {
        const empty = (r) => !r || (r.type === "auto" && !boxed(r)) || (r.type === "mask" && !r.png);
        if (empty(a) || empty(b)) return empty(a) && empty(b);
        const unset = {x: 0, y: 0, w: 1, h: 1};
        // a drawn rectangle comes back as the box of an "auto in rectangle" region: the same drawing
        const rectLike = (r) => r.type === "rect" || boxed(r);
        if (rectLike(a) && rectLike(b)) return Object.keys(unset).every((k) => Math.abs((a[k] ?? unset[k]) - (b[k] ?? unset[k])) < 1e-3);
        return a.type === b.type && a.png === b.png;
    }

    class Editor {
        constructor(prefix = "multi_concept") {
            this.prefix = prefix;      // the panel's element-id prefix: which tab's panel this is
            this.imageWidth = 512;
            this.imageHeight = 512;
            this.concepts = [];        // [{name, layer, shown, source, sourceVersion}]
            this.awaiting = null;      // {regions, edited, until}: an export whose echo from Python is due
            this.unconfirmed = new Set();   // concepts edited here whose region Python has not echoed yet
            this.order = [];           // concept indices, back to front
            this.active = 0;
            this.tool = "rect";
            this.brushSize = 48;       // image pixels
            this.history = new MC.History(30);
            this.background = null;
            this.drag = null;
            this.dirty = true;
            this.tinted = new WeakMap();   // layer -> {version, colour, canvas}: dies with its layer

            this.canvas = MC.element("canvas", {class: "mc-canvas", tabindex: "0",
                title: "Draw the selected concept's region. R rectangle (Shift adds), B brush, E eraser, F fill, " +
                    "[ ] brush size, 1-8 concept, Ctrl+Z / Ctrl+Y undo/redo"});
            this.toolbar = new MC.Toolbar(this);
            this.legend = new MC.Legend(this);
            this.root = MC.element("div", {class: "mc-editor"}, [
                this.toolbar.root,
                MC.element("div", {class: "mc-stage"}, [this.canvas, this.legend.root]),
            ]);
            this.bindPointer();
            this.bindKeys();
            this.watchVisibility();
            this.resizeDisplay();
        }

        // Width and height set by the page without input events (Forge's UI presets, a pasted
        // infotext) are read when the canvas comes into view, before anyone draws on it.
        watchVisibility() {
            if (!window.IntersectionObserver) return;
            new IntersectionObserver((entries) => {
                if (entries.some((entry) => entry.isIntersecting)) this.syncImageSize();
            }).observe(this.canvas);
        }

        // ---- layout -------------------------------------------------------------------------

        layerSize() {
            return [Math.max(8, Math.round(this.imageWidth / SCALE)), Math.max(8, Math.round(this.imageHeight / SCALE))];
        }

        setImageSize(width, height) {
            if (!(width > 0 && height > 0) || (width === this.imageWidth && height === this.imageHeight)) return;
            this.imageWidth = width;
            this.imageHeight = height;
            const [w, h] = this.layerSize();
            for (const concept of this.concepts) {
                const untouched = concept.layer.version === concept.sourceVersion;
                concept.layer.resize(w, h);
                if (untouched) concept.sourceVersion = concept.layer.version;
            }
            this.resizeDisplay();
        }

        resizeDisplay() {
            const aspect = this.imageWidth / this.imageHeight;
            const width = aspect >= 1 ? DISPLAY_MAX : Math.round(DISPLAY_MAX * aspect);
            const height = aspect >= 1 ? Math.round(DISPLAY_MAX / aspect) : DISPLAY_MAX;
            this.canvas.width = width;
            this.canvas.height = height;
            this.canvas.style.width = `${width}px`;
            this.canvas.style.aspectRatio = `${this.imageWidth} / ${this.imageHeight}`;
            this.canvas.dataset.imageSize = `${this.imageWidth}x${this.imageHeight}`;
            this.requestRender();
        }

        frontToBack() { return this.order.slice().reverse(); }

        // ---- Python -> editor ---------------------------------------------------------------

        fromJob(text) {
            let job;
            try {
                job = typeof text === "string" ? JSON.parse(text) : text;
            } catch (error) {
                return;
            }
            if (!job || !Array.isArray(job.concepts)) return;
            // conductor's reference, else the kept background: the regions are drawn over it
            this.showReference(job.reference || (job.background && job.background.png) || "");
            const [w, h] = this.layerSize();
            const count = job.concepts.length;
            while (this.concepts.length < count) {
                this.concepts.push({name: "", layer: new MC.MaskLayer(w, h), shown: undefined});
            }
            this.concepts.length = count;
            // Jobs that Python composed before it saw our latest export are stale: their regions
            // would undo what was just drawn. The echo of that export ends the wait.
            const regionsOf = (j) => j.concepts.map((spec) => spec.region || null);
            let stale = false;
            if (this.awaiting) {
                const {regions, edited} = this.awaiting;   // only what was edited comes back as sent
                const echo = regions.length === count &&
                    regionsOf(job).every((region, i) => !edited.includes(i) || sameRegion(region, regions[i]));
                if (echo) this.unconfirmed.clear();
                if (echo || performance.now() > this.awaiting.until) this.awaiting = null;
                else stale = true;
            }
            const pending = [];
            job.concepts.forEach((spec, index) => {
                const concept = this.concepts[index];
                concept.name = spec.name || `concept ${index + 1}`;
                if (stale && concept.shown !== undefined) return;
                if (concept.shown !== undefined && sameRegion(spec.region || null, concept.shown)) return;
                concept.shown = spec.region || null;
                this.unconfirmed.delete(index);   // the job's region replaces what was drawn here
                const region = spec.region || {};
                // Until it is edited, the editor hands back the job's own region (an uploaded
                // mask stays byte-identical instead of being re-encoded at canvas size).
                concept.source = region.type === "rect" || region.type === "mask" || boxed(region) ? region : null;
                const token = concept.loadToken = {};   // only the newest load may land
                const loaded = () => { concept.sourceVersion = concept.layer.version; };
                if (region.type === "rect" || boxed(region)) {
                    concept.layer.setFractionRect(region.x ?? 0, region.y ?? 0, region.w ?? 1, region.h ?? 1);
                    loaded();
                } else if (region.type === "mask" && region.png) {
                    pending.push(concept.layer.fromPng(region.png, () => concept.loadToken === token)
                        .then((done) => { if (done) loaded(); }));
                } else {
                    concept.layer.clear();   // auto without a box: found after the layout pass
                    loaded();
                }
            });
            const z = job.concepts.map((spec, index) => [typeof spec.z === "number" ? spec.z : index, index]);
            this.order = z.sort((a, b) => a[0] - b[0] || a[1] - b[1]).map((pair) => pair[1]);
            this.active = Math.min(this.active, Math.max(0, count - 1));
            this.syncImageSize();
            this.legend.update();
            this.toolbar.update();
            this.requestRender();
            return Promise.all(pending).then(() => this.requestRender());
        }

        syncImageSize() {
            const size = MC.readImageSize && MC.readImageSize(this.prefix);
            if (size) this.setImageSize(size[0], size[1]);
        }

        // ---- editor -> Python ---------------------------------------------------------------

        // `edited`: the concepts this edit changed (all when not given). Python sets only the
        // region controls of these and of earlier edits not echoed yet (gradio 4 drops all but
        // the last of events that pile up), so a concept whose control was just changed
        // elsewhere (a job still on its way here) is never set back from what the canvas shows.
        exportRegions(edited) {
            const regions = this.concepts.map((concept) => {
                const untouched = concept.source !== undefined && concept.layer.version === concept.sourceVersion;
                const region = untouched ? concept.source : concept.layer.toRegion();
                concept.shown = region;
                return region;
            });
            for (const index of edited || regions.keys()) this.unconfirmed.add(index);
            edited = [...this.unconfirmed].filter((index) => index < regions.length).sort((a, b) => a - b);
            this.awaiting = {regions, edited, until: performance.now() + ECHO_TIMEOUT_MS};
            const z = new Array(this.concepts.length).fill(0);
            this.order.forEach((index, position) => { z[index] = position; });
            const payload = JSON.stringify({regions, z, edited});
            this.lastExport = payload;
            if (MC.sendToPython) MC.sendToPython(payload, this.prefix);
        }

        // ---- edits --------------------------------------------------------------------------

        state() {
            return {layers: this.concepts.map((c) => c.layer.snapshot()), order: this.order.slice()};
        }

        remember() {   // before every edit: a mask still loading must not land on top of it
            for (const concept of this.concepts) concept.loadToken = null;
            this.history.push(this.state());
        }

        restore(state) {
            if (!state) return;
            const [w, h] = this.layerSize();
            state.layers.forEach((image, index) => {
                const concept = this.concepts[index];
                if (!concept) return;
                concept.loadToken = null;          // a late mask load must not overwrite the undo
                concept.layer.restore(image);
                concept.layer.resize(w, h);        // the image size may have changed since
            });
            this.order = state.order.filter((index) => index < this.concepts.length);
            for (let i = 0; i < this.concepts.length; i++) if (!this.order.includes(i)) this.order.push(i);
            this.legend.update();
            this.requestRender();
            this.exportRegions();
        }

        undo() { this.restore(this.history.undo(this.state())); }
        redo() { this.restore(this.history.redo(this.state())); }

        setTool(tool) { this.tool = tool; this.toolbar.update(); }

        setBrushSize(size) { this.brushSize = Math.max(4, Math.min(256, size)); this.toolbar.update(); }

        setActive(index, showTab = true) {   // showTab false: the concept's tab was just picked
            if (index < 0 || index >= this.concepts.length) return;
            this.active = index;
            this.legend.update();
            if (showTab && MC.showConceptTab) MC.showConceptTab(index, this.prefix);
        }

        move(index, step) {   // step -1: one place forward
            const front = this.frontToBack();
            const at = front.indexOf(index), to = at + step;
            if (at < 0 || to < 0 || to >= front.length) return;
            this.remember();
            [front[at], front[to]] = [front[to], front[at]];
            this.order = front.reverse();
            this.legend.update();
            this.requestRender();
            this.exportRegions([]);   // the order only
        }

        clearActive() {
            const concept = this.concepts[this.active];
            if (!concept) return;
            this.remember();
            concept.layer.clear();
            this.requestRender();
            this.exportRegions([this.active]);
        }

        clearAll() {
            this.remember();
            for (const concept of this.concepts) concept.layer.clear();
            this.requestRender();
            this.exportRegions();
        }

        applyPreset(name) {
            const cells = MC.PRESETS[name];
            if (!cells || !this.concepts.length) return;
            this.remember();
            this.concepts.forEach((concept, index) => concept.layer.setFractionRect(...cells[index % cells.length]));
            this.requestRender();
            this.exportRegions();
        }

        // ---- background ---------------------------------------------------------------------

        setBackground(image) { this.background = image; this.requestRender(); }

        setBackgroundUrl(url) {
            const image = new Image();
            image.onload = () => this.setBackground(image);
            image.src = url;
        }

        setBackgroundFile(file) {
            const reader = new FileReader();
            reader.onload = () => this.setBackgroundUrl(reader.result);
            reader.readAsDataURL(file);
        }

        // A new reference picture in the job (conductor mode) goes under the regions, to draw
        // them over it; removing it from the job removes it here, a picture of the user's stays.
        showReference(reference) {
            if (reference === (this.reference || "")) return;
            this.reference = reference;
            if (!reference) {
                if (this.background && this.background.dataset.reference) this.setBackground(null);
                return;
            }
            const type = reference.startsWith("/9j/") ? "jpeg" : reference.startsWith("UklGR") ? "webp" : "png";
            const url = reference.startsWith("data:") ? reference : `data:image/${type};base64,${reference}`;
            const image = new Image();
            image.dataset.reference = "1";
            image.onload = () => { if (this.reference === reference) this.setBackground(image); };
            image.src = url;
        }

        useOutputAsBackground() {
            const image = MC.selectedOutputImage && MC.selectedOutputImage(this.prefix);
            if (image) this.setBackgroundUrl(image);
        }

        // ---- pointer and keys -----------------------------------------------------------------

        toLayer(event) {
            const box = this.canvas.getBoundingClientRect();
            const [w, h] = this.layerSize();
            return [(event.clientX - box.left) / box.width * w, (event.clientY - box.top) / box.height * h];
        }

        bindPointer() {
            const canvas = this.canvas;
            canvas.addEventListener("pointerenter", () => this.syncImageSize());
            canvas.addEventListener("pointerdown", (event) => {
                const concept = this.concepts[this.active];
                if (!concept || event.button > 0) return;
                event.preventDefault();
                canvas.focus({preventScroll: true});
                canvas.setPointerCapture(event.pointerId);
                this.remember();
                const point = this.toLayer(event);
                if (this.tool === "fill") {
                    concept.layer.floodFill(point[0], point[1]);
                    this.requestRender();
                    this.exportRegions([this.active]);
                    return;
                }
                this.drag = {start: point, points: [point], id: event.pointerId, add: event.shiftKey};
                if (this.tool !== "rect") this.paintStroke(concept);
            });
            canvas.addEventListener("pointermove", (event) => {
                if (!this.drag || event.pointerId !== this.drag.id) return;
                const concept = this.concepts[this.active];
                const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [event];
                for (const each of events.length ? events : [event]) this.drag.points.push(this.toLayer(each));
                if (this.tool !== "rect") this.paintStroke(concept);
                this.requestRender();
            });
            const end = (event) => {
                if (!this.drag || event.pointerId !== this.drag.id) return;
                const concept = this.concepts[this.active];
                if (this.tool === "rect") {
                    const [x0, y0] = this.drag.start, [x1, y1] = this.toLayer(event);
                    const left = Math.round(Math.min(x0, x1)), top = Math.round(Math.min(y0, y1));
                    const right = Math.round(Math.max(x0, x1)), bottom = Math.round(Math.max(y0, y1));
                    if (right > left && bottom > top) {   // a rectangle is the region; Shift adds to it
                        if (!this.drag.add) concept.layer.clear();
                        concept.layer.fillRect(left, top, right - left, bottom - top, false);
                    }
                }
                this.drag = null;
                this.requestRender();
                this.exportRegions([this.active]);
            };
            canvas.addEventListener("pointerup", end);
            canvas.addEventListener("pointercancel", end);
        }

        paintStroke(concept) {   // draws the segment since the last call
            const points = this.drag.points;
            const from = Math.max(0, (this.drag.painted || 0) - 1);
            concept.layer.stroke(points.slice(from), this.brushSize / SCALE, this.tool === "eraser");
            this.drag.painted = points.length;
            this.requestRender();
        }

        bindKeys() {   // only while the canvas has focus: typing in a prompt never reaches here
            this.canvas.addEventListener("keydown", (event) => {
                const key = event.key.toLowerCase();
                const mod = event.ctrlKey || event.metaKey;
                let handled = true;
                if (mod && key === "z" && !event.shiftKey) this.undo();
                else if (mod && (key === "y" || (key === "z" && event.shiftKey))) this.redo();
                else if (mod) handled = false;
                else if (key === "r") this.setTool("rect");
                else if (key === "b") this.setTool("brush");
                else if (key === "e") this.setTool("eraser");
                else if (key === "f") this.setTool("fill");
                else if (key === "[") this.setBrushSize(this.brushSize - 8);
                else if (key === "]") this.setBrushSize(this.brushSize + 8);
                else if (/^[1-8]$/.test(key)) this.setActive(Number(key) - 1);
                else handled = false;
                if (handled) {
                    event.preventDefault();
                    event.stopPropagation();
                }
            });
        }

        // ---- rendering: only when something changed, on the next animation frame ------------

        requestRender() {
            if (this.frame) return;
            this.frame = requestAnimationFrame(() => {
                this.frame = null;
                this.render();
            });
        }

        tint(index) {
            const concept = this.concepts[index];
            const cached = this.tinted.get(concept.layer);
            const layer = concept.layer;
            const colour = MC.COLOURS[index % MC.COLOURS.length];
            if (cached && cached.version === layer.version && cached.colour === colour &&
                cached.canvas.width === layer.width && cached.canvas.height === layer.height) return cached.canvas;
            const canvas = cached ? cached.canvas : document.createElement("canvas");
            canvas.width = layer.width;
            canvas.height = layer.height;
            const ctx = canvas.getContext("2d");
            ctx.fillStyle = MC.COLOURS[index % MC.COLOURS.length];
            ctx.fillRect(0, 0, canvas.width, canvas.height);
            ctx.globalCompositeOperation = "destination-in";
            ctx.drawImage(layer.canvas, 0, 0);
            this.tinted.set(layer, {version: layer.version, colour, canvas});
            return canvas;
        }

        render() {
            this.renderCount = (this.renderCount || 0) + 1;   // tests check that idle means no frames
            const ctx = this.canvas.getContext("2d");
            const {width, height} = this.canvas;
            ctx.fillStyle = "#202020";
            ctx.fillRect(0, 0, width, height);
            if (this.background) {
                ctx.globalAlpha = 0.6;   // dimmed so the regions read on top
                ctx.drawImage(this.background, 0, 0, width, height);
            }
            ctx.imageSmoothingEnabled = false;
            ctx.globalAlpha = 0.55;
            for (const index of this.order) {
                if (this.concepts[index]) ctx.drawImage(this.tint(index), 0, 0, width, height);
            }
            ctx.globalAlpha = 1;
            if (this.drag && this.tool === "rect" && this.drag.points.length > 1) {
                const [w, h] = this.layerSize();
                const [x0, y0] = this.drag.start, [x1, y1] = this.drag.points[this.drag.points.length - 1];
                ctx.strokeStyle = MC.COLOURS[this.active % MC.COLOURS.length];
                ctx.lineWidth = 2;
                ctx.strokeRect(Math.min(x0, x1) / w * width, Math.min(y0, y1) / h * height,
                    Math.abs(x1 - x0) / w * width, Math.abs(y1 - y0) / h * height);
            }
        }
    }

    MC.Editor = Editor;
})();
