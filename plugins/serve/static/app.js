// The charrnn playground: a client of the server's public API only (/v1/models,
// /v1/models/{id}/metrics, /v1/completions). No framework, no network beyond this server.
"use strict";

const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";

const state = {
  models: [],
  controller: null, // AbortController of the running generation
  probsController: null, // AbortController of the pending next-character request
  probsTimer: 0,
};

// ---- API -------------------------------------------------------------------------------

class ApiError extends Error {}

// The message of an OpenAI-style error body, or a line naming the HTTP status.
async function errorMessage(response) {
  let message = `${response.status} ${response.statusText}`.trim();
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (_) {
    // not JSON: keep the status line
  }
  return message;
}

async function api(path, body, signal) {
  const options = body === undefined ? { signal } : {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
    signal,
  };
  const response = await fetch(path, options);
  if (!response.ok) throw new ApiError(await errorMessage(response));
  return response;
}

// Yields the `data:` payload of each server-sent event in a streamed response body.
// (EventSource cannot POST, so the stream is parsed here.)
async function* sseData(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, "")).join("\n");
      if (data) yield data;
    }
  }
}

// ---- models ----------------------------------------------------------------------------

function currentModel() {
  return state.models.find((m) => m.id === $("model").value);
}

async function loadModels() {
  try {
    const body = await (await api("/v1/models")).json();
    state.models = body.data || [];
  } catch (err) {
    showError(`Could not list the models: ${err.message}`);
    return;
  }
  const select = $("model");
  select.replaceChildren(...state.models.map((m) => new Option(m.id, m.id)));
  if (!state.models.length) {
    showError("The server serves no model.");
    return;
  }
  applyModel();
}

function applyModel() {
  const model = currentModel();
  if (!model) return;
  const info = model.charrnn || {};
  $("model-info").textContent =
    [info.model_type, info.vocab_size && `${info.vocab_size} characters`, info.encoding]
      .filter(Boolean).join(" · ");
  const defaults = info.default_sampler || {};
  const samplers = info.samplers && info.samplers.length ? info.samplers : [defaults.type || "temperature"];
  $("sampler").replaceChildren(...samplers.map((s) => new Option(s.replace(/_/g, "-"), s)));
  if (defaults.type && samplers.includes(defaults.type)) $("sampler").value = defaults.type;
  if (typeof defaults.temperature === "number") $("temperature").value = defaults.temperature;
  const k = defaults.k ?? defaults.top_k;
  const p = defaults.p ?? defaults.top_p;
  $("top-k").value = typeof k === "number" ? k : "";
  $("top-p").value = typeof p === "number" ? p : "";
  syncControls();
  hideError();
  loadCurve(model);
  scheduleProbs();
}

// Options a sampler does not use are disabled, so what is sent is what is shown.
function syncControls() {
  const sampler = $("sampler").value;
  $("temperature-value").textContent = Number($("temperature").value).toFixed(2);
  $("temperature").disabled = sampler === "greedy" || sampler === "beam";
  $("top-k").disabled = sampler !== "top_k";
  $("top-p").disabled = sampler !== "top_p";
}

// ---- generation ------------------------------------------------------------------------

function requestBody() {
  const body = {
    model: $("model").value,
    prompt: $("prompt").value,
    max_tokens: Number($("length").value) || 1,
    stream: true,
    sampler: $("sampler").value,
  };
  if (!$("temperature").disabled) body.temperature = Number($("temperature").value);
  if (!$("top-k").disabled && $("top-k").value !== "") body.top_k = Number($("top-k").value);
  if (!$("top-p").disabled && $("top-p").value !== "") body.top_p = Number($("top-p").value);
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  return body;
}

function setRunning(running) {
  $("generate").disabled = running;
  $("stop").disabled = !running;
  $("continue").disabled = running || !$("output-text").textContent;
  $("output").classList.toggle("running", running);
}

