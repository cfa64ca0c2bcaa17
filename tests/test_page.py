"""The playground page in a real headless Chromium (Playwright's Python API, Debian's chromium).

The page talks only to the public API (/v1/models, /v1/models/{id}/metrics, /v1/completions).
Until `charrnn serve` lands, the `playground` fixture starts `FakeServer`, a stdlib server
that implements that API with canned text; swapping in the real server means changing that
one fixture (start `charrnn serve` on a checkpoint, yield its URL and a way to see requests).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

STATIC = Path(__file__).resolve().parent.parent / "plugins" / "serve" / "static"
CHROMIUM = os.environ.get("CHARRNN_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # pragma: no cover - depends on the environment
    sync_playwright = None

HAVE_BROWSER = sync_playwright is not None and Path(CHROMIUM).exists()
needs_browser = pytest.mark.skipif(
    not HAVE_BROWSER and not os.environ.get("CI"),
    reason="needs playwright (pip install '.[page]') and Debian's chromium (apt-get install chromium)",
)

CANNED = (
    "THE MILLER AND THE CROW\n\nIn the days when the river still ran by the old mill, the miller kept "
    "a crow that could count to seven. It sat on the wheel and watched the sacks go up, and every "
    "evening it told the miller how many there had been, and he wrote them in his book.\n\n"
)
MODELS = {
    "harrowmere": {"vocab": sorted(set(CANNED) | set("abcdefghijklmnopqrstuvwxyz:;!?'-")), "metrics": True},
    "tiny": {"vocab": sorted(set("the cat sat on mat.\n")), "metrics": False},
}
STATIC_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}


def fake_metrics(steps: int = 1500, every: int = 50) -> list[dict]:
    rows = []
    for step in range(every, steps + 1, every):
        train = 1.45 + 2.75 * math.exp(-step / 260) + 0.04 * math.sin(step / 37)
        row = {"step": step, "train_loss": round(train, 4), "val_loss": None}
        if step % (4 * every) == 0:
            row["val_loss"] = round(1.55 + 2.6 * math.exp(-step / 280), 4)
        rows.append(row)
    return rows


def next_chars(prompt: str, vocab: list[str], n: int) -> dict[str, float]:
    """A deterministic distribution over the vocabulary that depends on the last character."""
    shift = ord(prompt[-1]) if prompt else 0
    weights = [1.0 / (1 + ((i + shift) % len(vocab))) ** 1.3 for i in range(len(vocab))]
    total = sum(weights)
    ranked = sorted(zip(vocab, weights, strict=True), key=lambda cw: -cw[1])[:n]
    return {c: math.log(w / total) for c, w in ranked}


class FakeServer(ThreadingHTTPServer):
    """The public API with canned text, streamed in 16-character chunks `chunk_delay` apart."""

    daemon_threads = True

    def __init__(
        self,
        text: str = CANNED,
        metrics: list[dict] | None = None,
        chunk_delay: float = 0.04,
        models: dict | None = None,
        distribution=None,
    ):
        super().__init__(("127.0.0.1", 0), Handler)
        self.text, self.metrics, self.chunk_delay = text, metrics or fake_metrics(), chunk_delay
        self.models = models or MODELS
        self.distribution = distribution or (
            lambda name, prompt, n: next_chars(prompt, self.models[name]["vocab"], n)
        )
        self.requests: list[dict] = []  # JSON bodies of POST /v1/completions, in order
        self.disconnected = threading.Event()  # a client went away mid-stream

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    server: FakeServer

    def log_message(self, *args):
        pass

    def send_json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def error(self, status: int, message: str, param: str | None = None) -> None:
        kind = "invalid_request_error" if status < 500 else "server_error"
        self.send_json(status, {"error": {"message": message, "type": kind, "param": param, "code": None}})

    def do_GET(self):
        if self.path == "/" or self.path.startswith("/static/"):
            name = "index.html" if self.path == "/" else self.path.removeprefix("/static/")
            if name not in {"index.html", "app.js", "style.css"}:
                return self.error(404, f"no route {self.path}")
            data = (STATIC / name).read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", STATIC_TYPES[Path(name).suffix] + "; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        elif self.path == "/v1/models":
            data = [
                {
                    "id": name,
                    "object": "model",
                    "created": 1700000000,
                    "owned_by": "charrnn",
                    "charrnn": {
                        "vocab_size": len(m["vocab"]),
                        "encoding": "utf-8",
                        "model_type": "rnn",
                        "samplers": ["temperature", "greedy", "top_k", "top_p", "min_p", "beam"],
                        "default_sampler": {"type": "temperature", "temperature": 0.8},
                        "has_metrics": m["metrics"],
                    },
                }
                for name, m in self.server.models.items()
            ]
            self.send_json(200, {"object": "list", "data": data})
        elif self.path.startswith("/v1/models/") and self.path.endswith("/metrics"):
            name = self.path.split("/")[3]
            if not self.server.models.get(name, {}).get("metrics"):
                return self.error(404, f"model {name!r} has no metrics file", "model")
            self.send_json(200, {"object": "list", "data": self.server.metrics})
        else:
            self.error(404, f"no route {self.path}")

    def do_POST(self):
        if self.path != "/v1/completions":
            return self.error(404, f"no route {self.path}")
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        except ValueError:
            return self.error(400, "the body is not valid JSON")
        self.server.requests.append(body)
        model = self.server.models.get(body.get("model"))
        if model is None:
            served = ", ".join(self.server.models)
            return self.error(404, f"unknown model {body.get('model')!r}; served: {served}", "model")
        prompt = body.get("prompt", "")
        for i, ch in enumerate(prompt):
            if ch not in model["vocab"]:
                return self.error(
                    400,
                    f"prompt: character {ch!r} at position {i} is not in the model's vocabulary",
                    "prompt",
                )
        temperature = body.get("temperature", 1.0)
        if not 0 <= temperature <= 2:
            return self.error(400, f"temperature must be between 0 and 2, got {temperature}", "temperature")
        n = body.get("max_tokens", 16)
        text = (self.server.text * (n // len(self.server.text) + 1))[:n]
        if body.get("stream"):
            return self.stream(body["model"], text)
        logprobs = None
        if body.get("logprobs"):
            dist, n = self.server.distribution, body["logprobs"]
            tops = [dist(body["model"], prompt[:i], n) for i in range(len(prompt) + 1)]
            logprobs = {"tokens": list(prompt), "token_logprobs": [None] * len(prompt), "top_logprobs": tops}
            logprobs["text_offset"] = list(range(len(prompt)))
        choice = {"text": (prompt if body.get("echo") else "") + text, "index": 0, "logprobs": logprobs}
        self.send_json(
            200,
            {"id": "cmpl-1", "object": "text_completion", "choices": [choice | {"finish_reason": "length"}]},
        )

    def stream(self, model: str, text: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        pieces = [text[i : i + 16] for i in range(0, len(text), 16)]
        try:
            for i, piece in enumerate(pieces):
                finish = "length" if i == len(pieces) - 1 else None
                chunk = {
                    "id": "cmpl-1",
                    "object": "text_completion",
                    "created": int(time.time()),
                    "model": model,
                    "choices": [{"text": piece, "index": 0, "logprobs": None, "finish_reason": finish}],
                }
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()
                time.sleep(self.server.chunk_delay)
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.server.disconnected.set()


@pytest.fixture
def playground():
    """The URL of the server under test, serving a model with a metrics file first and one without.

    Today the fake; to test `charrnn serve` instead, start it here (port 0, two checkpoints: one
    with `<stem>.metrics.jsonl` beside it, one without) and yield its base URL. The tests learn
    everything else (texts, probabilities, metrics, error messages) from the API itself.
    """
    server = FakeServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.url
    server.shutdown()
    server.server_close()


def call(url: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    """The server's own answer to a request, to compare with what the page shows."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


