// The web page: drop, pick, paste, URL or draw -> POST/GET /classify -> ranked bars.
// Plain JavaScript, no dependencies: the page works offline.
(function () {
  "use strict";

  const $ = (id) => document.getElementById(id);
  const fileInput = $("file"), drop = $("drop"), urlForm = $("url-form"), urlInput = $("url");
  const canvas = $("canvas"), ctx = canvas.getContext("2d");
  const preview = $("preview"), statusEl = $("status"), errorEl = $("error");
  const bars = $("bars"), meta = $("meta");
  const buttons = document.querySelectorAll("button");

  // API error codes in plain words, from the server's own list (common/errors.py: catalogue(),
  // in this script tag's data-error-messages: the page has no inline script, see its CSP);
  // the server's technical message is the fallback for a code the list lacks.
  const MESSAGES = JSON.parse(document.currentScript.dataset.errorMessages || "{}");

  function setBusy(busy, text) {
    buttons.forEach((b) => { b.disabled = busy; });
    if (text) statusEl.textContent = text;
  }

  function showError(message) {
    hideFeedback();
    errorEl.textContent = message;
    errorEl.hidden = false;
    bars.innerHTML = "";
    meta.textContent = "";
    statusEl.textContent = "Something went wrong.";
  }

  // ``where``: "in your browser" for results of the in-browser mode (inbrowser.js).
  function showResult(body, where) {
    errorEl.hidden = true;
    bars.innerHTML = "";
    for (const p of body.predictions) {
      const pct = (p.score * 100);
      const li = document.createElement("li");
      const label = document.createElement("span");
      label.className = "label";
      label.textContent = p.label;
      const track = document.createElement("span");
      track.className = "track";
      track.setAttribute("aria-hidden", "true");
      const fill = document.createElement("span");
      fill.className = "fill";
      fill.style.display = "block";
      fill.style.width = Math.max(0, Math.min(100, pct)).toFixed(1) + "%";
      track.appendChild(fill);
      const value = document.createElement("span");
      value.className = "pct";
      value.textContent = (pct >= 10 ? pct.toFixed(0) : pct.toFixed(1)) + "%";
      li.append(label, track, value);
      li.setAttribute("aria-label", p.label + " " + value.textContent);
      bars.appendChild(li);
    }
    const top = body.predictions[0];
    statusEl.textContent = top ? "It looks like: " + top.label : "No label passed the threshold.";
    meta.textContent = "Model " + body.model.name + " v" + body.model.version +
      " · " + (where || "on the server") + ", " + body.elapsed_ms.toFixed(1) + " ms";
    offerFeedback(body);
  }

  // "Wrong? It is a ...": one button per other label of the model; POST /feedback keeps the
  // stored upload (``filename``; results made in the browser have none) under the right label.
  const feedbackBox = $("feedback");  // absent when the server takes no feedback
  let modelLabels = null;  // from /model, once it has answered

  function hideFeedback() {
    if (feedbackBox) feedbackBox.hidden = true;
  }

  function offerFeedback(body) {
    hideFeedback();
    if (!feedbackBox || !body.filename) return;
    const top = body.predictions[0];
    const labels = (modelLabels || body.predictions.map((p) => p.label))
      .filter((label) => !top || label !== top.label);
    if (!labels.length) return;
    const group = $("feedback-labels"), done = $("feedback-done");
    group.innerHTML = "";
    done.textContent = "";
    $("feedback-ask").textContent = top ? "Wrong? It is a …" : "What is it? It is a …";
    for (const label of labels) {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "secondary";
      button.textContent = label;
      button.addEventListener("click", () => sendFeedback(body, label, top, group, done));
      group.appendChild(button);
    }
    feedbackBox.hidden = false;
  }

  async function sendFeedback(body, label, top, group, done) {
    group.querySelectorAll("button").forEach((b) => { b.disabled = true; });
    done.textContent = "Sending…";
    let answer = null, ok = false;
    try {
      const response = await fetch("/feedback", {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ filename: body.filename, label: label,
          predicted: top ? top.label : null, score: top ? top.score : null }),
      });
      ok = response.ok;
      try { answer = await response.json(); } catch (e) { answer = null; }
    } catch (e) {
      answer = null;
    }
    if (ok && answer) {
      const folder = answer.saved.slice(0, answer.saved.lastIndexOf("/") + 1);
      done.textContent = "Thank you! Saved as an example of “" + answer.label + "” in " +
        folder + " for the next retraining.";
      return;
    }
    const err = answer && answer.error;
    done.textContent = (err && MESSAGES[err.code]) || (err && err.message) ||
      "Could not send your answer. Try again.";
    group.querySelectorAll("button").forEach((b) => { b.disabled = false; });
  }

  async function call(request, busyText) {
    setBusy(true, busyText);
    try {
      const response = await request;
      let body = null;
      try { body = await response.json(); } catch (e) { body = null; }
      if (response.ok && body) {
        showResult(body);
      } else {
        const err = body && body.error;
        showError((err && MESSAGES[err.code]) || (err && err.message) ||
                  "The server answered " + response.status + ".");
      }
    } catch (e) {
      showError("Could not reach the service. Check your connection and try again.");
    } finally {
      setBusy(false);
    }
  }

  function classifyBlob(blob, name) {
    if (!blob) return;
    preview.src = URL.createObjectURL(blob);
    preview.hidden = false;
    if (inBrowserTakes(blob)) return;
    const form = new FormData();
    form.append("image", blob, name || "image");
    call(fetch("/classify", { method: "POST", body: form }), "Classifying…");
  }

  // The in-browser mode (inbrowser.js) classifies instead of the server while it is switched on.
  function inBrowserTakes(blob) {
    if (!(window.InBrowser && window.InBrowser.active())) return false;
    window.InBrowser.classifyBlob(blob);
    return true;
  }
  window.ClassifierPage = { showResult, showError };

  // Pick a file (the drop zone is the input's label, so it is keyboard-accessible too).
  fileInput.addEventListener("change", () => {
    if (fileInput.files.length) classifyBlob(fileInput.files[0], fileInput.files[0].name);
  });

  // Drag and drop.
  ["dragenter", "dragover"].forEach((type) => drop.addEventListener(type, (e) => {
    e.preventDefault();
    drop.classList.add("over");
  }));
  ["dragleave", "drop"].forEach((type) => drop.addEventListener(type, () => drop.classList.remove("over")));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    const file = e.dataTransfer && e.dataTransfer.files[0];
    if (file) classifyBlob(file, file.name);
  });

  // Paste from the clipboard anywhere on the page.
  document.addEventListener("paste", (e) => {
    const items = (e.clipboardData && e.clipboardData.items) || [];
    for (const item of items) {
      if (item.kind === "file" && item.type.startsWith("image/")) {
        e.preventDefault();
        classifyBlob(item.getAsFile(), "pasted");
        return;
      }
    }
  });

  // An image address.
  urlForm.addEventListener("submit", (e) => {
    e.preventDefault();
    const address = urlInput.value.trim();
    if (!address) { showError("Type or paste an image address first."); return; }
    preview.hidden = true;
    call(fetch("/classify?image_url=" + encodeURIComponent(address)), "Downloading and classifying…");
  });

  // Drawing canvas: pointer events cover mouse, pen and touch.
  function clearCanvas() {
    ctx.fillStyle = "#ffffff";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
  }
  clearCanvas();
  ctx.lineCap = "round";
  ctx.lineJoin = "round";
  ctx.strokeStyle = "#111111";
  // Stroke width in canvas pixels (the canvas is 280 x 280 whatever its size on screen): 12 is
  // 1/23 of the side, about 3 pixels of a 64 x 64 model input. A pen's pressure scales it
  // (0.5, a mouse's pressure, gives 12).
  const LINE_WIDTH = 12;
  let drawing = false, drawn = false, last = null;

  function point(e) {
    const r = canvas.getBoundingClientRect();
    return [(e.clientX - r.left) * canvas.width / r.width, (e.clientY - r.top) * canvas.height / r.height];
  }
  function segment(e, from, to) {
    const pressure = e.pointerType === "pen" && e.pressure > 0 ? e.pressure : 0.5;
    ctx.lineWidth = Math.max(1, LINE_WIDTH * 2 * pressure);
    ctx.beginPath();
    ctx.moveTo(from[0], from[1]);
    ctx.lineTo(to[0], to[1]);
    ctx.stroke();
  }
  canvas.addEventListener("pointerdown", (e) => {
    drawing = true;
    drawn = true;
    canvas.setPointerCapture && canvas.setPointerCapture(e.pointerId);
    last = point(e);
    segment(e, last, [last[0] + 0.01, last[1]]);
  });
  canvas.addEventListener("pointermove", (e) => {
    if (!drawing) return;
    const p = point(e);
    segment(e, last, p);
    last = p;
  });
  ["pointerup", "pointercancel", "pointerleave"].forEach((type) =>
    canvas.addEventListener(type, () => { drawing = false; }));

  $("draw-clear").addEventListener("click", () => {
    clearCanvas();
    drawn = false;
    statusEl.textContent = "Canvas cleared.";
  });
  $("draw-classify").addEventListener("click", () => {
    if (!drawn) { showError("Draw something first."); return; }
    canvas.toBlob((blob) => classifyBlob(blob, "drawing.png"), "image/png");
  });

  // The model's evaluation summary, when its folder has one.
  fetch("/model").then((r) => (r.ok ? r.json() : null)).then((model) => {
    if (!model) return;
    if (window.InBrowser) window.InBrowser.offer(model);
    modelLabels = model.labels;
    $("model-name").innerHTML = "";
    $("model-name").append("Model ", Object.assign(document.createElement("strong"), { textContent: model.name }),
      " v" + model.version + " · " + model.labels.length + " labels");
    const ev = model.evaluation;
    if (!ev || ev.accuracy == null) return;
    $("eval-summary").textContent = "Accuracy " + (ev.accuracy * 100).toFixed(1) + "% on " +
      ev.test_images + " test images it never saw in training" +
      (ev.extra_tests || []).filter((t) => t.accuracy != null).map((t) =>
        "; " + (t.accuracy * 100).toFixed(1) + "% on " + t.images + " " + t.name +
        (t.description ? " (" + t.description + ")" : "")).join("") + ".";
    if (ev.confusion_matrix_png) {
      const img = $("confusion");
      img.src = "/model/confusion_matrix.png";
      img.hidden = false;
    }
    $("evaluation").hidden = false;
  }).catch(() => {});
})();
