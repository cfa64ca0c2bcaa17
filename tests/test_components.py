"""The default corpus loader, optimizer and sampler."""

from __future__ import annotations

import numpy as np
import pytest

from charrnn import Corpus, CorpusError
from charrnn.transforms import clipping
from charrnn_plugins.adagrad import Adagrad
from charrnn_plugins.samplers import Temperature
from charrnn_plugins.text import load_text
from conftest import option_problem


def test_corpus_vocab_is_sorted_unicode_set():
    corpus = Corpus.from_text("héllo wörld ✓\n")
    assert corpus.vocab == sorted(set("héllo wörld ✓\n"))
    assert corpus.decode(corpus.ids) == "héllo wörld ✓\n"
    assert corpus.ids.dtype == np.uint8


def test_corpus_ids_widen_only_when_needed():
    text = "".join(chr(0x4E00 + i) for i in range(300))
    corpus = Corpus.from_text(text)
    assert corpus.ids.dtype == np.uint16 and len(corpus.vocab) == 300
    assert corpus.decode(corpus.ids) == text


def test_encode_names_unknown_character():
    corpus = Corpus.from_text("abc")
    assert list(corpus.encode("cab")) == [2, 0, 1]
    with pytest.raises(CorpusError, match=r"'z' \(U\+007A\)"):
        corpus.encode("abz")


def test_text_loader_reads_utf8_and_strips_bom(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes("\ufeffñandú\n".encode())
    corpus = load_text(str(path))
    assert corpus.decode(corpus.ids) == "ñandú\n"
    assert corpus.source == str(path)


def test_adagrad_one_step_matches_hand_computation():
    p = {"w": np.array([1.0, -2.0, 0.5]), "b": np.array([0.0])}
    g = {"w": np.array([0.5, 10.0, -0.25]), "b": np.array([-3.0])}
    opt = Adagrad(lr=0.1, eps=1e-8, clip=5.0)
    opt.step(p, clipping(opt.clip, opt.clip_norm)({k: v.copy() for k, v in g.items()}))  # as the loop does
    # clipped: [0.5, 5, -0.25]; mem = g^2; update = lr * g / sqrt(g^2 + eps) ~= lr * sign(g)
    expected_w = np.array(
        [
            1.0 - 0.1 * 0.5 / np.sqrt(0.25 + 1e-8),
            -2.0 - 0.1 * 5 / np.sqrt(25 + 1e-8),
            0.5 + 0.1 * 0.25 / np.sqrt(0.0625 + 1e-8),
        ]
    )
    np.testing.assert_allclose(p["w"], expected_w, rtol=1e-12)
    np.testing.assert_allclose(p["b"], [0.1 * 3 / np.sqrt(9 + 1e-8)], rtol=1e-12)
    # second step: memory accumulates
    opt.step(p, {"w": np.array([0.5, 0.0, 0.0]), "b": np.array([0.0])})
    np.testing.assert_allclose(p["w"][0], expected_w[0] - 0.1 * 0.5 / np.sqrt(0.5 + 1e-8), rtol=1e-12)
    np.testing.assert_allclose(opt.state_dict()["mem.w"], [0.5, 25.0, 0.0625])
    assert g["w"][1] == 10.0  # the caller's gradients are not clipped in place


def test_adagrad_state_round_trip():
    p = {"w": np.ones(3)}
    a, b = Adagrad(), Adagrad()
    a.step(p, {"w": np.array([1.0, 2.0, 3.0])})
    b.load_state_dict(a.state_dict())
    pa, pb = {"w": np.ones(3)}, {"w": np.ones(3)}
    a.step(pa, {"w": np.array([0.3, 0.2, 0.1])})
    b.step(pb, {"w": np.array([0.3, 0.2, 0.1])})
    np.testing.assert_array_equal(pa["w"], pb["w"])


def test_adagrad_decreases_loss_on_toy_problem():
    target = np.array([3.0, -1.0, 2.0])
    p = {"w": np.zeros(3)}
    opt = Adagrad(lr=0.5)
    losses = []
    for _ in range(200):
        diff = p["w"] - target
        losses.append(float(diff @ diff))
        opt.step(p, {"w": 2 * diff})
    assert losses[-1] < 1e-2 * losses[0]


@pytest.mark.parametrize("bad", [{"lr": 0}, {"lr": -1}, {"eps": 0}, {"clip": -5}])
def test_adagrad_rejects_bad_options(bad):
    key = next(iter(bad))
    assert option_problem(Adagrad, "optimizer", **bad).startswith(f"{key}: must be > 0")


def test_temperature_sampler_shapes_and_determinism():
    logits = np.random.default_rng(0).standard_normal((7, 11))
    s = Temperature(0.8)
    a = s(logits, np.random.default_rng(5))
    b = s(logits, np.random.default_rng(5))
    assert a.shape == (7,) and np.array_equal(a, b)
    assert ((a >= 0) & (a < 11)).all()


def test_tiny_temperature_is_greedy():
    logits = np.random.default_rng(1).standard_normal((50, 20))
    ids = Temperature(1e-4)(logits, np.random.default_rng(0))
    assert np.array_equal(ids, logits.argmax(-1))


def test_temperature_one_samples_the_softmax():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    rng = np.random.default_rng(123)
    n = 40000
    counts = np.bincount(Temperature(1.0)(np.repeat(logits, n, 0), rng), minlength=4)
    expected = n * np.exp(logits[0])
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 16.27  # 3 degrees of freedom, p = 0.001


@pytest.mark.parametrize("t", [0, -1.0, 101, 1e38])
def test_temperature_must_be_positive_and_bounded(t):
    assert option_problem(Temperature, "sampler", temperature=t).startswith(
        f"temperature: must be in (0, 100], got {t}"
    )


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 5, 64, 1 << 22])
def test_from_utf8_matches_from_text_at_any_chunk_size(chunk_size):
    text = "héllo wörld ✓ 😀\n" * 50
    a, b = Corpus.from_utf8(text.encode(), chunk_size=chunk_size), Corpus.from_text(text)
    assert a.vocab == b.vocab and a.ids.dtype == b.ids.dtype and np.array_equal(a.ids, b.ids)


def test_from_utf8_ascii_fast_path_and_bom():
    a = Corpus.from_utf8(b"\xef\xbb\xbf" + b"hello, world\n" * 100)
    b = Corpus.from_text("hello, world\n" * 100)
    assert a.vocab == b.vocab and np.array_equal(a.ids, b.ids) and a.ids.dtype == np.uint8


@pytest.mark.parametrize("chunk_size", [3, 7, 1 << 22])
def test_from_utf8_names_the_offset_of_invalid_bytes(chunk_size):
    raw = ("ñ" * 100).encode()  # 200 bytes
    with pytest.raises(CorpusError, match=r"not valid UTF-8 \(byte 120: invalid start byte\)"):
        Corpus.from_utf8(raw[:120] + b"\xff" + raw[120:], source="x.txt", chunk_size=chunk_size)
