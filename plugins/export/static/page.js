// charrnn export: a trained charrnn model run by this page in plain JavaScript, with nothing
// fetched. The model is the JSON in #charrnn-model: stacked recurrent layers in the conventions
// of ONNX's RNN, LSTM and GRU operators (charrnn.types.ExportLayer) and their weights as one
// base64 string of float32. The arithmetic runs in float64 over those float32 weights.
//
// window.charrnn, for other scripts:
//   vocab, encoding ("utf-8", or "bytes": the 256 byte values, text as UTF-8), info
//   nextLogProbs(text): the log-probabilities (length V) of the next symbol after `text`, from
//     the zero state (an empty text primes with a newline, as charrnn does)
//   generate({seed_text, num_chars, sampler: "greedy" | "temperature" | "top_k", temperature,
//     top_k, seed, onText, signal}): a Promise of the text generated after seed_text; onText(piece)
//     sees it as it grows, an AbortSignal stops it (the Promise then rejects with an AbortError).
"use strict";

(() => {
  const GATES = { RNN: 1, LSTM: 4, GRU: 3 };
  const SLICE_MS = 12; // work between two yields to the event loop, so the page stays responsive
  const SLICE_IDS = 256; // and at most this many symbols, so the text appears as it is made

  // ---- the network ---------------------------------------------------------------------

  // The float32 arrays of a base64 string of little-endian float32.
  function floatsOf(base64, count) {
    const bytes = atob(base64);
    const view = new Uint8Array(count * 4);
    for (let i = 0; i < view.length; i++) view[i] = bytes.charCodeAt(i);
    const littleEndian = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;
    if (littleEndian) return new Float32Array(view.buffer);
    const data = new DataView(view.buffer);
    return Float32Array.from({ length: count }, (_, i) => data.getFloat32(4 * i, true));
  }

  const sigmoid = (a) => 1 / (1 + Math.exp(-a));

  // out[r] = bias[r] + M[r, :] . x for a (rows, cols) row-major M; four partial sums per row.
  function affine(M, rows, cols, x, bias, out) {
    const tail = cols - (cols % 4);
    for (let r = 0, row = 0; r < rows; r++, row += cols) {
      let a0 = 0, a1 = 0, a2 = 0, a3 = 0, c = 0;
      for (; c < tail; c += 4) {
        a0 += M[row + c] * x[c];
        a1 += M[row + c + 1] * x[c + 1];
        a2 += M[row + c + 2] * x[c + 2];
        a3 += M[row + c + 3] * x[c + 3];
      }
      for (; c < cols; c++) a0 += M[row + c] * x[c];
      out[r] = bias[r] + ((a0 + a1) + (a2 + a3));
    }
  }

  // One time step of each cell from xw = W x + Wb and hr = R h + Rb (gate blocks in ONNX's order).
  const CELLS = {
    RNN(layer, s) {
      const { H, xw, hr } = layer;
      const h = s.h;
      for (let j = 0; j < H; j++) h[j] = Math.tanh(xw[j] + hr[j]);
    },
    LSTM(layer, s) { // [i, o, f, c]
      const { H, xw, hr } = layer;
      const h = s.h, c = s.c;
      for (let j = 0; j < H; j++) {
        const i = sigmoid(xw[j] + hr[j]);
        const o = sigmoid(xw[H + j] + hr[H + j]);
        const f = sigmoid(xw[2 * H + j] + hr[2 * H + j]);
        const g = Math.tanh(xw[3 * H + j] + hr[3 * H + j]);
        c[j] = f * c[j] + i * g;
        h[j] = o * Math.tanh(c[j]);
      }
    },
    GRU(layer, s) { // [z, r, h], linear_before_reset: the reset gate multiplies R_h h + Rb_h
      const { H, xw, hr } = layer;
      const h = s.h;
      for (let j = 0; j < H; j++) {
        const z = sigmoid(xw[j] + hr[j]);
        const r = sigmoid(xw[H + j] + hr[H + j]);
        const n = Math.tanh(xw[2 * H + j] + r * hr[2 * H + j]);
        h[j] = (1 - z) * n + z * h[j];
      }
    },
  };

  class Network {
    constructor(spec) {
      const floats = floatsOf(spec.weights, spec.floats);
      const take = (ref) => floats.subarray(ref.offset, ref.offset + ref.shape.reduce((a, b) => a * b, 1));
      this.layers = spec.layers.map((l) => {
        const G = GATES[l.op] * l.hidden;
        return {
          op: l.op, H: l.hidden, I: l.inputs, G, cell: CELLS[l.op],
          E: l.E ? take(l.E) : null, W: l.W ? take(l.W) : null,
          R: take(l.R), Wb: take(l.Wb), Rb: take(l.Rb),
          xw: new Float64Array(G), hr: new Float64Array(G), // scratch, used within one step only
        };
      });
      this.WhyT = take(spec.WhyT);
      this.by = take(spec.by);
      this.V = this.by.length;
    }

    zeroState() {
      return this.layers.map((l) => ({ h: new Float64Array(l.H), c: l.op === "LSTM" ? new Float64Array(l.H) : null }));
    }

    // Feed `id`: advances `state` and writes the next symbol's logits (length V) into `out`.
    step(state, id, out) {
      let x = null;
      for (let n = 0; n < this.layers.length; n++) {
        const layer = this.layers[n], s = state[n];
        if (n === 0) {
          const { E, Wb, G, xw } = layer;
          for (let g = 0, row = id * G; g < G; g++) xw[g] = E[row + g] + Wb[g]; // the one-hot product
        } else {
          affine(layer.W, layer.G, layer.I, x, layer.Wb, layer.xw);
        }
        affine(layer.R, layer.G, layer.H, s.h, layer.Rb, layer.hr);
        layer.cell(layer, s);
        x = s.h;
      }
      affine(this.WhyT, this.V, x.length, x, this.by, out);
    }
  }

  // ---- symbols ---------------------------------------------------------------------------

  class Symbols {
    constructor(vocab, encoding) {
      this.vocab = vocab;
      this.bytes = encoding === "bytes";
      this.index = new Map(vocab.map((symbol, id) => [symbol, id]));
    }

    // The ids of `text`; a character outside the vocabulary is an error that names it.
    encode(text) {
      if (this.bytes) return Array.from(new TextEncoder().encode(text));
      const ids = [];
      for (const ch of text) {
        const id = this.index.get(ch);
        if (id === undefined) {
          const code = ch.codePointAt(0).toString(16).toUpperCase().padStart(4, "0");
          throw new Error(`character ${JSON.stringify(ch)} (U+${code}) is not in the model's vocabulary`);
        }
        ids.push(id);
      }
      return ids;
    }

    // The ids that prime the state: the text, or a newline (else id 0) when it is empty.
    start(text) {
      if (text) return this.encode(text);
      return [this.bytes ? 10 : (this.index.get("\n") ?? 0)];
    }

    // A function from generated ids to text; byte models decode UTF-8 across calls, with
    // U+FFFD for invalid bytes, and `final` flushes a character cut short.
    decoder() {
      if (!this.bytes) return (ids) => ids.map((id) => this.vocab[id]).join("");
      const utf8 = new TextDecoder("utf-8");
      return (ids, final) => utf8.decode(Uint8Array.from(ids), { stream: !final });
    }
  }

  // ---- sampling --------------------------------------------------------------------------

  // A uniform [0, 1) generator from an integer seed: xorshift128 (Marsaglia 2003) over four
  // 32-bit words filled from the seed by the murmur3 finalizer; 53 bits per number.
  function uniformFrom(seed) {
    const mix = (v) => {
      v = Math.imul(v ^ (v >>> 16), 0x85ebca6b);
      v = Math.imul(v ^ (v >>> 13), 0xc2b2ae35);
      return (v ^ (v >>> 16)) >>> 0;
    };
    let x = mix((seed >>> 0) ^ 0x9e3779b9);
    let y = mix(x ^ (Math.floor(seed / 4294967296) >>> 0));
    let z = mix(y + 0x6a09e667);
    let w = mix(z ^ 0xbb67ae85);
    if ((x | y | z | w) === 0) w = 1;
    const next = () => {
      const t = x ^ (x << 11);
      x = y; y = z; z = w;
      w = (w ^ (w >>> 19) ^ t ^ (t >>> 8)) >>> 0;
      return w;
    };
    return () => ((next() >>> 5) * 67108864 + (next() >>> 6)) / 9007199254740992;
  }

  // The first largest logit, as numpy's argmax.
  function argmax(z) {
    let best = 0;
    for (let v = 1; v < z.length; v++) if (z[v] > z[best]) best = v;
    return best;
  }

  // An id drawn from softmax(z / temperature) restricted to the topK largest logits (with any
  // tied with the k-th, as charrnn's top_k keeps them). `scratch` is a Float64Array of length V.
  function draw(z, temperature, topK, uniform, scratch) {
    const V = z.length;
    let floor = -Infinity;
    if (topK < V) {
      scratch.set(z);
      scratch.sort();
      floor = scratch[V - topK]; // the k-th largest
    }
    let max = -Infinity;
    for (let v = 0; v < V; v++) if (z[v] >= floor && z[v] > max) max = z[v];
    let total = 0;
    for (let v = 0; v < V; v++) {
      scratch[v] = z[v] >= floor ? Math.exp((z[v] - max) / temperature) : 0;
      total += scratch[v];
    }
    let u = uniform() * total, last = 0;
    for (let v = 0; v < V; v++) {
      if (scratch[v] > 0) {
        last = v;
        u -= scratch[v];
        if (u < 0) return v;
      }
    }
    return last; // u fell past the end by rounding
  }

  function logSoftmax(z) {
    let max = -Infinity;
    for (const v of z) if (v > max) max = v;
    let sum = 0;
    for (const v of z) sum += Math.exp(v - max);
    const lse = max + Math.log(sum);
    return Array.from(z, (v) => v - lse);
  }

  function randomSeed() {
    return crypto.getRandomValues(new Uint32Array(1))[0];
  }

  // ---- the API ---------------------------------------------------------------------------

  const spec = JSON.parse(document.getElementById("charrnn-model").textContent);
  const net = new Network(spec);
  const symbols = new Symbols(spec.vocab, spec.encoding);
  const SAMPLERS = ["greedy", "temperature", "top_k"];
  const OPTIONS = ["seed_text", "num_chars", "sampler", "temperature", "top_k", "seed", "onText", "signal"];

  function nextLogProbs(text) {
    if (typeof text !== "string") throw new TypeError("nextLogProbs(text) takes a string");
    const state = net.zeroState(), logits = new Float64Array(net.V);
    for (const id of symbols.start(text)) net.step(state, id, logits);
    return logSoftmax(logits);
  }

  // generate's options with the model's defaults filled in; a bad one is a TypeError or RangeError naming it.
  function settings(options) {
    if (options === undefined) options = {};
    if (typeof options !== "object" || options === null) throw new TypeError("generate takes one object of options");
    const unknown = Object.keys(options).filter((key) => !OPTIONS.includes(key));
    if (unknown.length) throw new TypeError(`unknown option ${unknown[0]}; the options are ${OPTIONS.join(", ")}`);
    const given = Object.fromEntries(Object.entries(options).filter(([, v]) => v !== undefined && v !== null));
    const o = { ...spec.defaults, seed: undefined, ...given };
    const integer = (name, low) => {
      if (!Number.isSafeInteger(o[name]) || o[name] < low) throw new RangeError(`${name} must be an integer >= ${low}, got ${o[name]}`);
    };
    if (typeof o.seed_text !== "string") throw new TypeError(`seed_text must be a string, got ${typeof o.seed_text}`);
    integer("num_chars", 0);
    if (!SAMPLERS.includes(o.sampler)) throw new RangeError(`sampler must be one of ${SAMPLERS.join(", ")}, got ${o.sampler}`);
    if (!(typeof o.temperature === "number" && o.temperature > 0 && Number.isFinite(o.temperature))) {
      throw new RangeError(`temperature must be a number > 0, got ${o.temperature}`);
    }
    integer("top_k", 1);
    if (o.seed !== undefined) integer("seed", 0);
    if (o.onText !== undefined && typeof o.onText !== "function") throw new TypeError("onText must be a function");
    return o;
  }

  function stopped() {
    return new DOMException("generation stopped", "AbortError");
  }

  // Let the page draw and handle input, then go on in a new task (a message to ourselves: a
  // timeout would wait 4 ms or more); stop here when `signal` says so.
  const channel = new MessageChannel(), waiting = [];
  channel.port1.onmessage = () => waiting.shift()();
  async function pause(signal) {
    await new Promise((resolve) => { waiting.push(resolve); channel.port2.postMessage(null); });
    if (signal && signal.aborted) throw stopped();
  }

  async function generate(options) {
    const o = settings(options);
    const ids = symbols.start(o.seed_text);
    const uniform = uniformFrom(o.seed ?? randomSeed());
    const topK = o.sampler === "top_k" ? o.top_k : net.V;
    const state = net.zeroState(), logits = new Float64Array(net.V), scratch = new Float64Array(net.V);
    if (o.signal && o.signal.aborted) throw stopped();
    for (let i = 0; i < ids.length;) {
      const until = performance.now() + SLICE_MS;
      do net.step(state, ids[i++], logits); while (i < ids.length && performance.now() < until);
      if (i < ids.length) await pause(o.signal);
    }
    const decode = symbols.decoder();
    let text = "";
    for (let done = 0; done < o.num_chars;) {
      const until = performance.now() + SLICE_MS, piece = [];
      do {
        const id = o.sampler === "greedy" ? argmax(logits) : draw(logits, o.temperature, topK, uniform, scratch);
        piece.push(id);
        if (++done < o.num_chars) net.step(state, id, logits);
      } while (done < o.num_chars && piece.length < SLICE_IDS && performance.now() < until);
      const part = decode(piece, done === o.num_chars);
      text += part;
      if (o.onText && part) o.onText(part);
      if (done < o.num_chars) await pause(o.signal);
    }
    return text;
  }

  window.charrnn = Object.freeze({
    vocab: Object.freeze(spec.vocab.slice()),
    encoding: spec.encoding,
    info: Object.freeze({
      name: spec.name, type: spec.type, summary: spec.summary, parameters: spec.parameters,
      step: spec.step, defaults: Object.freeze({ ...spec.defaults }),
    }),
    nextLogProbs,
    generate,
  });

  // ---- the page --------------------------------------------------------------------------

  const $ = (id) => document.getElementById(id);
  let controller = null; // the AbortController of the running generation

  function showError(message) {
    $("error").textContent = message;
    $("error").hidden = !message;
  }

  function syncControls() {
    const sampler = $("sampler").value;
    $("temperature").disabled = sampler === "greedy";
    $("top-k").disabled = sampler !== "top_k";
    $("temperature-value").textContent = Number($("temperature").value).toFixed(2);
  }

  // The form's settings, or an Error naming the field that is wrong.
  function formOptions() {
    const whole = (id, name, low) => {
      const text = $(id).value.trim();
      const value = Number(text);
      if (!text || !Number.isSafeInteger(value) || value < low) throw new Error(`${name} must be a whole number >= ${low}`);
      return value;
    };
    const sampler = $("sampler").value;
    const options = { seed_text: $("seed-text").value, num_chars: whole("length", "Length", 1), sampler };
    if (sampler !== "greedy") options.temperature = Number($("temperature").value);
    if (sampler === "top_k") options.top_k = whole("top-k", "Top-k", 1);
    options.seed = $("seed").value.trim() ? whole("seed", "Seed", 0) : randomSeed();
    return options;
  }

  function setRunning(running) {
    $("generate").disabled = running;
    $("stop").disabled = !running;
    $("output").classList.toggle("running", running);
  }

  async function run() {
    if (controller) return;
    let options;
    try {
      options = formOptions();
      symbols.start(options.seed_text); // an unknown character is said before anything runs
    } catch (err) {
      showError(err.message);
      $("status").textContent = "Not started";
      return;
    }
    showError("");
    controller = new AbortController();
    setRunning(true);
    $("continue").disabled = true;
    $("output-seed").textContent = options.seed_text;
    const node = document.createTextNode("");
    $("output-text").replaceChildren(node);
    $("status").textContent = "Generating…";
    const output = $("output"), started = performance.now();
    let shown = 0;
    const onText = (piece) => {
      const atEnd = output.scrollTop + output.clientHeight >= output.scrollHeight - 4;
      node.appendData(piece);
      shown += Array.from(piece).length;
      if (atEnd) output.scrollTop = output.scrollHeight;
    };
    try {
      await generate({ ...options, onText, signal: controller.signal });
      const seconds = (performance.now() - started) / 1000;
      const rate = seconds > 0 ? `, ${Math.round(shown / seconds).toLocaleString("en")} chars/s` : "";
      $("status").textContent = `Done: ${shown} characters in ${seconds.toFixed(2)} s${rate} · seed ${options.seed}`;
    } catch (err) {
      if (err.name === "AbortError") {
        $("status").textContent = `Stopped after ${shown} characters · seed ${options.seed}`;
      } else {
        showError(err.message);
        $("status").textContent = "Failed";
      }
    } finally {
      controller = null;
      setRunning(false);
      $("continue").disabled = false;
    }
  }

  function setup() {
    const d = spec.defaults;
    $("model-name").textContent = spec.name;
    const trained = spec.step ? `, ${spec.step.toLocaleString("en")} steps` : "";
    $("model-info").textContent = `${spec.summary}${trained}`;
    $("seed-text").value = d.seed_text;
    $("sampler").value = d.sampler;
    $("temperature").value = String(d.temperature);
    $("top-k").value = String(d.top_k);
    $("length").value = String(d.num_chars || 500);
    syncControls();
    $("sampler").addEventListener("change", syncControls);
    $("temperature").addEventListener("input", syncControls);
    $("generate").addEventListener("click", run);
    $("stop").addEventListener("click", () => controller && controller.abort());
    $("controls").addEventListener("submit", (event) => { event.preventDefault(); run(); });
    $("seed-text").addEventListener("keydown", (event) => {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) { event.preventDefault(); run(); }
    });
    $("continue").addEventListener("click", () => {
      $("seed-text").value = $("output-seed").textContent + $("output-text").textContent;
      $("seed-text").focus();
    });
    $("status").textContent = "Ready";
  }

  setup();
})();