async function generate(event) {
  event.preventDefault();
  if (state.controller) return;
  clearTimeout(state.probsTimer); // a pending "after the cursor" update must not replace the result's
  hideError();
  const body = requestBody();
  const out = $("output-text");
  $("output-seed").textContent = body.prompt;
  out.textContent = "";
  const controller = new AbortController();
  state.controller = controller;
  setRunning(true);
  setStatus("Generating…");
  const started = performance.now();
  let chars = 0;
  let finish = null;
  try {
    const response = await api("/v1/completions", body, controller.signal);
    for await (const data of sseData(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ApiError(chunk.error.message || "generation failed");
      const choice = (chunk.choices || [])[0];
      if (!choice) continue;
      if (choice.text) {
        out.append(choice.text);
        chars += [...choice.text].length;
        setStatus(`Generating… ${chars} characters`);
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    }
    const seconds = (performance.now() - started) / 1000;
    const reason = finish === "stop" ? ", stop sequence" : "";
    setStatus(`Done: ${chars} characters in ${seconds.toFixed(1)} s${reason}`);
  } catch (err) {
    if (controller.signal.aborted) {
      setStatus(`Stopped after ${chars} characters`);
    } else {
      showError(err instanceof ApiError ? err.message : `The server could not be reached (${err.message}).`);
      setStatus(chars ? `Failed after ${chars} characters` : "Failed");
    }
  } finally {
    state.controller = null;
    setRunning(false);
  }
  if (chars) showProbs(body.prompt + out.textContent, "after the generated text");
}

function stop() {
  if (state.controller) state.controller.abort();
}

function useAsSeed() {
  const prompt = $("prompt");
  prompt.value = $("output-seed").textContent + $("output-text").textContent;
  $("output-seed").textContent = "";
  $("output-text").textContent = "";
  setRunning(false);
  prompt.focus();
  prompt.setSelectionRange(prompt.value.length, prompt.value.length);
  scheduleProbs();
}

// ---- next-character probabilities -------------------------------------------------------

function visible(ch) {
  return { " ": "␣", "\n": "↵", "\t": "⇥", "\r": "␍" }[ch] ?? ch;
}

function describe(ch) {
  return { " ": "space", "\n": "newline", "\t": "tab", "\r": "carriage return" }[ch] ?? `“${ch}”`;
}

function scheduleProbs() {
  clearTimeout(state.probsTimer);
  state.probsTimer = setTimeout(() => {
    const prompt = $("prompt");
    showProbs(prompt.value.slice(0, prompt.selectionStart ?? prompt.value.length), "after the cursor");
  }, 150);
}

async function showProbs(text, where) {
  const model = $("model").value;
  if (!model) return;
  if (state.probsController) state.probsController.abort();
  const controller = new AbortController();
  state.probsController = controller;
  $("probs-where").textContent = where;
  const list = $("probs");
  if (!text) {
    list.replaceChildren(note("Type some text to see what the model expects next."));
    return;
  }
  try {
    const body = { model, prompt: text, max_tokens: 0, logprobs: 10, echo: true };
    const result = await (await api("/v1/completions", body, controller.signal)).json();
    // charrnn's answer to max_tokens 0: the distribution after the prompt (OpenAI's shape has none)
    const lp = result.choices[0].logprobs || {};
    const after = lp.next_top_logprobs || (lp.top_logprobs || []).slice(-1)[0] || {};
    const top = Object.entries(after).sort((a, b) => b[1] - a[1]);
    list.replaceChildren(...top.map(([ch, logprob]) => probItem(ch, Math.exp(logprob))));
    list.dataset.for = text;
  } catch (err) {
    if (!controller.signal.aborted) list.replaceChildren(note(err.message, "error-text"));
  }
}

function note(text, cls = "muted") {
  const li = document.createElement("li");
  li.className = `note ${cls}`;
  li.textContent = text;
  return li;
}

function probItem(ch, p) {
  const li = document.createElement("li");
  const button = document.createElement("button");
  button.type = "button";
  button.className = "prob";
  button.title = `Insert ${describe(ch)} at the cursor`;
  button.setAttribute("aria-label", `${describe(ch)}: ${(100 * p).toFixed(1)} percent`);
  const glyph = document.createElement("span");
  glyph.className = "glyph" + (visible(ch) !== ch ? " special" : "");
  glyph.textContent = visible(ch);
  const bar = document.createElement("span");
  bar.className = "meter";
  const fill = document.createElement("span");
  fill.style.width = `${Math.max(0.5, 100 * p)}%`;
  bar.append(fill);
  const pct = document.createElement("span");
  pct.className = "pct";
  pct.textContent = p >= 0.001 ? `${(100 * p).toFixed(1)}%` : "<0.1%";
  button.append(glyph, bar, pct);
  button.addEventListener("click", () => insertAtCursor(ch));
  li.append(button);
  return li;
}

function insertAtCursor(ch) {
  const prompt = $("prompt");
  const at = prompt.selectionStart ?? prompt.value.length;
  prompt.setRangeText(ch, at, prompt.selectionEnd ?? at, "end");
  prompt.focus();
  scheduleProbs();
}

// ---- loss curve -----------------------------------------------------------------------

// Round ticks from at or below `lo` to at or above `hi`, so the axes hold every point.
function niceTicks(lo, hi, count) {
  if (!(hi > lo)) hi = lo + 1;
  const raw = (hi - lo) / count;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw);
  const ticks = [];
  const first = Math.floor(lo / step + 1e-9), last = Math.ceil(hi / step - 1e-9);
  for (let i = first; i <= last; i++) ticks.push(+(i * step).toPrecision(12));
  return ticks;
}

function el(name, attrs = {}, text) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

async function loadCurve(model) {
  const box = $("curve");
  const noMetrics = () => box.replaceChildren(Object.assign(document.createElement("p"),
    { className: "muted", textContent: "This model has no metrics file beside its checkpoint." }));
  if (!model.charrnn || model.charrnn.has_metrics === false) return noMetrics();
  let rows;
  try {
    rows = (await (await api(`/v1/models/${encodeURIComponent(model.id)}/metrics`)).json()).data || [];
  } catch (err) {
    return noMetrics();
  }
  if (model.id !== $("model").value) return; // the user picked another model meanwhile
  const series = [
    { key: "train_loss", label: "train", cls: "train" },
    { key: "val_loss", label: "validation", cls: "val" },
  ].map((s) => ({ ...s, points: rows.filter((r) => Number.isFinite(r[s.key]) && Number.isFinite(r.step))
    .map((r) => [r.step, r[s.key]]) })).filter((s) => s.points.length);
  if (!series.length) return noMetrics();
  box.replaceChildren(drawCurve(series));
}

function drawCurve(series) {
  const W = 320, H = 210, L = 42, R = 16, T = 24, B = 36;
  const all = series.flatMap((s) => s.points);
  const xs = niceTicks(Math.min(0, ...all.map((p) => p[0])), Math.max(...all.map((p) => p[0])), 5);
  const ys = niceTicks(Math.min(...all.map((p) => p[1])), Math.max(...all.map((p) => p[1])), 4);
  const [x0, x1, y0, y1] = [xs[0], xs[xs.length - 1], ys[0], ys[ys.length - 1]];
  const X = (x) => L + (W - L - R) * (x - x0) / (x1 - x0 || 1);
  const Y = (y) => H - B - (H - T - B) * (y - y0) / (y1 - y0 || 1);
  const last = series.map((s) => `${s.label} ${s.points[s.points.length - 1][1].toFixed(3)}`).join(", ");
  const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", class: "chart",
    "aria-label": `Loss against training step; last: ${last} nats per character` });
  for (const y of ys) {
    svg.append(el("line", { x1: L, x2: W - R, y1: Y(y), y2: Y(y), class: "grid" }));
    svg.append(el("text", { x: L - 6, y: Y(y) + 4, class: "tick", "text-anchor": "end" }, String(y)));
  }
  for (const x of xs) {
    svg.append(el("line", { x1: X(x), x2: X(x), y1: H - B, y2: H - B + 4, class: "axis" }));
    svg.append(el("text", { x: X(x), y: H - B + 17, class: "tick", "text-anchor": "middle" },
      x >= 1000 ? `${x / 1000}k` : String(x)));
  }
  svg.append(el("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis" }));
  svg.append(el("text", { x: (L + W - R) / 2, y: H - 4, class: "label", "text-anchor": "middle" }, "step"));
  svg.append(el("text", { x: 12, y: (T + H - B) / 2, class: "label", "text-anchor": "middle",
    transform: `rotate(-90 12 ${(T + H - B) / 2})` }, "loss (nats/char)"));
  series.forEach((s, i) => {
    const d = s.points.map((p, j) => `${j ? "L" : "M"}${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`).join("");
    svg.append(el("path", { d, class: `line ${s.cls}` }));
    if (s.points.length === 1) {
      svg.append(el("circle", { cx: X(s.points[0][0]), cy: Y(s.points[0][1]), r: 3, class: `dot ${s.cls}` }));
    }
    const lx = L + i * 70;
    svg.append(el("line", { x1: lx, x2: lx + 16, y1: 9, y2: 9, class: `line ${s.cls}` }));
    svg.append(el("text", { x: lx + 21, y: 13, class: "legend" }, s.label));
  });
  return svg;
}

// ---- status and errors -------------------------------------------------------------------

function setStatus(text) {
  $("status").textContent = text;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = false;
}

function hideError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

// ---- wiring --------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("controls").addEventListener("submit", generate);
  $("stop").addEventListener("click", stop);
  $("continue").addEventListener("click", useAsSeed);
  $("model").addEventListener("change", applyModel);
  $("sampler").addEventListener("change", syncControls);
  $("temperature").addEventListener("input", syncControls);
  for (const type of ["input", "click", "keyup", "focus"]) $("prompt").addEventListener(type, scheduleProbs);
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("controls").requestSubmit();
  });
  loadModels();
});