@pytest.fixture(scope="module")
def browser():
    if sync_playwright is None:
        pytest.fail("playwright is not installed: pip install '.[page]'")
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no chromium at {CHROMIUM}: apt-get install chromium (or set CHARRNN_CHROMIUM)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()


class Page:
    """A page on the playground, with the completion requests it sent and those it cancelled."""

    def __init__(self, page, url: str):
        self.page, self.url = page, url
        self.sent: list[dict] = []
        self.cancelled: list[dict] = []
        self.errors: list[str] = []
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        page.on("request", self._sent)
        page.on("requestfailed", self._cancelled)

    def _sent(self, request):
        if request.url.endswith("/v1/completions"):
            self.sent.append(json.loads(request.post_data))

    def _cancelled(self, request):
        if request.url.endswith("/v1/completions"):
            self.cancelled.append(json.loads(request.post_data))

    def completions(self, **match) -> list[dict]:
        return [r for r in self.sent if all(r.get(k) == v for k, v in match.items())]

    def __getattr__(self, name):
        return getattr(self.page, name)


@pytest.fixture
def models(playground):
    return call(playground, "/v1/models")[1]["data"]


@pytest.fixture
def page(browser, playground, models):
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    page = Page(context.new_page(), playground)
    page.goto(playground + "/")
    expect(page.locator("#model option")).to_have_count(len(models))
    yield page
    context.close()
    assert not page.errors, page.errors  # no uncaught JavaScript error on the page


