"""The page `charrnn export -o FILE.html` writes, in Debian's Chromium through Playwright.

Each tiny model of every builtin type is exported, opened from file:// in an offline browser
context, and compared with charrnn itself: `nextLogProbs` against the model's own logits,
greedy text against `charrnn generate --sampler greedy`. The page's controls, streaming, Stop,
seeded sampling, its layout at 360 and 1280 px, and that it requests nothing but itself.
"""

from __future__ import annotations

import math
import re
from collections import Counter

import numpy as np
import pytest
from export_models import BYTES_TEXT, MODELS, TEXT, log_softmax, model_id, reference_logits
from test_page import ARGS, CHROMIUM, HAVE_BROWSER, expect, sync_playwright

from charrnn.cli import main
from charrnn.engine import start_ids
from charrnn.loaded import LoadedModel
from conftest import IN_CI, assert_usable_at

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not HAVE_BROWSER and not IN_CI,
        reason="needs playwright (pip install '.[page]') and Debian's chromium (apt-get install chromium)",
    ),
]

PRIME = TEXT[:50]


@pytest.fixture(scope="module")
def browser():
    if sync_playwright is None:
        pytest.fail("playwright is not installed: pip install '.[page]'")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def exported(export_checkpoints, tmp_path_factory):
    """(checkpoint, page) of every trained tiny checkpoint (see `conftest.export_checkpoints`)."""
    tmp = tmp_path_factory.mktemp("export-pages")
    out = {}
    for n, (key, path) in enumerate(export_checkpoints.items()):
        page = tmp / f"{n}.html"
        assert main(["export", path, "-o", str(page)]) == 0
        out[key] = (path, page)
    return out


class Opened:
    """A page opened from its file in an offline context, with every request the browser made."""

    def __init__(self, browser, path, width=1280, height=860):
        self.context = browser.new_context(viewport={"width": width, "height": height}, offline=True)
        self.requests: list[str] = []
        self.context.route("**/*", self._route)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        self.page.on("request", lambda request: self.requests.append(request.url))
        self.url = path.as_uri()
        self.page.goto(self.url)

    def _route(self, route):
        self.requests.append(route.request.url)
        route.continue_()

    def close(self):
        self.context.close()
        assert not self.errors, self.errors  # no uncaught JavaScript error on the page


@pytest.fixture
def opened(browser):
    pages = []

    def open_page(path, **viewport):
        pages.append(Opened(browser, path, **viewport))
        return pages[-1].page

    yield open_page
    for page in pages:
        page.close()


def reference_log_probs(loaded: LoadedModel, text: str) -> np.ndarray:
    """charrnn's log-probabilities of the next symbol after `text` from the zero state."""
    ids = start_ids(loaded.vocab, text)[None]  # (1, T)
    logits, _ = reference_logits(loaded.model, ids, loaded.model.init_state(1))
    return log_softmax(logits[0, -1])


def charrnn_generate(capsys, checkpoint, *args) -> str:
    assert main(["generate", checkpoint, *args]) == 0
    return capsys.readouterr().out


def every_model():
    return [pytest.param(spec, id=model_id(spec)) for spec in MODELS]


@pytest.mark.parametrize("spec", every_model())
def test_next_log_probs_agree_with_charrnn(exported, opened, spec):
    checkpoint, path = exported[spec]
    page = opened(path)
    loaded = LoadedModel.load(checkpoint)
    assert page.evaluate("charrnn.vocab") == loaded.vocab.vocab
    for text in (PRIME, "", TEXT[7:9]):
        got = np.array(page.evaluate("(t) => charrnn.nextLogProbs(t)", text))
        want = reference_log_probs(loaded, text)
        assert got.shape == want.shape == (len(loaded.vocab.vocab),)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
        assert math.isclose(np.exp(got).sum(), 1, rel_tol=1e-9)


@pytest.mark.parametrize("spec", every_model())
def test_greedy_text_equals_charrnn_generate(exported, opened, spec, capsys):
    checkpoint, path = exported[spec]
    page = opened(path)
    seed = TEXT[:12]
    want = charrnn_generate(
        capsys, checkpoint, "--sampler", "greedy", "--num-chars", "150", "--seed-text", seed
    )
    got = page.evaluate(
        "(s) => charrnn.generate({seed_text: s, num_chars: 150, sampler: 'greedy'})",
        seed,
    )
    assert seed + got + "\n" == want
    assert len(got) == 150 and len(set(got)) >= 8  # varied text: a repeated character would prove little


