// "Run in this browser": the model's verified model.onnx on onnxruntime-web (WASM), vendored
// into static/vendor/onnxruntime-web/ by scripts/vendor_ort.sh (no CDN; works offline once
// loaded). The switch is shown only when the model folder has a verified model.onnx (GET /model
// says so) and the runtime files are there.
//
// Preprocessing is the server's, step for step (common/inference/images.py + preprocessing.py):
// decode, composite transparency on white, (JPEG only) the decoder's 1/2, 1/4 or 1/8 draft
// scaling, a box reduce of an image three times the input size or more, then Pillow's BILINEAR
// resize (a triangle filter widened by the scale factor, 8-bit
// fixed-point coefficients, horizontal pass then vertical, rounded to 8 bits in between), then
// float32 value * float32(1/255) in [0, 1]. The browser tests (tests/test_browser_onnx.py)
// compare the scores with the server's.
(function () {
  "use strict";

  const ORT_DIR = "/static/vendor/onnxruntime-web/";
  const ORT_SCRIPT = ORT_DIR + "ort.wasm.min.js";
  // Its Subresource Integrity, computed by the server at start-up (common/web/security.py) and
  // given in this script tag's data-ort-integrity; empty when the runtime is not vendored.
  const ORT_INTEGRITY = document.currentScript.dataset.ortIntegrity || "";
  const DEBOUNCE_MS = 150;

  // -- Pillow's BILINEAR resize on 8-bit RGBA pixels (Pillow's src/libImaging/Resample.c) ----
  const PRECISION_BITS = 32 - 8 - 2;
  const ONE = 1 << PRECISION_BITS;

  function coefficients(inSize, outSize) {
    const scale = inSize / outSize;
    const filterscale = Math.max(scale, 1.0);
    const support = 1.0 * filterscale; // the bilinear filter's support is 1
    const ksize = Math.ceil(support) * 2 + 1;
    const bounds = new Int32Array(outSize * 2);
    const kk = new Float64Array(outSize * ksize);
    for (let xx = 0; xx < outSize; xx++) {
      const center = (xx + 0.5) * scale;
      const ss = 1.0 / filterscale;
      let xmin = Math.trunc(center - support + 0.5);
      if (xmin < 0) xmin = 0;
      let xmax = Math.trunc(center + support + 0.5);
      if (xmax > inSize) xmax = inSize;
      xmax -= xmin;
      let ww = 0.0;
      const w = new Float64Array(xmax);
      for (let x = 0; x < xmax; x++) {
        const t = Math.abs((x + xmin - center + 0.5) * ss);
        w[x] = t < 1.0 ? 1.0 - t : 0.0;
        ww += w[x];
      }
      for (let x = 0; x < xmax; x++) {
        const k = ww !== 0.0 ? w[x] / ww : w[x];
        // normalize_coeffs_8bpc: round half away from zero to fixed point
        kk[xx * ksize + x] = k < 0 ? Math.trunc(-0.5 + k * ONE) : Math.trunc(0.5 + k * ONE);
      }
      bounds[xx * 2] = xmin;
      bounds[xx * 2 + 1] = xmax;
    }
    return { bounds, kk, ksize };
  }

  function clip8(v) {
    if (v >= ONE * 256) return 255;
    if (v <= 0) return 0;
    return Math.floor(v / ONE);
  }

  // One pass along x (horizontal) or y (vertical) of RGB bytes (3 per pixel).
  function resamplePass(src, w, h, outSize, horizontal) {
    const inSize = horizontal ? w : h;
    const { bounds, kk, ksize } = coefficients(inSize, outSize);
    const ow = horizontal ? outSize : w, oh = horizontal ? h : outSize;
    const out = new Uint8ClampedArray(ow * oh * 3);
    for (let yy = 0; yy < oh; yy++) {
      for (let xx = 0; xx < ow; xx++) {
        const o = horizontal ? xx : yy;
        const min = bounds[o * 2], n = bounds[o * 2 + 1], base = o * ksize;
        let s0 = ONE / 2, s1 = ONE / 2, s2 = ONE / 2;
        for (let i = 0; i < n; i++) {
          const p = horizontal ? (yy * w + min + i) * 3 : ((min + i) * w + xx) * 3;
          const k = kk[base + i];
          s0 += src[p] * k; s1 += src[p + 1] * k; s2 += src[p + 2] * k;
        }
        const q = (yy * ow + xx) * 3;
        out[q] = clip8(s0); out[q + 1] = clip8(s1); out[q + 2] = clip8(s2);
      }
    }
    return out;
  }

  // RGB bytes [h, w, 3] -> Pillow's resize to (height, width) with BILINEAR.
  function resizeBilinear(rgb, w, h, height, width) {
    let data = rgb;
    if (w !== width) { data = resamplePass(data, w, h, width, true); w = width; }
    if (h !== height) { data = resamplePass(data, w, h, height, false); h = height; }
    return data;
  }

  // libjpeg's DCT scaling as Pillow's draft() picks it: the largest of 8, 4, 2, 1 that keeps
  // the image at least the model's size. Emulated by averaging s x s blocks.
  function draftScale(w, h, height, width) {
    const scale = Math.min(Math.floor(w / width), Math.floor(h / height));
    for (const s of [8, 4, 2, 1]) if (scale >= s) return s;
    return 1;
  }

  // common/inference/images.py's reduce before the resize: an image at least REDUCE_GAP (3)
  // times the model input on both sides is box-reduced by the integer factor that keeps it so.
  function reduceFactor(w, h, height, width) {
    return Math.max(1, Math.min(Math.floor(w / (width * 3)), Math.floor(h / (height * 3))));
  }

  function boxReduce(rgb, w, h, s) {
    const ow = Math.ceil(w / s), oh = Math.ceil(h / s);
    const out = new Uint8ClampedArray(ow * oh * 3);
    for (let y = 0; y < oh; y++) {
      for (let x = 0; x < ow; x++) {
        let a = 0, b = 0, c = 0, n = 0;
        for (let yy = y * s; yy < Math.min(h, y * s + s); yy++) {
          for (let xx = x * s; xx < Math.min(w, x * s + s); xx++) {
            const p = (yy * w + xx) * 3;
            a += rgb[p]; b += rgb[p + 1]; c += rgb[p + 2]; n++;
          }
        }
        const q = (y * ow + x) * 3;
        out[q] = Math.round(a / n); out[q + 1] = Math.round(b / n); out[q + 2] = Math.round(c / n);
      }
    }
    return { rgb: out, w: ow, h: oh };
  }

  // RGBA ImageData (already composited on white) -> float32 [1, height, width, 3] in [0, 1].
  function toModelInput(imageData, height, width, isJpeg) {
    let w = imageData.width, h = imageData.height;
    let rgb = new Uint8ClampedArray(w * h * 3);
    for (let i = 0, j = 0; i < imageData.data.length; i += 4, j += 3) {
      rgb[j] = imageData.data[i]; rgb[j + 1] = imageData.data[i + 1]; rgb[j + 2] = imageData.data[i + 2];
    }
    const s = isJpeg ? draftScale(w, h, height, width) : 1;
    if (s > 1) ({ rgb, w, h } = boxReduce(rgb, w, h, s));
    const f = reduceFactor(w, h, height, width);
    if (f > 1) ({ rgb, w, h } = boxReduce(rgb, w, h, f));
    const resized = (w === width && h === height) ? rgb : resizeBilinear(rgb, w, h, height, width);
    const SCALE = Math.fround(1 / 255); // numpy: float32(v) * float32(1/255), rounded to float32
    const out = new Float32Array(resized.length);
    for (let i = 0; i < resized.length; i++) out[i] = resized[i] * SCALE;
    return out;
  }

  // Image bytes -> upright RGBA pixels composited on white (as common/inference/images.py decodes).
  async function decode(blob) {
    const bitmap = await createImageBitmap(blob, { imageOrientation: "from-image",
      premultiplyAlpha: "none", colorSpaceConversion: "none" });
    const c = document.createElement("canvas");
    c.width = bitmap.width; c.height = bitmap.height;
    const g = c.getContext("2d", { willReadFrequently: true });
    g.fillStyle = "#ffffff";
    g.fillRect(0, 0, c.width, c.height);
    g.drawImage(bitmap, 0, 0);
    bitmap.close && bitmap.close();
    return g.getImageData(0, 0, c.width, c.height);
  }

  async function isJpeg(blob) {
    const head = new Uint8Array(await blob.slice(0, 3).arrayBuffer());
    return head[0] === 0xff && head[1] === 0xd8 && head[2] === 0xff;
  }

  // -- the session and the switch --------------------------------------------------------------
  const state = { model: null, session: null, loading: null, last: null, pending: 0,
    answered: 0, error: null };
  const $ = (id) => document.getElementById(id);

  function loadScript(src, integrity) {
    return new Promise((resolve, reject) => {
      const s = document.createElement("script");
      s.integrity = integrity;
      s.src = src; s.onload = resolve; s.onerror = () => reject(new Error("cannot load " + src));
      document.head.appendChild(s);
    });
  }

  async function loadSession() {
    if (!window.ort) await loadScript(ORT_SCRIPT, ORT_INTEGRITY);
    window.ort.env.wasm.wasmPaths = ORT_DIR;
    window.ort.env.wasm.numThreads = 1; // threads need cross-origin isolation; one is plenty
    const response = await fetch(state.model.onnx.url, { integrity: state.model.onnx.integrity });
    if (!response.ok) throw new Error("the model answered " + response.status);
    const bytes = new Uint8Array(await response.arrayBuffer());
    return window.ort.InferenceSession.create(bytes, { executionProviders: ["wasm"] });
  }

  function rank(scores) {
    let values = Array.from(scores);
    if (state.model.onnx.outputs === "logits") {
      const max = Math.max(...values);
      const e = values.map((v) => Math.exp(v - max));
      const sum = e.reduce((a, b) => a + b, 0);
      values = e.map((v) => v / sum);
    }
    return state.model.labels.map((label, i) => ({ label, score: Math.round(values[i] * 1e6) / 1e6 }))
      .sort((a, b) => b.score - a.score); // stable: ties keep label order, as the server's
  }

  // Pixels -> the page's result, as the server would answer (predictions, model, timing).
  async function classifyPixels(imageData, jpeg) {
    const started = performance.now();
    const [h, w] = state.model.input_size;
    const input = new window.ort.Tensor("float32", toModelInput(imageData, h, w, jpeg), [1, h, w, 3]);
    const session = state.session;
    const outputs = await session.run({ [session.inputNames[0]]: input });
    const name = session.outputNames.includes("probabilities") ? "probabilities" : session.outputNames[0];
    const result = { predictions: rank(outputs[name].data),
      model: { name: state.model.name, version: state.model.version },
      elapsed_ms: performance.now() - started };
    state.last = result;
    state.error = null;
    state.answered++;
    window.ClassifierPage.showResult(result, "in your browser");
    return result;
  }

  async function classifyBlob(blob) {
    try {
      const jpeg = await isJpeg(blob);
      return await classifyPixels(await decode(blob), jpeg);
    } catch (e) {
      state.error = e.message;
      state.answered++;
      window.ClassifierPage.showError("This browser could not classify that picture: " + e.message);
      return null;
    }
  }

  function active() {
    const toggle = $("in-browser");
    return Boolean(toggle && toggle.checked && state.session);
  }

  async function setActive(on) {
    const note = $("in-browser-note");
    if (!on) { note.textContent = "Pictures go to the server."; return; }
    note.textContent = "Loading the model into this browser…";
    try {
      state.loading = state.loading || loadSession();
      state.session = await state.loading;
      note.textContent = "The model runs in this browser: drawings are classified as you draw, " +
        "and nothing is sent to the server.";
    } catch (e) {
      state.loading = null;
      $("in-browser").checked = false;
      note.textContent = "This browser cannot run the model (" + e.message + "); using the server.";
    }
  }

  // Live classification of the canvas while drawing, debounced.
  function watchCanvas() {
    const canvas = $("canvas");
    let timer = null, pressed = false;
    const later = () => {
      if (timer === null) state.pending++;
      clearTimeout(timer);
      timer = setTimeout(() => {
        timer = null;
        if (!active()) { state.pending--; return; }
        const g = canvas.getContext("2d", { willReadFrequently: true });
        classifyPixels(g.getImageData(0, 0, canvas.width, canvas.height), false)
          .catch(() => {}).finally(() => { state.pending--; });
      }, DEBOUNCE_MS);
    };
    canvas.addEventListener("pointerdown", () => { pressed = true; later(); });
    canvas.addEventListener("pointermove", () => { if (pressed) later(); });
    ["pointerup", "pointercancel"].forEach((t) => canvas.addEventListener(t, () => {
      if (pressed) later();
      pressed = false;
    }));
  }

  async function offer(model) {
    if (!model || !model.onnx || !ORT_INTEGRITY) return;
    const runtime = await fetch(ORT_SCRIPT, { method: "HEAD" }).catch(() => null);
    if (!runtime || !runtime.ok) return;
    state.model = model;
    const toggle = $("in-browser");
    toggle.addEventListener("change", () => setActive(toggle.checked));
    $("in-browser-panel").hidden = false;
    watchCanvas();
  }

  // ``last``: the latest in-browser answer; ``pending``: canvas classifications still to come;
  // ``answered``: how many answers (results or errors) so far; ``error``: the latest one's error.
  window.InBrowser = { offer, active, classifyBlob, toModelInput, decode,
    get last() { return state.last; }, get pending() { return state.pending; },
    get answered() { return state.answered; }, get error() { return state.error; } };
})();