def test_page_is_offline_and_complete():
    """Everything the page loads is one of the three shipped files: it works with no network."""
    html = (STATIC / "index.html").read_text(encoding="utf-8")
    assert re.findall(r'(?:src|href)="([^"]+)"', html) == ["static/style.css", "static/app.js"]
    for name in ("index.html", "app.js", "style.css"):
        text = (STATIC / name).read_text(encoding="utf-8")
        urls = set(re.findall(r"[a-z]+://[^\s\"')]+", text)) - {"http://www.w3.org/2000/svg"}
        assert not urls, (name, urls)
        assert "@import" not in text
    ids = set(re.findall(r'id="([^"]+)"', html))
    used = set(re.findall(r'\$\("([^"]+)"\)', (STATIC / "app.js").read_text(encoding="utf-8")))
    assert used <= ids, used - ids  # every element the script looks up exists
    for match in re.findall(r'<label for="([^"]+)"', html):
        assert match in ids


@needs_browser
@pytest.mark.slow
def test_generate_streams_the_text_in_as_it_is_made(page, models):
    page.fill("#prompt", "THE MILLER")
    page.fill("#length", "300")
    page.fill("#seed", "7")
    page.evaluate(
        """() => { window.lengths = [];
        new MutationObserver(() => window.lengths.push(document.getElementById('output-text').textContent.length))
          .observe(document.getElementById('output-text'), {childList: true, characterData: true, subtree: true}); }"""
    )
    page.click("#generate")
    expect(page.locator("#status")).to_contain_text("Done: 300 characters", timeout=10_000)
    assert page.text_content("#output-seed") == "THE MILLER"
    lengths = page.evaluate("window.lengths")
    assert len(set(lengths)) >= 10 and lengths == sorted(lengths)  # many chunks, arriving one by one
    (request,) = page.completions(stream=True)
    default = models[0]["charrnn"]["default_sampler"]
    assert request == {
        "model": models[0]["id"],
        "prompt": "THE MILLER",
        "max_tokens": 300,
        "stream": True,
        "sampler": default["type"],
        "temperature": default["temperature"],
        "seed": 7,
    }
    # what streamed in is the whole text the server makes for that request
    status, whole = call(page.url, "/v1/completions", {**request, "stream": False})
    assert status == 200 and page.text_content("#output-text") == whole["choices"][0]["text"]
    expect(page.locator("#generate")).to_be_enabled()
    expect(page.locator("#stop")).to_be_disabled()


@needs_browser
@pytest.mark.slow
def test_sampler_options_are_sent_as_shown(page):
    page.select_option("#sampler", "top_k")
    expect(page.locator("#top-p")).to_be_disabled()
    page.fill("#top-k", "5")
    page.locator("#temperature").fill("0.5")
    expect(page.locator("#temperature-value")).to_have_text("0.50")
    page.fill("#length", "20")
    page.click("#generate")
    expect(page.locator("#status")).to_contain_text("Done: 20 characters")
    (request,) = page.completions(stream=True)
    assert request["sampler"] == "top_k" and request["top_k"] == 5 and request["temperature"] == 0.5
    assert "top_p" not in request and "seed" not in request  # a blank seed is not sent
    page.select_option("#sampler", "greedy")
    expect(page.locator("#temperature")).to_be_disabled()


@needs_browser
@pytest.mark.slow
def test_stop_cancels_the_stream(page):
    page.fill("#length", "5000")  # several seconds of streaming
    page.click("#generate")
    page.wait_for_function("document.getElementById('output-text').textContent.length >= 48")
    page.click("#stop")
    expect(page.locator("#status")).to_contain_text("Stopped after")
    expect(page.locator("#generate")).to_be_enabled()
    assert [r for r in page.cancelled if r.get("stream")]  # the browser cancelled the stream's request
    shown = len(page.text_content("#output-text"))
    assert 48 <= shown < 5000
    assert f"Stopped after {shown} characters" in page.text_content("#status")
    page.wait_for_timeout(300)
    assert len(page.text_content("#output-text")) == shown  # nothing arrives after Stop
    expect(page.locator("#error")).to_be_hidden()


def shown_top(page) -> tuple[str, str]:
    first = page.locator("#probs .prob").nth(0)
    return first.locator(".glyph").text_content(), first.locator(".pct").text_content()


