// The web page: drop, pick, paste, URL or draw -> POST/GET /classify -> ranked bars.
// Plain JavaScript, no dependencies: the page works offline.
(function () {
  "use strict";

  const $ = (id) => document.getElementById(id);
  const fileInput = $("file"), drop = $("drop"), urlForm = $("url-form"), urlInput = $("url");
  const canvas = $("canvas"), ctx = canvas.getContext("2d");
  const preview = $("preview"), statusEl = $("status"), errorEl = $("error");
  const bars = $("bars"), meta = $("meta");
  const buttons = document.querySelectorAll("main button");  // not the key form's

  // API error codes in plain words, from the server's own list (common/errors.py: catalogue(),
  // in this script tag's data-error-messages: the page has no inline script, see its CSP);
  // the server's technical message is the fallback for a code the list lacks.
  const MESSAGES = JSON.parse(document.currentScript.dataset.errorMessages || "{}");

  // API keys (README "Access control"). Every API call of the page goes through apiFetch,
  // which sends the key this tab holds (sessionStorage: gone with the tab, never in
  // localStorage, a URL or the page beyond the form's field) as X-API-Key. A 401 shows the key
  // form and waits: the request is sent again with the key typed there, and again while the
  // service answers 401 (then the form says the key was not accepted). 403 forbidden_scope is
  // for the caller to show (the key lacks the scope).
  const KEY_ITEM = "classifier-api-key";
  const keyForm = $("key-form"), keyInput = $("api-key"), keyNote = $("key-note");
  const keyState = $("key-state"), keyForget = $("key-forget");
  let keyWaiters = [];  // resolve() of each request waiting for a key

  function storedKey() {
    try { return sessionStorage.getItem(KEY_ITEM); } catch (e) { return null; }
  }
  function showKeyState(text) {
    keyForget.hidden = !storedKey();
    keyState.textContent = text;
  }
  function askForKey(message) {
    keyNote.textContent = message;
    if (keyForm.hidden) {
      keyForm.hidden = false;
      keyInput.focus();
    }
    return new Promise((resolve) => keyWaiters.push(resolve));
  }
  keyForm.addEventListener("submit", (e) => {
    e.preventDefault();
    const key = keyInput.value.trim();
    keyInput.value = "";
    if (!key) { keyNote.textContent = "Type or paste your API key first."; return; }
    if (!/^[\x21-\x7e]+$/.test(key)) {  // what a header can carry, and every key is
      keyNote.textContent = "An API key has letters, digits and punctuation only, no spaces.";
      return;
    }
    try { sessionStorage.setItem(KEY_ITEM, key); } catch (err) { /* storage off: no retry */ }
    keyForm.hidden = true;
    showKeyState("Using your API key in this tab.");
    const waiting = keyWaiters;
    keyWaiters = [];
    waiting.forEach((resolve) => resolve());
  });
  keyForget.addEventListener("click", () => {
    try { sessionStorage.removeItem(KEY_ITEM); } catch (e) { /* nothing stored */ }
    showKeyState("The key is forgotten; the page asks again when the service needs one.");
  });
  if (storedKey()) showKeyState("Using your API key in this tab.");

  async function apiFetch(url, options) {
    const send = (key) => {
      const headers = Object.assign({}, (options && options.headers) || {});
      if (key) headers["X-API-Key"] = key;
      return fetch(url, Object.assign({}, options || {}, { headers: headers }));
    };
    let key = storedKey();
    let response = await send(key);
    while (response.status === 401) {
      let message = "This service needs an API key. Enter it to go on.";
      if (key) {  // sent and refused: forget it, unless another key came meanwhile
        if (storedKey() === key) sessionStorage.removeItem(KEY_ITEM);
        showKeyState("");
        message = "The API key was not accepted. Check it and try again.";
      }
      if (!storedKey()) await askForKey(message);
      key = storedKey();
      if (!key) return response;  // sessionStorage unusable: show the 401 as it is
      response = await send(key);
    }
    return response;
  }
  window.ClassifierFetch = apiFetch;

  // What a refusal means in the page's words: the catalogue's, with the scope a 403 missed.
  function refusal(err, scopeWords) {
    if (err && err.code === "forbidden_scope" && scopeWords) {
      return "Your API key does not allow " + scopeWords + ". Ask for a key that does.";
    }
    return (err && MESSAGES[err.code]) || (err && err.message) || null;
  }

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
      const response = await apiFetch("/feedback", {
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
    done.textContent = refusal(answer && answer.error, "sending feedback") ||
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
        showError(refusal(body && body.error, "classifying pictures") ||
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
    call(apiFetch("/classify", { method: "POST", body: form }), "Classifying…");
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
    call(apiFetch("/classify?image_url=" + encodeURIComponent(address)), "Downloading and classifying…");
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
  apiFetch("/model").then((r) => (r.ok ? r.json() : null)).then((model) => {
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
    if (ev.confusion_matrix) {
      showConfusion(ev.confusion_matrix);
    } else if (ev.confusion_matrix_png) {  // fetched with the key, shown from a blob: URL
      apiFetch("/model/confusion_matrix.png").then((r) => (r.ok ? r.blob() : null)).then((png) => {
        if (!png) return;
        const img = $("confusion");
        img.src = URL.createObjectURL(png);
        img.hidden = false;
      }).catch(() => {});
    }
    $("evaluation").hidden = false;
  }).catch(() => {});

  // The confusion matrix as a table: rows the true labels, columns the predicted ones; each
  // cell shaded by its share of the row (blue on the diagonal, red off it), as the PNG was.
  // A column's label is one line read bottom to top (style.css; cut short with "…" when long,
  // whole in its title and in the row headers).
  function showConfusion(matrix) {
    const labels = matrix.labels, rows = matrix.rows_true_columns_predicted;
    const cell = (tag, text, className) => Object.assign(document.createElement(tag),
      { textContent: text, className: className || "" });
    const table = document.createElement("table");
    table.className = "confusion";
    table.append(cell("caption", "Test images by true label (rows) and predicted label (columns)"));
    const head = document.createElement("tr");
    head.append(cell("th", "true ↓ predicted →", "corner"));  // wraps: the columns are narrow
    for (const label of labels) {
      const th = cell("th", "", "predicted");
      th.scope = "col";
      th.title = "predicted " + label;
      th.append(cell("span", label, "col-label"));
      head.append(th);
    }
    table.createTHead().append(head);
    const body = table.createTBody();
    rows.forEach((counts, i) => {
      const tr = document.createElement("tr");
      const th = cell("th", labels[i], "truth");
      th.scope = "row";
      tr.append(th);
      const total = counts.reduce((a, b) => a + b, 0);
      counts.forEach((count, j) => {
        const share = total ? count / total : 0;
        const td = cell("td", String(count), i === j ? "diagonal" : "");
        td.title = labels[i] + " predicted as " + labels[j] + ": " + count;
        td.style.backgroundColor = i === j
          ? "rgb(" + Math.round(255 - 200 * share) + "," + Math.round(255 - 120 * share) + ",255)"
          : "rgb(255," + Math.round(255 - 200 * share) + "," + Math.round(255 - 200 * share) + ")";
        if (share >= 0.6) td.classList.add("deep");
        tr.append(td);
      });
      body.append(tr);
    });
    const box = $("confusion-table");
    box.replaceChildren(table);
    box.hidden = false;
  }
})();