def test_a_byte_model_decodes_utf8_as_charrnn_does(exported, opened, capsys):
    checkpoint, path = exported["bytes"]
    page = opened(path)
    loaded = LoadedModel.load(checkpoint)
    assert page.evaluate("[charrnn.encoding, charrnn.vocab.length]") == ["bytes", 256]
    text = BYTES_TEXT[:25]  # "Café crème, naïve façade": bytes of two-byte characters
    got = np.array(page.evaluate("(t) => charrnn.nextLogProbs(t)", text))
    np.testing.assert_allclose(got, reference_log_probs(loaded, text), atol=1e-4, rtol=0)
    seed = "Café "
    want = charrnn_generate(
        capsys, checkpoint, "--sampler", "greedy", "--num-chars", "200", "--seed-text", seed
    )
    assert re.search(r"[^\x00-\x7f]", want[len(seed) :])  # the model wrote characters of several bytes
    got = page.evaluate("(s) => charrnn.generate({seed_text: s, num_chars: 200, sampler: 'greedy'})", seed)
    assert seed + got + "\n" == want
    # the page shows that text as it arrives, decoded across the chunks it comes in
    page.fill("#seed-text", seed)
    page.select_option("#sampler", "greedy")
    page.fill("#length", "200")
    page.click("#generate")
    expect(page.locator("#status")).to_contain_text("Done")
    assert page.text_content("#output-seed") + page.text_content("#output-text") + "\n" == want


def test_seeded_sampling_is_reproducible_and_draws_from_the_model(exported, opened):
    page = opened(exported[("lstm", 2, "float32")][1])
    run = "(o) => charrnn.generate(o)"
    options = {"seed_text": "The ", "num_chars": 80, "sampler": "temperature", "temperature": 0.9, "seed": 11}
    first = page.evaluate(run, options)
    assert page.evaluate(run, options) == first
    assert page.evaluate(run, {**options, "seed": 12}) != first
    top_1 = page.evaluate(run, {**options, "sampler": "top_k", "top_k": 1})
    assert top_1 == page.evaluate(run, {**options, "sampler": "greedy"})
    # the first character over 3000 seeds: only the top 4 appear, as often as softmax(logits / T) says
    counts = page.evaluate(
        """async () => { const counts = {};
        for (let seed = 0; seed < 3000; seed++) {
          const c = await charrnn.generate({seed_text: "The ", num_chars: 1, sampler: "top_k", top_k: 4,
                                            temperature: 0.7, seed});
          counts[c] = (counts[c] || 0) + 1;
        }
        return counts; }"""
    )
    log_p = np.array(page.evaluate("charrnn.nextLogProbs('The ')")) / 0.7
    vocab = page.evaluate("charrnn.vocab")
    top = np.argsort(-log_p)[:4]
    p = np.exp(log_p[top] - log_p[top].max())
    p /= p.sum()
    assert set(counts) <= {vocab[i] for i in top}
    seen = np.array([counts.get(vocab[i], 0) for i in top]) / 3000
    assert np.abs(seen - p).sum() / 2 < 0.04  # total variation; about 0.01 is expected from 3000 draws
    assert Counter(counts).total() == 3000


def test_generate_checks_its_options(exported, opened):
    page = opened(exported[("rnn", 1, "float32")][1])
    check = "(o) => charrnn.generate(o).then(() => 'ok', (e) => e.name + ': ' + e.message)"
    assert page.evaluate(check, {"sampler": "beam"}).startswith("RangeError: sampler must be one of greedy")
    assert page.evaluate(check, {"temperature": 0}) == "RangeError: temperature must be a number > 0, got 0"
    assert page.evaluate(check, {"top_k": 2.5}) == "RangeError: top_k must be an integer >= 1, got 2.5"
    assert page.evaluate(check, {"num_chars": 3, "temprature": 1}).startswith(
        "TypeError: unknown option temprature"
    )
    assert page.evaluate(check, {"seed_text": "€"}) == (
        'Error: character "€" (U+20AC) is not in the model\'s vocabulary'
    )
    assert page.evaluate(check, {"num_chars": 0}) == "ok"


def test_the_page_generates_what_the_api_does_and_streams_it(exported, opened):
    page = opened(exported["wide"][1])
    page.fill("#seed-text", "The miller")
    page.select_option("#sampler", "top_k")
    page.fill("#top-k", "5")
    page.locator("#temperature").fill("0.5")
    expect(page.locator("#temperature-value")).to_have_text("0.50")
    page.fill("#length", "600")
    page.fill("#seed", "7")
    page.evaluate(
        """() => { window.lengths = [];
        new MutationObserver(() => window.lengths.push(document.getElementById('output-text').textContent.length))
          .observe(document.getElementById('output-text'), {childList: true, characterData: true, subtree: true}); }"""
    )
    page.click("#generate")
    expect(page.locator("#stop")).to_be_enabled()
    expect(page.locator("#status")).to_contain_text("Done: 600 characters", timeout=60_000)
    expect(page.locator("#status")).to_contain_text("seed 7")
    lengths = page.evaluate("window.lengths")
    assert len(set(lengths)) >= 10 and lengths == sorted(lengths)  # many pieces, arriving one by one
    want = page.evaluate(
        "() => charrnn.generate({seed_text: 'The miller', num_chars: 600, sampler: 'top_k', top_k: 5, "
        "temperature: 0.5, seed: 7})"
    )
    assert page.text_content("#output-seed") == "The miller"
    assert page.text_content("#output-text") == want
    expect(page.locator("#generate")).to_be_enabled()
    expect(page.locator("#stop")).to_be_disabled()
    page.select_option("#sampler", "greedy")
    expect(page.locator("#temperature")).to_be_disabled()
    expect(page.locator("#top-k")).to_be_disabled()
    page.click("#continue")  # the text so far becomes the seed
    assert page.input_value("#seed-text") == "The miller" + want


