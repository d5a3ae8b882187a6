"use strict";
// The reading page: one case at a time from the server's state, the image on a canvas with
// window/level, zoom and pan, the answer posted as JSON. Keys: R/S call, 1-5 confidence, Enter submit,
// 0 reset view. The server decides which case is next, so a reload resumes where the reader left off.
const base = location.pathname.replace(/\/+$/, "");
const $ = (id) => document.getElementById(id);
const canvas = $("image");
const context = canvas.getContext("2d");
const windowed = document.createElement("canvas");
let state = null;
let grey = null;  // the image's 8-bit grey values
let answer = { call: null, confidence: null };
let view = { zoom: 1, x: 0, y: 0 };
let shownAt = 0;
let busy = false;

async function api(path, options) {
  const response = await fetch(base + path, Object.assign({ cache: "no-store" }, options));
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try { message = (await response.json()).error; } catch (ignored) { /* not JSON */ }
    const error = new Error(message);
    error.status = response.status;
    throw error;
  }
  return response;
}

function show(section) {
  for (const id of ["questions", "done", "closed"]) $(id).hidden = id !== section;
}

function showError(message) {
  $("error").textContent = message || "";
  $("error").hidden = !message;
}

function buildFindings(labels) {
  const box = $("findings");
  if (box.childElementCount) return;
  for (const label of labels) {
    const row = document.createElement("label");
    const input = document.createElement("input");
    input.type = "checkbox";
    input.value = label;
    row.append(input, " " + label.replace("_", " "));
    box.append(row);
  }
}

function resetAnswer() {
  answer = { call: null, confidence: null };
  for (const input of document.querySelectorAll("#findings input")) input.checked = false;
  refreshButtons();
}

function refreshButtons() {
  for (const b of document.querySelectorAll("#call button")) b.classList.toggle("selected", b.dataset.call === answer.call);
  for (const b of document.querySelectorAll("#confidence button")) {
    b.classList.toggle("selected", Number(b.dataset.confidence) === answer.confidence);
  }
  $("submit").disabled = busy || answer.call === null || answer.confidence === null;
}

async function load() {
  document.body.removeAttribute("data-case");
  state = await (await api("/state")).json();
  $("title").textContent = state.title;
  $("progress").max = state.total;
  $("progress").value = state.answered;
  if (state.status !== "open") { show("closed"); return; }
  if (!state.case) {
    $("progress-text").textContent = `All ${state.total} cases answered`;
    show("done");
    context.clearRect(0, 0, canvas.width, canvas.height);
    document.body.dataset.case = "done";
    return;
  }
  $("progress-text").textContent = `Case ${state.case.number} of ${state.total} (${state.answered} answered)`;
  $("findings-section").hidden = !state.ask_findings;
  if (state.ask_findings) buildFindings(state.labels);
  resetAnswer();
  const blob = await (await api(`/cases/${state.case.key}/image`)).blob();
  const bitmap = await createImageBitmap(blob);
  windowed.width = bitmap.width;
  windowed.height = bitmap.height;
  const scratch = windowed.getContext("2d");
  scratch.drawImage(bitmap, 0, 0);
  const rgba = scratch.getImageData(0, 0, bitmap.width, bitmap.height).data;
  grey = new Uint8ClampedArray(bitmap.width * bitmap.height);
  for (let i = 0; i < grey.length; i++) grey[i] = rgba[4 * i];
  resetView();
  show("questions");
  shownAt = performance.now();
  document.body.dataset.case = String(state.case.number);
}

function applyWindow() {
  if (!grey) return;
  const width = Number($("window").value), level = Number($("level").value);
  const scratch = windowed.getContext("2d");
  const pixels = scratch.createImageData(windowed.width, windowed.height);
  const low = level - width / 2;
  for (let i = 0; i < grey.length; i++) {
    const v = ((grey[i] - low) / width) * 255;
    pixels.data[4 * i] = pixels.data[4 * i + 1] = pixels.data[4 * i + 2] = v;
    pixels.data[4 * i + 3] = 255;
  }
  scratch.putImageData(pixels, 0, 0);
  draw();
}

function draw() {
  const ratio = window.devicePixelRatio || 1;
  canvas.width = canvas.clientWidth * ratio;
  canvas.height = canvas.clientHeight * ratio;
  context.fillStyle = "#000";
  context.fillRect(0, 0, canvas.width, canvas.height);
  if (!grey) return;
  const scale = Math.min(canvas.width / windowed.width, canvas.height / windowed.height) * view.zoom;
  const w = windowed.width * scale, h = windowed.height * scale;
  context.imageSmoothingEnabled = true;
  context.imageSmoothingQuality = "high";
  context.drawImage(windowed, (canvas.width - w) / 2 + view.x * ratio, (canvas.height - h) / 2 + view.y * ratio, w, h);
}

function resetView() {
  view = { zoom: 1, x: 0, y: 0 };
  $("window").value = 255;
  $("level").value = 128;
  applyWindow();
}

async function submit() {
  if (busy || !state || !state.case || answer.call === null || answer.confidence === null) return;
  busy = true;
  refreshButtons();
  const body = { call: answer.call, confidence: answer.confidence, reading_ms: Math.round(performance.now() - shownAt) };
  if (state.ask_findings) body.findings = [...document.querySelectorAll("#findings input:checked")].map((i) => i.value);
  try {
    await api(`/cases/${state.case.key}/answer`, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    showError("");
  } catch (error) {
    showError(error.message);
  }
  busy = false;
  try { await load(); } catch (error) { showError(error.message); }
}

function choose(kind, value) {
  answer[kind] = value;
  refreshButtons();
}

for (const b of document.querySelectorAll("#call button")) b.addEventListener("click", () => choose("call", b.dataset.call));
for (const b of document.querySelectorAll("#confidence button")) {
  b.addEventListener("click", () => choose("confidence", Number(b.dataset.confidence)));
}
$("submit").addEventListener("click", submit);
$("reset-view").addEventListener("click", resetView);
$("window").addEventListener("input", applyWindow);
$("level").addEventListener("input", applyWindow);
window.addEventListener("resize", draw);

document.addEventListener("keydown", (event) => {
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  const key = event.key.toLowerCase();
  if (key === "r") choose("call", "real");
  else if (key === "s") choose("call", "synthetic");
  else if (["1", "2", "3", "4", "5"].includes(key)) choose("confidence", Number(key));
  else if (key === "enter") submit();
  else if (key === "0") resetView();
  else return;
  event.preventDefault();
});

let drag = null;
canvas.addEventListener("contextmenu", (event) => event.preventDefault());
canvas.addEventListener("mousedown", (event) => {
  drag = { x: event.clientX, y: event.clientY, windowing: event.button === 2 || event.shiftKey };
});
window.addEventListener("mouseup", () => { drag = null; });
window.addEventListener("mousemove", (event) => {
  if (!drag) return;
  const dx = event.clientX - drag.x, dy = event.clientY - drag.y;
  drag.x = event.clientX;
  drag.y = event.clientY;
  if (drag.windowing) {
    $("window").value = Number($("window").value) + dx;
    $("level").value = Number($("level").value) - dy;
    applyWindow();
  } else {
    view.x += dx;
    view.y += dy;
    draw();
  }
});
canvas.addEventListener("wheel", (event) => {
  event.preventDefault();
  view.zoom = Math.min(16, Math.max(0.5, view.zoom * Math.exp(-event.deltaY * 0.0015)));
  draw();
}, { passive: false });
canvas.addEventListener("dblclick", resetView);

load().catch((error) => showError(error.message));
