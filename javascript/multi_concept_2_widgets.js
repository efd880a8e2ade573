// Multi-Concept region canvas, part 2: the toolbar and the legend (plain DOM, no framework).
(function () {
    "use strict";
    const MC = (window.MultiConcept = window.MultiConcept || {});

    MC.COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45"];

    // Presets fill the current concepts' regions: concept i takes cell i (cells repeat).
    MC.PRESETS = {
        "halves": [[0, 0, 0.5, 1], [0.5, 0, 0.5, 1]],
        "thirds": [[0, 0, 1 / 3, 1], [1 / 3, 0, 1 / 3, 1], [2 / 3, 0, 1 / 3, 1]],
        "2x2 grid": [[0, 0, 0.5, 0.5], [0.5, 0, 0.5, 0.5], [0, 0.5, 0.5, 0.5], [0.5, 0.5, 0.5, 0.5]],
        "centre": [[0.25, 0.25, 0.5, 0.5]],
    };

    function element(tag, attributes, children) {
        const node = document.createElement(tag);
        for (const [key, value] of Object.entries(attributes || {})) {
            if (value === null || value === undefined) continue;
            if (key === "text") node.textContent = value;
            else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
            else node.setAttribute(key, value);
        }
        for (const child of children || []) node.appendChild(child);
        return node;
    }
    MC.element = element;

    // Tools, brush size, presets, clear, undo/redo and the background picture.
    class Toolbar {
        constructor(editor) {
            this.editor = editor;
            const tool = (name, label, key) => element("button", {
                type: "button", "data-tool": name, title: `${label} (${key})`, text: label,
                onclick: () => editor.setTool(name),
            });
            const action = (label, title, run) => element("button", {type: "button", title, text: label, onclick: run});
            this.tools = [tool("rect", "Rectangle", "R"), tool("brush", "Brush", "B"),
                tool("eraser", "Eraser", "E"), tool("fill", "Fill", "F")];
            this.size = element("input", {type: "range", min: "4", max: "256", value: String(editor.brushSize),
                title: "Brush size in image pixels ([ and ])", "data-role": "brush-size",
                oninput: (event) => editor.setBrushSize(Number(event.target.value))});
            this.presets = element("select", {title: "Fill the concepts' regions with a layout", "data-role": "preset",
                onchange: (event) => { editor.applyPreset(event.target.value); event.target.value = ""; }},
            [element("option", {value: "", text: "Preset..."})].concat(
                Object.keys(MC.PRESETS).map((name) => element("option", {value: name, text: name}))));
            this.file = element("input", {type: "file", accept: "image/*", style: "display:none",
                onchange: (event) => event.target.files[0] && editor.setBackgroundFile(event.target.files[0])});
            this.root = element("div", {class: "mc-toolbar"}, [
                ...this.tools,
                element("label", {class: "mc-size", text: "Size "}, [this.size]),
                this.presets,
                action("Clear", "Clear the selected concept's region", () => editor.clearActive()),
                action("Clear all", "Clear every region", () => editor.clearAll()),
                action("Undo", "Undo (Ctrl+Z)", () => editor.undo()),
                action("Redo", "Redo (Ctrl+Y)", () => editor.redo()),
                action("Trace picture", "Show a picture under the regions to trace subjects", () => this.file.click()),
                action("Trace output", "Show the selected output image (e.g. the layout pass) under the regions",
                    () => editor.useOutputAsBackground()),
                action("No picture", "Remove the picture under the regions", () => editor.setBackground(null)),
                this.file,
            ]);
        }

        update() {
            for (const button of this.tools) {
                button.classList.toggle("mc-active", button.dataset.tool === this.editor.tool);
            }
            this.size.value = String(this.editor.brushSize);
        }
    }

    // One entry per concept, front first: pick the concept to draw, move it forward or back.
    class Legend {
        constructor(editor) {
            this.editor = editor;
            this.root = element("div", {class: "mc-legend", title: "Front to back: the top entry covers the ones below"});
        }

        update() {
            const editor = this.editor;
            this.root.replaceChildren(...editor.frontToBack().map((index, position, order) => {
                const concept = editor.concepts[index];
                return element("div", {
                    class: "mc-legend-item" + (index === editor.active ? " mc-active" : ""),
                    "data-concept": String(index),
                    onclick: () => editor.setActive(index),
                }, [
                    element("span", {class: "mc-swatch", style: `background:${MC.COLOURS[index % MC.COLOURS.length]}`}),
                    element("span", {class: "mc-name", text: `${index + 1}. ${concept.name}`}),
                    element("button", {type: "button", title: "Bring forward", text: "\u25B2",
                        disabled: position === 0 ? "" : null,
                        onclick: (event) => { event.stopPropagation(); editor.move(index, -1); }}),
                    element("button", {type: "button", title: "Send back", text: "\u25BC",
                        disabled: position === order.length - 1 ? "" : null,
                        onclick: (event) => { event.stopPropagation(); editor.move(index, +1); }}),
                ]);
            }));
        }
    }

    MC.Toolbar = Toolbar;
    MC.Legend = Legend;
})();