def test_stop_ends_the_generation(exported, opened):
    page = opened(exported["wide"][1])
    page.fill("#length", "100000")
    page.click("#generate")
    page.wait_for_function("document.getElementById('output-text').textContent.length >= 40")
    page.click("#stop")
    expect(page.locator("#status")).to_contain_text("Stopped after")
    expect(page.locator("#generate")).to_be_enabled()
    shown = len(page.text_content("#output-text"))
    assert 40 <= shown < 100000
    assert re.match(rf"Stopped after {shown} characters · seed \d+$", page.text_content("#status"))
    page.wait_for_timeout(300)
    assert len(page.text_content("#output-text")) == shown  # nothing arrives after Stop
    expect(page.locator("#error")).to_be_hidden()


def test_a_character_outside_the_vocabulary_is_shown_not_run(exported, opened):
    page = opened(exported[("gru", 1, "float32")][1])
    page.fill("#seed-text", "The €")
    page.click("#generate")
    expect(page.locator("#error")).to_have_text('character "€" (U+20AC) is not in the model\'s vocabulary')
    expect(page.locator("#status")).to_have_text("Not started")
    page.fill("#seed-text", "The ")
    page.fill("#length", "20")
    page.click("#generate")
    expect(page.locator("#status")).to_contain_text("Done: 20 characters")
    expect(page.locator("#error")).to_be_hidden()


def test_the_page_requests_nothing_but_itself(exported, browser):
    opened = Opened(browser, exported[("lstm", 1, "float32")][1])
    page = opened.page
    page.fill("#length", "300")
    page.click("#generate")
    expect(page.locator("#status")).to_contain_text("Done")
    page.evaluate("charrnn.nextLogProbs('The ')")
    assert set(opened.requests) == {opened.url}
    # the recorder sees what a page would fetch; this page's policy refuses to fetch it
    page.evaluate(
        "() => { const img = new Image(); img.src = 'http://127.0.0.1:9/x.png'; document.body.append(img); }"
    )
    page.wait_for_timeout(200)
    assert "http://127.0.0.1:9/x.png" in opened.requests
    assert (
        page.evaluate("() => fetch('http://127.0.0.1:9/').then(() => 'fetched', () => 'refused')")
        == "refused"
    )
    opened.close()


@pytest.mark.parametrize("width, height", [(360, 640), (1280, 800)])
def test_layout_at_360_and_1280(exported, opened, tmp_path, width, height):
    page = opened(exported["wide"][1], width=width, height=height)
    box = page.locator("#generate").bounding_box()
    assert box["y"] >= 0 and box["y"] + box["height"] <= height  # Generate without scrolling
    assert page.evaluate("window.scrollY") == 0
    page.fill("#length", "300")
    page.fill("#seed", "3")
    page.click("#generate")
    expect(page.locator("#status")).to_contain_text("Done", timeout=60_000)
    assert_usable_at(
        page,
        width,
        ("#seed-text", "#generate", "#stop", "#sampler", "#temperature", "#top-k", "#length", "#seed"),
    )
    if width > 900:  # controls beside the text
        assert page.locator("#controls").bounding_box()["x"] < page.locator("#output").bounding_box()["x"]
    shot = tmp_path / f"export-{width}.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000


def save_docs_screenshot(checkpoint: str, out: str) -> None:
    """Draw docs/export.png: the exported page of a trained checkpoint at 1280 px, offline.
    Run from the repository root:
    python tests/test_export_page.py runs/default/final_model.npz docs/export.png"""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        page_file = Path(tmp) / "model.html"
        assert main(["export", checkpoint, "-o", str(page_file)]) == 0
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            context = browser.new_context(viewport={"width": 1280, "height": 760}, offline=True)
            page = context.new_page()
            page.goto(page_file.as_uri())
            page.locator("#temperature").fill("0.6")
            page.fill("#seed", "3")
            page.fill("#length", "700")
            page.click("#generate")
            expect(page.locator("#status")).to_contain_text("Done", timeout=60_000)
            page.screenshot(path=out, type="png")
            browser.close()


if __name__ == "__main__":
    import sys

    save_docs_screenshot(sys.argv[1], sys.argv[2])