def expected_top(url: str, body: dict) -> tuple[str, str]:
    status, answer = call(url, "/v1/completions", body)
    assert status == 200
    char, logprob = max(answer["choices"][0]["logprobs"]["top_logprobs"][-1].items(), key=lambda kv: kv[1])
    return {" ": "␣", "\n": "↵", "\t": "⇥"}.get(char, char), f"{100 * math.exp(logprob):.1f}%"


@needs_browser
@pytest.mark.slow
def test_probability_panel_shows_the_next_characters_after_the_cursor(page, models):
    page.fill("#prompt", "")
    page.locator("#prompt").press_sequentially("THE MI")
    expect(page.locator("#probs .prob")).to_have_count(10)
    page.wait_for_function("document.getElementById('probs').dataset.for === 'THE MI'")
    last = page.completions(max_tokens=0)[-1]
    assert last == {
        "model": models[0]["id"],
        "prompt": "THE MI",
        "max_tokens": 0,
        "logprobs": 10,
        "echo": True,
    }
    assert shown_top(page) == expected_top(page.url, last)
    # the cursor moved back: the panel follows it
    page.evaluate(
        "() => { const p = document.getElementById('prompt'); p.setSelectionRange(3, 3); p.click(); }"
    )
    page.wait_for_function("document.getElementById('probs').dataset.for === 'THE'")
    expect(page.locator("#probs-where")).to_have_text("after the cursor")
    top = expected_top(page.url, {**last, "prompt": "THE"})
    assert shown_top(page) == top
    # a candidate is a button that inserts its character at the cursor
    page.locator("#probs .prob").nth(0).click()
    inserted = {"␣": " ", "↵": "\n", "⇥": "\t"}.get(top[0], top[0])
    assert page.input_value("#prompt") == "THE" + inserted + " MI"


@needs_browser
@pytest.mark.slow
def test_after_a_generation_the_panel_shows_what_follows_the_generated_text(page):
    page.clock.install(time=1_000_000)
    page.reload()
    expect(page.locator("#model option")).not_to_have_count(0)
    page.clock.pause_at(2_000_000)  # timers fire only when the test says: the order below is certain
    page.fill("#length", "16")
    page.fill("#prompt", "THE MILLER")  # schedules an "after the cursor" update...
    page.click("#generate")  # ...that must not replace the one after the generation
    expect(page.locator("#status")).to_contain_text("Done: 16 characters")
    page.clock.run_for(2000)
    page.wait_for_timeout(300)
    expect(page.locator("#probs-where")).to_have_text("after the generated text")
    full = "THE MILLER" + page.text_content("#output-text")
    assert page.evaluate("document.getElementById('probs').dataset.for") == full
    assert page.completions(max_tokens=0)[-1]["prompt"] == full


@needs_browser
@pytest.mark.slow
def test_loss_curve_draws_train_and_validation_from_the_metrics(page, models):
    with_metrics = next(m["id"] for m in models if m["charrnn"]["has_metrics"])
    without = next(m["id"] for m in models if not m["charrnn"]["has_metrics"])
    page.select_option("#model", with_metrics)
    rows = call(page.url, f"/v1/models/{with_metrics}/metrics")[1]["data"]
    train = page.locator("#curve svg path.line.train")
    expect(train).to_have_count(1)
    train_rows = [r for r in rows if r.get("train_loss") is not None]
    val_rows = [r for r in rows if r.get("val_loss") is not None]
    assert train.get_attribute("d").count("L") == len(train_rows) - 1
    assert page.locator("#curve svg path.line.val").get_attribute("d").count("L") == len(val_rows) - 1
    label = page.locator("#curve svg").get_attribute("aria-label")
    assert f"train {train_rows[-1]['train_loss']:.3f}" in label
    assert f"validation {val_rows[-1]['val_loss']:.3f}" in label
    # the line falls as the loss falls: y grows downwards in SVG
    points = [tuple(map(float, p.split(","))) for p in train.get_attribute("d")[1:].split("L")]
    assert points[-1][1] > points[0][1]
    # every point lies inside the axes (the ticks cover the data)
    grid_ys = [
        float(y)
        for y in page.locator("#curve svg line.grid").evaluate_all("ls => ls.map(l => l.getAttribute('y1'))")
    ]
    assert all(min(grid_ys) - 0.01 <= y <= max(grid_ys) + 0.01 for _, y in points)
    page.select_option("#model", without)
    expect(page.locator("#curve")).to_contain_text("no metrics")
    expect(page.locator("#curve svg")).to_have_count(0)


