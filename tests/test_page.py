"""The playground page in a real headless Chromium (Playwright's Python API, Debian's chromium).

The page talks only to the public API (/v1/models, /v1/models/{id}/metrics, /v1/completions).
The `playground` fixture runs `charrnn serve`'s server in this process with two tiny trained
models (the first with a metrics file, the second without); the tests learn texts, probabilities,
metrics and error messages from the API itself.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import assert_usable_at

STATIC = Path(__file__).resolve().parent.parent / "plugins" / "serve" / "static"
ROOT = Path(__file__).resolve().parent.parent
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


class Slow:
    """The trained model, slowed to ~2,000 characters a second: a stream lasts long enough to Stop."""

    def __init__(self, model):
        self.model = model
        self.vocab_size = getattr(model, "vocab_size", None)

    def init_state(self, k):
        return self.model.init_state(k)

    def step(self, ids, state):
        time.sleep(0.0005)
        return self.model.step(ids, state)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two tiny models trained on the embedded text: the first with a metrics file, the second without."""
    import io

    import charrnn

    tmp = tmp_path_factory.mktemp("models")
    paths = []
    for name, metrics in (("miller", True), ("coin", False)):
        config = {
            "seed": 1,
            "corpus": {"type": "text", "path": str(ROOT / "data" / "input.txt"), "val_fraction": 0.1},
            "model": {"type": "rnn", "hidden_size": 32},
            "optimizer": {"type": "adam", "lr": 0.01},
            "stages": ["train"],
            "train": {"steps": 60, "batch_size": 8, "seq_length": 25, "sample_every": 10, "sample_length": 0,
                      "metrics": metrics, "plot": False, "checkpoint": str(tmp / f"{name}.npz")},
        }  # fmt: skip
        charrnn.run_pipeline(config, stdout=io.StringIO(), stderr=io.StringIO())
        paths.append(str(tmp / f"{name}.npz"))
    return paths


@pytest.fixture
def playground(checkpoints):
    """The URL of `charrnn serve`'s server (in this process, port 0) with both models."""
    from charrnn.loaded import LoadedModel
    from charrnn_plugins.serve.engine import Engine
    from charrnn_plugins.serve.server import Served, Server

    served = {}
    for path in checkpoints:
        loaded = LoadedModel.load(path, load_entrypoints=False)
        loaded.model = Slow(loaded.model)
        name = Path(path).stem
        served[name] = Served(name, loaded, Engine(loaded))
    server = Server(("127.0.0.1", 0), served, log=io.StringIO(), max_tokens_limit=10_000)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.stop(timeout=5)
    thread.join(5)


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
    char, logprob = max(answer["choices"][0]["logprobs"]["next_top_logprobs"].items(), key=lambda kv: kv[1])
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
    assert_usable_at(
        page,
        width,
        ("#model", "#sampler", "#temperature", "#length", "#seed", "#generate", "#stop", "#prompt"),
    )
    page.screenshot(path=str(tmp_path / f"playground-{width}.png"), full_page=True)
    assert (tmp_path / f"playground-{width}.png").stat().st_size > 10_000
    context.close()


def save_docs_screenshot(checkpoint: str, out: str) -> None:
    """Draw docs/playground.png: the page at 1280 px on `charrnn serve`'s server with a trained
    checkpoint. Run from the repository root:
    python tests/test_page.py runs/default/final_model.npz docs/playground.png"""
    from charrnn.loaded import LoadedModel
    from charrnn_plugins.serve.engine import Engine
    from charrnn_plugins.serve.server import Served, Server

    loaded = LoadedModel.load(checkpoint)
    name = Path(checkpoint).stem
    server = Server(("127.0.0.1", 0), {name: Served(name, loaded, Engine(loaded))}, log=io.StringIO())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 760})
        page.goto(url + "/")
        page.fill("#prompt", "THE MILLER")
        page.locator("#temperature").fill("0.6")
        page.fill("#seed", "3")
        page.fill("#length", "700")
        page.click("#generate")
        expect(page.locator("#status")).to_contain_text("Done")
        expect(page.locator("#probs .prob")).to_have_count(10)
        page.screenshot(path=out, type="png")
        browser.close()
    server.stop(timeout=5)


if __name__ == "__main__":
    import sys

    save_docs_screenshot(sys.argv[1], sys.argv[2])
