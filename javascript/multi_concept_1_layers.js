// Multi-Concept region canvas, part 1: one concept's mask layer and the undo history.
// Classic script (the WebUI injects every file in javascript/ into the page); everything lives
// on window.MultiConcept so a second load does not redeclare anything.
(function () {
    "use strict";
    const MC = (window.MultiConcept = window.MultiConcept || {});

    // A concept's region: white pixels with alpha = painted, at a quarter of the image size.
    class MaskLayer {
        constructor(width, height) {
            this.canvas = document.createElement("canvas");
            this.canvas.width = width;
            this.canvas.height = height;
            this.ctx = this.canvas.getContext("2d", {willReadFrequently: true});
            this.version = 0;   // bumped on every change; the editor re-tints when it moves
        }

        get width() { return this.canvas.width; }
        get height() { return this.canvas.height; }

        changed() { this.version += 1; }

        clear() {
            this.ctx.clearRect(0, 0, this.width, this.height);
            this.changed();
        }

        resize(width, height) {   // a new aspect stretches what was drawn, as the job's fractions do
            if (width === this.width && height === this.height) return;
            const old = document.createElement("canvas");
            old.width = this.width;
            old.height = this.height;
            old.getContext("2d").drawImage(this.canvas, 0, 0);
            this.canvas.width = width;
            this.canvas.height = height;
            this.ctx.imageSmoothingEnabled = false;
            this.ctx.drawImage(old, 0, 0, width, height);
            this.changed();
        }

        fillRect(x, y, w, h, erase) {   // layer pixels
            this.ctx.globalCompositeOperation = erase ? "destination-out" : "source-over";
            this.ctx.fillStyle = "#fff";
            this.ctx.fillRect(x, y, w, h);
            this.ctx.globalCompositeOperation = "source-over";
            this.changed();
        }

        setFractionRect(x, y, w, h) {
            this.ctx.clearRect(0, 0, this.width, this.height);
            const x0 = Math.round(x * this.width), y0 = Math.round(y * this.height);
            const x1 = Math.round((x + w) * this.width), y1 = Math.round((y + h) * this.height);
            this.fillRect(x0, y0, Math.max(1, x1 - x0), Math.max(1, y1 - y0), false);
        }

        stroke(points, size, erase) {   // a brush or eraser stroke through layer points
            const ctx = this.ctx;
            ctx.globalCompositeOperation = erase ? "destination-out" : "source-over";
            ctx.strokeStyle = ctx.fillStyle = "#fff";
            ctx.lineWidth = size;
            ctx.lineCap = ctx.lineJoin = "round";
            ctx.beginPath();
            ctx.moveTo(points[0][0], points[0][1]);
            if (points.length === 1) {
                ctx.arc(points[0][0], points[0][1], size / 2, 0, 2 * Math.PI);
                ctx.fill();
            } else {
                for (const [px, py] of points.slice(1)) ctx.lineTo(px, py);
                ctx.stroke();
            }
            ctx.globalCompositeOperation = "source-over";
            this.changed();
        }

        // Bucket fill: the unpainted area connected to (x, y), as in any paint program.
        floodFill(x, y) {
            const w = this.width, h = this.height;
            x = Math.floor(x);
            y = Math.floor(y);
            if (x < 0 || y < 0 || x >= w || y >= h) return;
            const image = this.ctx.getImageData(0, 0, w, h);
            const data = image.data;
            const painted = (i) => data[i * 4 + 3] > 127;
            if (painted(y * w + x)) return;
            const stack = [y * w + x];
            const seen = new Uint8Array(w * h);
            seen[y * w + x] = 1;
            while (stack.length) {
                const i = stack.pop();
                data[i * 4] = data[i * 4 + 1] = data[i * 4 + 2] = data[i * 4 + 3] = 255;
                const px = i % w, py = (i - px) / w;
                for (const [nx, ny] of [[px - 1, py], [px + 1, py], [px, py - 1], [px, py + 1]]) {
                    if (nx < 0 || ny < 0 || nx >= w || ny >= h) continue;
                    const j = ny * w + nx;
                    if (!seen[j] && !painted(j)) {
                        seen[j] = 1;
                        stack.push(j);
                    }
                }
            }
            this.ctx.putImageData(image, 0, 0);
            this.changed();
        }

        snapshot() { return this.ctx.getImageData(0, 0, this.width, this.height); }

        restore(image) {
            if (image.width !== this.width || image.height !== this.height) {
                this.canvas.width = image.width;
                this.canvas.height = image.height;
            }
            this.ctx.putImageData(image, 0, 0);
            this.changed();
        }

        // What the job gets: a rect when the painted pixels are exactly a rectangle, else a mask.
        toRegion() {
            const w = this.width, h = this.height;
            const data = this.ctx.getImageData(0, 0, w, h).data;
            let count = 0, x0 = w, y0 = h, x1 = -1, y1 = -1;
            for (let i = 0; i < w * h; i++) {
                if (data[i * 4 + 3] <= 127) continue;
                const px = i % w, py = (i - px) / w;
                count += 1;
                if (px < x0) x0 = px;
                if (px > x1) x1 = px;
                if (py < y0) y0 = py;
                if (py > y1) y1 = py;
            }
            if (count === 0) return null;
            const round = (v) => Math.round(v * 10000) / 10000;
            if (count === (x1 - x0 + 1) * (y1 - y0 + 1)) {
                return {type: "rect", x: round(x0 / w), y: round(y0 / h),
                    w: round((x1 - x0 + 1) / w), h: round((y1 - y0 + 1) / h)};
            }
            return {type: "mask", png: this.toPng()};
        }

        toPng() {   // white where painted, transparent elsewhere: the alpha is the region
            const out = document.createElement("canvas");
            out.width = this.width;
            out.height = this.height;
            const ctx = out.getContext("2d");
            const image = this.ctx.getImageData(0, 0, this.width, this.height);
            for (let i = 0; i < image.data.length; i += 4) {
                const inside = image.data[i + 3] > 127 ? 255 : 0;
                image.data[i] = image.data[i + 1] = image.data[i + 2] = 255;
                image.data[i + 3] = inside;
            }
            ctx.putImageData(image, 0, 0);
            return out.toDataURL("image/png").split(",", 2)[1];
        }

        // A mask from the job: white = inside; a transparent PNG counts its painted pixels.
        fromPng(base64, stillWanted) {   // resolves false when a newer region replaced this load
            return new Promise((resolve) => {
                const image = new Image();
                image.onload = () => {
                    if (stillWanted && !stillWanted()) {
                        resolve(false);
                        return;
                    }
                    const tmp = document.createElement("canvas");
                    tmp.width = this.width;
                    tmp.height = this.height;
                    const ctx = tmp.getContext("2d", {willReadFrequently: true});
                    ctx.imageSmoothingEnabled = false;
                    ctx.drawImage(image, 0, 0, this.width, this.height);
                    const pixels = ctx.getImageData(0, 0, this.width, this.height);
                    const d = pixels.data;
                    for (let i = 0; i < d.length; i += 4) {
                        const inside = ((d[i] + d[i + 1] + d[i + 2]) / 3) * (d[i + 3] / 255) > 127;
                        d[i] = d[i + 1] = d[i + 2] = 255;
                        d[i + 3] = inside ? 255 : 0;
                    }
                    this.ctx.putImageData(pixels, 0, 0);
                    this.changed();
                    resolve(true);
                };
                image.onerror = () => resolve(false);
                image.src = "data:image/png;base64," + base64;
            });
        }
    }

    // Undo/redo over whole-canvas snapshots (every layer plus the front-to-back order).
    class History {
        constructor(limit) {
            this.limit = limit || 30;
            this.undoStack = [];
            this.redoStack = [];
        }

        push(state) {
            this.undoStack.push(state);
            if (this.undoStack.length > this.limit) this.undoStack.shift();
            this.redoStack = [];
        }

        undo(current) {
            if (!this.undoStack.length) return null;
            this.redoStack.push(current);
            return this.undoStack.pop();
        }

        redo(current) {
            if (!this.redoStack.length) return null;
            this.undoStack.push(current);
            return this.redoStack.pop();
        }
    }

    MC.MaskLayer = MaskLayer;
    MC.History = History;
})();