@needs_browser
@pytest.mark.slow
def test_a_400_shows_the_servers_message_on_the_page(page):
    page.fill("#prompt", "THE COIN €")
    page.click("#generate")
    error = page.locator("#error")
    expect(error).to_be_visible()
    status, answer = call(page.url, "/v1/completions", page.completions(stream=True)[-1])
    assert status == 400 and "€" in answer["error"]["message"]
    expect(error).to_have_text(answer["error"]["message"])
    expect(page.locator("#status")).to_have_text("Failed")
    expect(page.locator("#generate")).to_be_enabled()
    assert page.text_content("#output-text") == ""
    page.fill("#prompt", "THE COIN")  # the next good request clears the message
    page.fill("#length", "16")
    page.click("#generate")
    expect(page.locator("#status")).to_contain_text("Done: 16 characters")
    expect(error).to_be_hidden()


@needs_browser
@pytest.mark.slow
@pytest.mark.parametrize("width", [360, 1280])
def test_screenshots_fit_the_width(browser, playground, tmp_path, width):
    context = browser.new_context(viewport={"width": width, "height": 900 if width > 400 else 780})
    page = context.new_page()
    page.goto(playground + "/")
    expect(page.locator("#curve svg")).to_have_count(1)
    page.fill("#length", "240")
    page.click("#generate")
    expect(page.locator("#status")).to_contain_text("Done")
    expect(page.locator("#probs .prob")).to_have_count(10)
    # usable at this width: nothing wider than the window, every control reachable and big enough to tap
    assert page.evaluate("document.documentElement.scrollWidth") <= width
    for selector in (
        "#model",
        "#sampler",
        "#temperature",
        "#length",
        "#seed",
        "#generate",
        "#stop",
        "#prompt",
    ):
        box = page.locator(selector).bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= width and box["height"] >= 16, selector
        label = page.evaluate(
            "(s) => { const e = document.querySelector(s); return e.labels && e.labels.length ? "
            "e.labels[0].textContent : e.getAttribute('aria-label') || e.textContent; }",
            selector,
        )
        assert label.strip(), f"{selector} has no accessible name"
    page.screenshot(path=str(tmp_path / f"playground-{width}.png"), full_page=True)
    assert (tmp_path / f"playground-{width}.png").stat().st_size > 10_000
    context.close()


def save_docs_screenshot(checkpoint: str, out: str) -> None:
    """Draw docs/playground.png: the page at 1280 px, fed by a trained checkpoint through the fake
    API (its text, next-character probabilities and metrics). Run from the repository root:
    python tests/test_page.py runs/default/final_model.npz docs/playground.png"""
    import numpy as np

    from charrnn.loaded import LoadedModel

    loaded = LoadedModel.load(checkpoint)
    vocab = list(loaded.vocab.vocab)
    seed = "THE MILLER"
    text = loaded.generate(num_chars=700, seed_text=seed, temperature=0.6, seed=3)[0][len(seed) :]

    cache = {"": (loaded.model.init_state(1), None)}  # prefix -> (state, logits after it)

    def distribution(name, prompt, n):
        start = next(i for i in range(len(prompt), -1, -1) if prompt[:i] in cache)
        state, logits = cache[prompt[:start]]
        for i in range(start, len(prompt)):
            logits, state = loaded.model.step(loaded.vocab.encode(prompt[i]), state)
            cache[prompt[: i + 1]] = (state, logits.copy())
        if logits is None:
            return {}
        z = logits[0] - logits[0].max()
        logp = z - np.log(np.exp(z).sum())
        return {vocab[i]: float(logp[i]) for i in np.argsort(-logp)[:n]}

    metrics_file = Path(checkpoint).with_suffix(".metrics.jsonl")
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    models = {"harrowmere": {"vocab": vocab, "metrics": True}}
    server = FakeServer(text=text, metrics=rows, models=models, distribution=distribution, chunk_delay=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 760})
        page.goto(server.url + "/")
        expect(page.locator("#curve svg")).to_have_count(1)
        page.fill("#prompt", seed)
        page.locator("#temperature").fill("0.6")  # as the text was generated
        page.fill("#length", str(len(text)))
        page.click("#generate")
        expect(page.locator("#status")).to_contain_text("Done")
        expect(page.locator("#probs .prob")).to_have_count(10)
        page.screenshot(path=out, type="png")
        browser.close()
    server.shutdown()


if __name__ == "__main__":
    import sys

    save_docs_screenshot(sys.argv[1], sys.argv[2])
