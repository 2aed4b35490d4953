// "Run in this browser": the model's model.onnx (our verified export, or an imported ONNX model
// whose weights are inside the file) on onnxruntime-web (WASM), vendored into
// static/vendor/onnxruntime-web/ by scripts/vendor_ort.sh (no CDN; works offline once loaded).
// The switch is shown only when GET /model offers a model.onnx, the runtime files are there and
// this file can port the model's preprocessing spec (see `unsupported`: a spec with a value or
// a setting it does not know keeps the page on the server).
//
// Preprocessing is the server's, step for step (common/inference/images.py + preprocessing.py),
// driven by GET /model's onnx.preprocessing (absent: the "tfhub" spec of our own models):
//  1. decode, composite transparency on white;
//  2. only with the spec's decode "draft" (ours; "exact" decodes the whole image):
//     (JPEG only) the decoder's 1/2, 1/4 or 1/8 draft scaling (emulated by averaging blocks:
//     close to libjpeg's DCT scaling, not equal), then Pillow's reduce (Reduce.c's rounding)
//     by the integer factor that keeps the image at least three times the target, when it is
//     that large; the target is the input size, or for "crop" (s, s) with s = max(shorter
//     side, h, w) (Preprocessing.draft_target);
//  3. the resize with the spec's Pillow filter (src/libImaging/Resample.c: bilinear, bicubic
//     (a = -0.5), lanczos (3 lobes), box: the filter widened by the scale factor when
//     shrinking, 8-bit fixed-point coefficients, horizontal pass then vertical (Pillow 13:
//     vertical first when the height shrinks by more than twice as many pixels as the width),
//     rounded to 8 bits in between; nearest: Geometry.c's ImagingScaleAffine, source x =
//     int((x + 0.5) * in / out) accumulated as Pillow does):
//       "stretch" to the input size;
//       "crop" (torchvision Resize + CenterCrop): the shorter side to resize_shorter (default
//       round(max(h, w) / 0.875)), the longer to int(shorter * long / short), padded with black
//       (centred, floor) if the crop is larger, the crop's corner at round((side - crop) / 2)
//       (Python's round: halves to even);
//       "letterbox": scaled by min(w / iw, h / ih) to round(iw * s) x round(ih * s) (at least
//       1), pasted centred (floor) on black;
//  4. float32 value * float32(1/255) in [0, 1]; channels in the spec's colour order (RGB or
//     BGR); float32: (x - mean) * float32(1 / std) per channel, in float32 arithmetic (mean
//     and std given in RGB order, reversed for BGR); uint8: the raw 0..255 values;
//  5. laid out NHWC or NCHW in the tensor shape GET /model's onnx.input.shape gives (batch 1),
//     fed in the graph's own input type (float64 and float16 converted as numpy casts);
//  6. the output named "probabilities" (else the first): label_offset leading values dropped,
//     then softmax for "logits", 1 / (1 + e^-x) for "sigmoid", probabilities as they are.
// Steps 2 (reduce) to 5 equal the server's bit for bit (Pillow 13.0); the browser tests
// (tests/test_browser_onnx.py) check that, and compare the scores with the server's.
(function () {
  "use strict";

  const ORT_DIR = "/static/vendor/onnxruntime-web/";
  const ORT_SCRIPT = ORT_DIR + "ort.wasm.min.js";
  // Its Subresource Integrity, computed by the server at start-up (common/web/security.py) and
  // given in this script tag's data-ort-integrity; empty when the runtime is not vendored.
  const ORT_INTEGRITY = document.currentScript.dataset.ortIntegrity || "";
  const DEBOUNCE_MS = 150;

  // -- the preprocessing spec (common/inference/preprocessing.py) -------------------------------
  // Our own models' spec (OURS there): stretched (bilinear), RGB, NHWC float32 in [0, 1],
  // decoded in draft mode.
  const TFHUB = { layout: "NHWC", colour: "RGB", resize: "stretch", resize_shorter: null,
    interpolation: "bilinear", mean: [0, 0, 0], std: [1, 1, 1], dtype: "float32",
    output: "probabilities", label_offset: 0, decode: "draft", preset: "tfhub" };
  const CROP_FRACTION = 0.875;
  const CHOICES = { layout: ["NHWC", "NCHW"], colour: ["RGB", "BGR"],
    resize: ["stretch", "crop", "letterbox"],
    interpolation: ["bilinear", "bicubic", "nearest", "lanczos", "box"],
    dtype: ["float32", "uint8"], output: ["probabilities", "logits", "sigmoid"],
    decode: ["exact", "draft"] };

  // GET /model's model -> its spec (our own models' when it gives none; the older
  // onnx.outputs "logits" honoured as the server does).
  function specOf(model) {
    const onnx = model.onnx || {};
    const given = onnx.preprocessing || model.preprocessing;
    if (given) return given;
    return Object.assign({}, TFHUB, onnx.outputs ? { output: onnx.outputs } : {});
  }

  const isWhole = (v) => Number.isInteger(v);

  // Why this file cannot apply ``spec`` to a model of input (height, width) with input
  // ``shape``, or null when it can.
  function unsupported(spec, size, shape) {
    if (!spec || typeof spec !== "object") return "no preprocessing spec";
    const known = new Set(Object.keys(TFHUB));
    const unknown = Object.keys(spec).filter((k) => !known.has(k));
    if (unknown.length) return "unknown preprocessing setting(s) " + unknown.join(", ");
    for (const [name, allowed] of Object.entries(CHOICES)) {
      if (!allowed.includes(spec[name])) return "preprocessing " + name + " " + spec[name];
    }
    for (const name of ["mean", "std"]) {
      const v = spec[name];
      if (!Array.isArray(v) || v.length !== 3 || !v.every((x) => Number.isFinite(x))) {
        return "preprocessing " + name + " is not three numbers";
      }
    }
    if (spec.std.some((x) => x === 0)) return "preprocessing std 0";
    if (spec.resize_shorter !== null && spec.resize_shorter !== undefined &&
        !(isWhole(spec.resize_shorter) && spec.resize_shorter >= 1)) return "resize_shorter";
    if (!(isWhole(spec.label_offset) && spec.label_offset >= 0)) return "label_offset";
    if (!Array.isArray(size) || size.length !== 2 || !size.every((v) => isWhole(v) && v > 0)) {
      return "input size unknown";
    }
    const want = tensorShape(spec, size, null);
    if (shape) {
      const got = tensorShape(spec, size, shape);
      if (got.length !== 4 || got.some((d, i) => d !== want[i])) {
        return "input shape " + JSON.stringify(shape) + " is not " + JSON.stringify(want);
      }
    }
    return null;
  }

  // The input tensor's shape for one image: GET /model's onnx.input.shape with the batch as 1,
  // or [1, h, w, 3] / [1, 3, h, w] from the layout.
  function tensorShape(spec, size, shape) {
    if (Array.isArray(shape) && shape.length) return shape.map((d, i) => (i === 0 ? 1 : d));
    const [h, w] = size;
    return spec.layout === "NCHW" ? [1, 3, h, w] : [1, h, w, 3];
  }

  // Python's round() on a float: halves to even.
  function pyRound(x) {
    const f = Math.floor(x), d = x - f;
    if (d > 0.5) return f + 1;
    if (d < 0.5) return f;
    return f % 2 === 0 ? f : f + 1;
  }

  function shorterSide(spec, height, width) {
    return spec.resize_shorter || pyRound(Math.max(height, width) / CROP_FRACTION);
  }

  // Preprocessing.draft_target: the size the decoder may reduce the image to, [h, w]; null
  // for decode "exact" (the whole image).
  function draftTarget(spec, height, width) {
    if (spec.decode === "exact") return null;
    if (spec.resize === "crop") {
      const side = Math.max(shorterSide(spec, height, width), height, width);
      return [side, side];
    }
    return [height, width];
  }

  // -- Pillow's resize on 8-bit RGB pixels (Pillow's src/libImaging/Resample.c) ----------------
  // Images here are { rgb: Uint8ClampedArray [h, w, 3], w, h }.
  const PRECISION_BITS = 32 - 8 - 2;
  const ONE = 1 << PRECISION_BITS;

  function sinc(x) {
    if (x === 0.0) return 1.0;
    x = x * Math.PI;
    return Math.sin(x) / x;
  }

  const FILTERS = {
    box: { support: 0.5, f: (x) => (x > -0.5 && x <= 0.5 ? 1.0 : 0.0) },
    bilinear: { support: 1.0, f: (x) => { x = Math.abs(x); return x < 1.0 ? 1.0 - x : 0.0; } },
    bicubic: { support: 2.0, f: (x) => {
      const a = -0.5;
      x = Math.abs(x);
      if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
      if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
      return 0.0;
    } },
    lanczos: { support: 3.0, f: (x) => (-3.0 <= x && x < 3.0 ? sinc(x) * sinc(x / 3) : 0.0) },
  };

  // precompute_coeffs + normalize_coeffs_8bpc.
  function coefficients(inSize, outSize, filter) {
    const scale = inSize / outSize;
    const filterscale = Math.max(scale, 1.0);
    const support = filter.support * filterscale;
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
        w[x] = filter.f((x + xmin - center + 0.5) * ss);
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

  // One pass along x (horizontal) or y (vertical).
  function resamplePass(src, w, h, outSize, horizontal, filter) {
    const inSize = horizontal ? w : h;
    const { bounds, kk, ksize } = coefficients(inSize, outSize, filter);
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

  // NEAREST: _imaging.c's resize hands it to ImagingScaleAffine (Geometry.c): the source
  // coordinate starts at in / out * 0.5 and steps by in / out (in doubles), truncated.
  function resizeNearest(img, ow, oh) {
    const ax = img.w / ow, ay = img.h / oh;
    const xin = new Int32Array(ow);
    let xo = ax * 0.5;
    for (let x = 0; x < ow; x++) { xin[x] = xo < 0 ? -1 : Math.trunc(xo); xo += ax; }
    const out = new Uint8ClampedArray(ow * oh * 3); // fill: black where the source is outside
    let yo = ay * 0.5;
    for (let y = 0; y < oh; y++) {
      const yi = yo < 0 ? -1 : Math.trunc(yo);
      if (yi >= 0 && yi < img.h) {
        for (let x = 0; x < ow; x++) {
          if (xin[x] < 0 || xin[x] >= img.w) continue;
          const p = (yi * img.w + xin[x]) * 3, q = (y * ow + x) * 3;
          out[q] = img.rgb[p]; out[q + 1] = img.rgb[p + 1]; out[q + 2] = img.rgb[p + 2];
        }
      }
      yo += ay;
    }
    return { rgb: out, w: ow, h: oh };
  }

  // Pillow's Image.resize((ow, oh), filter) of an RGB image.
  function resize(img, ow, oh, interpolation) {
    if (img.w === ow && img.h === oh) return img;
    if (interpolation === "nearest") return resizeNearest(img, ow, oh);
    const filter = FILTERS[interpolation];
    let { rgb, w, h } = img;
    // Pillow 13 (python-pillow/Pillow#9549) runs the vertical pass first when the height
    // shrinks by more than twice as many pixels as the width does (the rule measured against
    // Pillow 13.0.0, which requirements.txt pins; the other order differs by a level here and
    // there)
    const verticalFirst = oh < h && h - oh > 2 * (w - ow);
    if (verticalFirst) { rgb = resamplePass(rgb, w, h, oh, false, filter); h = oh; }
    if (w !== ow) { rgb = resamplePass(rgb, w, h, ow, true, filter); w = ow; }
    if (h !== oh) { rgb = resamplePass(rgb, w, h, oh, false, filter); h = oh; }
    return { rgb, w, h };
  }

  // A black (ow x oh) image with ``img`` pasted at (left, top) (Image.new + paste).
  function onBlack(img, ow, oh, left, top) {
    const out = new Uint8ClampedArray(ow * oh * 3);
    for (let y = 0; y < img.h; y++) {
      const ty = y + top;
      if (ty < 0 || ty >= oh) continue;
      for (let x = 0; x < img.w; x++) {
        const tx = x + left;
        if (tx < 0 || tx >= ow) continue;
        const p = (y * img.w + x) * 3, q = (ty * ow + tx) * 3;
        out[q] = img.rgb[p]; out[q + 1] = img.rgb[p + 1]; out[q + 2] = img.rgb[p + 2];
      }
    }
    return { rgb: out, w: ow, h: oh };
  }

  // Image.crop((left, top, left + cw, top + ch)) inside the image.
  function cropBox(img, left, top, cw, ch) {
    return onBlack(img, cw, ch, -left, -top);
  }

  // preprocessing._crop: torchvision's Resize(shorter) then CenterCrop((height, width)).
  function centreCrop(img, shorter, height, width, interpolation) {
    const nw = img.w <= img.h ? shorter : Math.trunc(shorter * img.w / img.h);
    const nh = img.w <= img.h ? Math.trunc(shorter * img.h / img.w) : shorter;
    img = resize(img, nw, nh, interpolation);
    if (width > nw || height > nh) {
      const pw = Math.max(width, nw), ph = Math.max(height, nh);
      img = onBlack(img, pw, ph, Math.floor((pw - nw) / 2), Math.floor((ph - nh) / 2));
    }
    const top = pyRound((img.h - height) / 2.0), left = pyRound((img.w - width) / 2.0);
    return cropBox(img, left, top, width, height);
  }

  // preprocessing._letterbox: scaled to fit (aspect kept), centred on black.
  function letterbox(img, height, width, interpolation) {
    const scale = Math.min(width / img.w, height / img.h);
    const nw = Math.max(1, pyRound(img.w * scale)), nh = Math.max(1, pyRound(img.h * scale));
    img = resize(img, nw, nh, interpolation);
    if (nw === width && nh === height) return img;
    return onBlack(img, width, height, Math.floor((width - nw) / 2),
      Math.floor((height - nh) / 2));
  }

  // Preprocessing.pixels, up to the float conversion: RGB bytes at (height, width).
  function pixels(img, spec, height, width) {
    if (spec.resize === "crop") {
      return centreCrop(img, shorterSide(spec, height, width), height, width,
        spec.interpolation);
    }
    if (spec.resize === "letterbox") return letterbox(img, height, width, spec.interpolation);
    return resize(img, width, height, spec.interpolation);
  }

  // libjpeg's DCT scaling as Pillow's draft() picks it: the largest of 8, 4, 2, 1 that keeps
  // the image at least the target. Emulated by averaging s x s blocks.
  function draftScale(w, h, height, width) {
    const scale = Math.min(Math.floor(w / width), Math.floor(h / height));
    for (const s of [8, 4, 2, 1]) if (scale >= s) return s;
    return 1;
  }

  // common/inference/images.py's reduce before the resize: an image at least REDUCE_GAP (3)
  // times the target on both sides is box-reduced by the integer factor that keeps it so.
  function reduceFactor(w, h, height, width) {
    return Math.max(1, Math.min(Math.floor(w / (width * 3)), Math.floor(h / (height * 3))));
  }

  // Pillow's Image.reduce(s) (src/libImaging/Reduce.c): each s x s block (the last row and
  // column of blocks may be partial) -> ((sum + n // 2) * M) >> 24 with M = (UINT32)(float
  // 2^32 / (256 n)), n the block's pixels.
  function boxReduce(img, s) {
    const { rgb, w, h } = img;
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
        const m = Math.trunc(Math.fround(4294967296 / (256 * n))), half = Math.floor(n / 2);
        const q = (y * ow + x) * 3;
        out[q] = Math.floor((a + half) * m / 16777216);
        out[q + 1] = Math.floor((b + half) * m / 16777216);
        out[q + 2] = Math.floor((c + half) * m / 16777216);
      }
    }
    return { rgb: out, w: ow, h: oh };
  }

  // Preprocessing.to_input on the pixels: float32 (x - mean) * (1 / std) per channel in the
  // spec's colour order (x = value * float32(1/255)), or the uint8 values; NHWC or NCHW.
  function toInput(img, spec) {
    const plane = img.w * img.h, nchw = spec.layout === "NCHW";
    const uint8 = spec.dtype === "uint8";
    const out = uint8 ? new Uint8Array(plane * 3) : new Float32Array(plane * 3);
    const SCALE = Math.fround(1 / 255); // numpy: float32(v) * float32(1/255), rounded to float32
    for (let c = 0; c < 3; c++) {
      const src = spec.colour === "BGR" ? 2 - c : c;
      const mean = Math.fround(spec.mean[src]);
      const inv = Math.fround(1 / Math.fround(spec.std[src]));
      for (let i = 0; i < plane; i++) {
        const p = img.rgb[i * 3 + src];
        // uint8: rint(float32(p/255) * 255) is p for every byte
        const v = uint8 ? p : Math.fround(Math.fround(Math.fround(p * SCALE) - mean) * inv);
        out[nchw ? c * plane + i : i * 3 + c] = v;
      }
    }
    return out;
  }

  // RGBA ImageData (already composited on white) -> the model's input for one image (a
  // Float32Array or Uint8Array in the spec's layout), as the server computes it.
  function toModelInput(imageData, height, width, isJpeg, spec) {
    spec = spec || TFHUB;
    let w = imageData.width, h = imageData.height;
    const rgb = new Uint8ClampedArray(w * h * 3);
    for (let i = 0, j = 0; i < imageData.data.length; i += 4, j += 3) {
      rgb[j] = imageData.data[i]; rgb[j + 1] = imageData.data[i + 1]; rgb[j + 2] = imageData.data[i + 2];
    }
    let img = { rgb, w, h };
    const target = draftTarget(spec, height, width);
    if (target) {
      const [th, tw] = target;
      const s = isJpeg ? draftScale(w, h, th, tw) : 1;
      if (s > 1) img = boxReduce(img, s);
      const f = reduceFactor(img.w, img.h, th, tw);
      if (f > 1) img = boxReduce(img, f);
    }
    return toInput(pixels(img, spec, height, width), spec);
  }

  // Preprocessing.to_scores on one image's outputs (float32 in; softmax and sigmoid in
  // doubles, as numpy's float64).
  function toScores(raw, spec) {
    let values = Array.from(raw, (v) => Math.fround(Number(v))).slice(spec.label_offset || 0);
    if (spec.output === "logits") {
      const max = Math.max(...values);
      const e = values.map((v) => Math.exp(v - max));
      const sum = e.reduce((a, b) => a + b, 0);
      values = e.map((v) => Math.fround(v / sum));
    } else if (spec.output === "sigmoid") {
      values = values.map((v) => Math.fround(1.0 / (1.0 + Math.exp(-v))));
    }
    return values;
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
  const state = { model: null, spec: null, session: null, feed: null, loading: null,
    last: null, pending: 0, answered: 0, error: null, refused: null };
  const $ = (id) => document.getElementById(id);

  function loadScript(src, integrity) {
    return new Promise((resolve, reject) => {
      const s = document.createElement("script");
      s.integrity = integrity;
      s.src = src; s.onload = resolve; s.onerror = () => reject(new Error("cannot load " + src));
      document.head.appendChild(s);
    });
  }

  const HALF = () => globalThis.Float16Array;

  // The graph's input as onnxruntime-web sees it -> how the spec's values are fed to it (the
  // server's numpy cast to the graph's dtype); an Error when this page cannot feed it.
  function feedFor(session) {
    const wanted = state.model.onnx.input && state.model.onnx.input.name;
    const name = session.inputNames.includes(wanted) ? wanted : session.inputNames[0];
    const meta = (session.inputMetadata || [])[session.inputNames.indexOf(name)] || {};
    const type = meta.type || state.spec.dtype;
    const output = session.outputNames.includes("probabilities") ? "probabilities"
      : session.outputNames[0];
    const outMeta = (session.outputMetadata || [])[session.outputNames.indexOf(output)] || {};
    if (outMeta.type && !["float32", "float64"].includes(outMeta.type) &&
        !(outMeta.type === "float16" && HALF())) {
      throw new Error("the model's " + outMeta.type + " output");
    }
    let convert;
    if (type === state.spec.dtype) convert = (data) => data;
    else if (type === "float32") convert = (data) => Float32Array.from(data);
    else if (type === "float64") convert = (data) => Float64Array.from(data);
    else if (type === "float16" && HALF()) convert = (data) => HALF().from(data);
    else throw new Error("the model's " + type + " input for " + state.spec.dtype + " pixels");
    return { name, type, output, convert,
      shape: tensorShape(state.spec, state.model.input_size, state.model.onnx.input &&
        state.model.onnx.input.shape) };
  }

  async function loadSession() {
    if (!window.ort) await loadScript(ORT_SCRIPT, ORT_INTEGRITY);
    window.ort.env.wasm.wasmPaths = ORT_DIR;
    window.ort.env.wasm.numThreads = 1; // threads need cross-origin isolation; one is plenty
    // app.js's fetch: with the tab's API key when the service asks for one (README "Access
    // control"); the integrity check is the same.
    const load = window.ClassifierFetch || window.fetch.bind(window);
    const response = await load(state.model.onnx.url, { integrity: state.model.onnx.integrity });
    if (!response.ok) throw new Error("the model answered " + response.status);
    const bytes = new Uint8Array(await response.arrayBuffer());
    const session = await window.ort.InferenceSession.create(bytes,
      { executionProviders: ["wasm"] });
    state.feed = feedFor(session);
    return session;
  }

  function rank(scores) {
    const values = toScores(scores, state.spec);
    return state.model.labels.map((label, i) => ({ label, score: Math.round(values[i] * 1e6) / 1e6 }))
      .sort((a, b) => b.score - a.score); // stable: ties keep label order, as the server's
  }

  // Pixels -> the page's result, as the server would answer (predictions, model, timing).
  async function classifyPixels(imageData, jpeg) {
    const started = performance.now();
    const [h, w] = state.model.input_size;
    const feed = state.feed;
    const data = feed.convert(toModelInput(imageData, h, w, jpeg, state.spec));
    const input = new window.ort.Tensor(feed.type, data, feed.shape);
    const outputs = await state.session.run({ [feed.name]: input });
    const result = { predictions: rank(outputs[feed.output].data),
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
    const spec = specOf(model);
    const why = unsupported(spec, model.input_size, model.onnx.input && model.onnx.input.shape);
    if (why) { // the switch stays hidden: pictures go to the server
      state.refused = why;
      console.info("not offering in-browser mode: " + why);
      return;
    }
    const runtime = await fetch(ORT_SCRIPT, { method: "HEAD" }).catch(() => null);
    if (!runtime || !runtime.ok) return;
    state.model = model;
    state.spec = spec;
    const toggle = $("in-browser");
    toggle.addEventListener("change", () => setActive(toggle.checked));
    $("in-browser-panel").hidden = false;
    watchCanvas();
  }

  // ``last``: the latest in-browser answer; ``pending``: canvas classifications still to come;
  // ``answered``: how many answers (results or errors) so far; ``error``: the latest one's
  // error; ``refused``: why the switch is not offered (null when it is, or there is no ONNX).
  window.InBrowser = { offer, active, classifyBlob, toModelInput, decode, unsupported,
    get last() { return state.last; }, get pending() { return state.pending; },
    get answered() { return state.answered; }, get error() { return state.error; },
    get refused() { return state.refused; } };
})();
