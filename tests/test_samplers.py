"""The samplers (`temperature`, `greedy`, `top_k`, `top_p`, `min_p`), the repetition penalty and `beam`."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest

import charrnn
import charrnn_plugins.beam
from charrnn.plugins import Registry, get_plugin_manager
from charrnn_plugins.beam import Beam
from charrnn_plugins.rnn import RNN
from charrnn_plugins.samplers import NOISE_ROWS, Greedy, MinP, Temperature, TopK, TopP, gumbel
from conftest import option_problem

NAMES = ["temperature", "greedy", "top_k", "top_p", "min_p", "beam"]
STOCHASTIC = [Temperature, TopK, TopP, MinP]
PENALISED = [Temperature, Greedy, TopK, TopP, MinP]
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}  # p = 0.001

PROBS = np.array([0.3, 0.2, 0.15, 0.12, 0.1, 0.08, 0.03, 0.02])


def factories():
    registry = Registry(get_plugin_manager(load_entrypoints=False, extra=[charrnn_plugins.beam]))
    return {name: c.factory for name, c in registry.components["sampler"].items()}


def random_logits(k, V, seed=0, dtype=np.float64):
    return (2 * np.random.default_rng(seed).standard_normal((k, V))).astype(dtype)


def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def chi2(counts, probs):
    """Chi-square statistic over the support of `probs`; nothing may fall outside it."""
    support = probs > 0
    assert counts[~support].sum() == 0
    expected = counts.sum() * probs[support]
    return float(((counts[support] - expected) ** 2 / expected).sum()), int(support.sum()) - 1


def test_builtin_samplers_are_registered(pm):
    assert set(NAMES) - {"beam"} <= set(Registry(pm).components["sampler"])
    assert "beam" in factories()


@pytest.mark.parametrize("name", NAMES)
def test_every_sampler_works_without_options(name):
    sampler = factories()[name]()
    logits = random_logits(3, 11)
    for method, arg in (("bind", list("abcdefghijk")), ("reset", 3), ("observe", np.array([1, 2, 3]))):
        if hasattr(sampler, method):
            getattr(sampler, method)(arg)
    ids = sampler(logits, np.random.default_rng(0))
    assert ids.shape == (3,) and ((ids >= 0) & (ids < 11)).all()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_seeded_samplers_reproduce_and_stay_in_vocabulary(name, dtype):
    sampler = factories()[name]()
    logits = random_logits(500, 13, dtype=dtype)
    a = sampler(logits, np.random.default_rng(7))
    b = sampler(logits, np.random.default_rng(7))
    assert a.shape == (500,) and np.array_equal(a, b)
    assert ((a >= 0) & (a < 13)).all()


def test_temperature_is_gumbel_max_over_scaled_logits():
    logits = random_logits(20, 9)
    noise = gumbel(np.random.default_rng(3), (NOISE_ROWS, 9))[:20]  # the first rows of one block
    expected = np.argmax(logits / 0.7 + noise, axis=-1)
    assert np.array_equal(Temperature(0.7)(logits, np.random.default_rng(3)), expected)


@pytest.mark.parametrize("k", [1, 3, 100, 300])
def test_noise_is_one_stream_however_it_is_cut(k):
    """Rows drawn k at a time equal rows drawn 2k at a time (blocks are never skipped)."""
    a, b = Temperature(), Temperature()
    ra, rb = np.random.default_rng(5), np.random.default_rng(5)
    pieces = np.concatenate([a.noise(ra, (k, 7)).copy() for _ in range(6)])
    whole = np.concatenate([b.noise(rb, (2 * k, 7)).copy() for _ in range(3)])
    assert np.array_equal(pieces, whole)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_perturb_gives_the_noise_the_calls_would_draw(temperature):
    """argmax(logits + perturb) over `steps` steps equals `steps` calls of the sampler."""
    k, V, steps = 3, 11, 40
    logits = [random_logits(k, V, seed=s, dtype=np.float32) for s in range(steps)]
    called, rng = Temperature(temperature), np.random.default_rng(9)
    want = [called(z, rng) for z in logits]
    batched, rng = Temperature(temperature), np.random.default_rng(9)
    noise = batched.perturb(rng, k, V, steps)
    assert noise.shape == (steps, k, V)
    got = [(noise[t] + logits[t]).argmax(1) for t in range(steps)]
    assert all(np.array_equal(a, b) for a, b in zip(want, got, strict=True))


def test_perturb_is_none_where_the_ids_need_the_logits():
    for sampler in (TopK(3), TopP(0.5), MinP(0.1), Temperature(repetition_penalty=1.2), Greedy(1.2)):
        assert sampler.perturb(np.random.default_rng(0), 2, 5) is None, sampler
    zeros = Greedy().perturb(np.random.default_rng(0), 2, 5, 3)
    assert zeros.shape == (3, 2, 5) and not zeros.any()


def test_gumbel_noise_has_the_gumbel_distribution():
    g32 = gumbel(np.random.default_rng(0), (1000, 1000))
    assert g32.dtype == np.float32 and np.isfinite(g32).all()
    g = g32.astype(np.float64).ravel()
    assert abs(g.mean() - np.euler_gamma) < 0.005  # mean of Gumbel(0, 1)
    assert abs(g.var() - np.pi**2 / 6) < 0.01
    for x in (-1.0, 0.0, 1.0, 3.0):
        assert abs((g <= x).mean() - np.exp(-np.exp(-x))) < 0.002  # the CDF
    scaled = gumbel(np.random.default_rng(0), (1000, 1000), 2.5).astype(np.float64).ravel()
    np.testing.assert_allclose(scaled, 2.5 * g, rtol=1e-6)


def test_gumbel_noise_stays_finite_when_an_exponential_draw_is_zero():
    class ZeroDraws:
        def standard_exponential(self, shape, dtype):
            return np.zeros(shape, dtype)

    g = gumbel(ZeroDraws(), (2, 3))
    assert np.isfinite(g).all() and g.max() < 90
    logits = np.array([[0.0, -np.inf, 1.0]])
    assert Temperature()(logits, ZeroDraws())[0] != 1  # a -inf logit never wins


@pytest.mark.parametrize("sampler", [Greedy(), Beam()])
def test_greedy_and_beam_step_equal_argmax(sampler):
    logits = random_logits(200, 17)
    assert np.array_equal(sampler(logits, np.random.default_rng(0)), logits.argmax(-1))


@pytest.mark.parametrize("cls", STOCHASTIC)
def test_tiny_temperature_is_greedy(cls):
    logits = random_logits(300, 20, seed=1)
    ids = cls(temperature=1e-4)(logits, np.random.default_rng(0))
    assert np.array_equal(ids, logits.argmax(-1))


@pytest.mark.parametrize("k", [1, 3, 10])
def test_top_k_never_picks_outside_the_k_best(k):
    logits = random_logits(20000, 30)
    ids = TopK(k=k)(logits, np.random.default_rng(0))
    rank = (logits > logits[np.arange(len(ids)), ids][:, None]).sum(-1)  # ids more likely than the pick
    assert rank.max() == k - 1


@pytest.mark.parametrize(("p", "temperature"), [(0.5, 1.0), (0.9, 1.0), (0.8, 0.6), (0.01, 1.5)])
def test_top_p_never_picks_outside_the_nucleus(p, temperature):
    logits = random_logits(20000, 30)
    ids = TopP(p=p, temperature=temperature)(logits, np.random.default_rng(0))
    probs = softmax(logits / temperature)
    ranked = -np.sort(-probs, axis=-1)
    size = (np.cumsum(ranked, -1) - ranked < p).sum(-1)  # smallest prefix with mass >= p
    rank = (probs > probs[np.arange(len(ids)), ids][:, None]).sum(-1)
    assert (rank < size).all()
    assert (rank == size - 1).any()  # the boundary id is reachable


@pytest.mark.parametrize(("min_p", "temperature"), [(0.05, 1.0), (0.3, 1.0), (0.2, 0.5), (1.0, 1.0)])
def test_min_p_never_picks_below_the_threshold(min_p, temperature):
    logits = random_logits(20000, 30)
    ids = MinP(min_p=min_p, temperature=temperature)(logits, np.random.default_rng(0))
    probs = softmax(logits / temperature)
    picked = probs[np.arange(len(ids)), ids]
    assert (picked >= min_p * probs.max(-1) * (1 - 1e-9)).all()


@pytest.mark.parametrize(
    ("sampler", "expected"),
    [
        (Temperature(0.7), PROBS ** (1 / 0.7)),
        (TopK(k=3), np.where(np.arange(8) < 3, PROBS, 0)),
        (TopP(p=0.7), np.where(np.arange(8) < 4, PROBS, 0)),  # 0.3 + 0.2 + 0.15 < 0.7 <= ... + 0.12
        (TopP(p=0.6, temperature=0.5), np.where(np.arange(8) < 2, PROBS**2, 0)),  # 0.09+0.04 of 0.1906
        (MinP(min_p=0.35), np.where(PROBS >= 0.35 * 0.3, PROBS, 0)),
        (MinP(min_p=0.5, temperature=2.0), np.where(PROBS >= 0.25 * 0.3, PROBS**0.5, 0)),
    ],
    ids=["temperature", "top_k", "top_p", "top_p_cold", "min_p", "min_p_hot"],
)
def test_samples_follow_the_filtered_renormalised_softmax(sampler, expected):
    n = 100_000
    logits = np.repeat(np.log(PROBS)[None], n, axis=0)  # n draws as n streams in one call
    counts = np.bincount(sampler(logits, np.random.default_rng(12345)), minlength=8)
    stat, df = chi2(counts, expected / expected.sum())
    assert stat < CHI2_999[df]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"temperature": 0}, r"temperature: must be in \(0, 100\], got 0"),
        ({"temperature": -1.0}, r"temperature: must be in \(0, 100\], got -1.0"),
        ({"temperature": 1e38}, r"temperature: must be in \(0, 100\], got 1e\+38"),
        ({"temperature": float("inf")}, "temperature: expected a finite number, got inf"),
    ],
)
@pytest.mark.parametrize("cls", STOCHASTIC)
def test_temperature_must_be_positive_and_bounded(cls, bad, message):
    assert re.fullmatch(message, option_problem(cls, "sampler", **bad))


@pytest.mark.parametrize(
    ("cls", "bad", "message"),
    [
        (TopK, {"k": 0}, "k: must be >= 1, got 0"),
        (TopK, {"k": 2.5}, "k: expected an integer, got 2.5"),
        (TopK, {"k": True}, "k: expected an integer, got true"),
        (TopP, {"p": 0}, r"p: must be in \(0, 1\], got 0"),
        (TopP, {"p": 1.5}, r"p: must be in \(0, 1\], got 1.5"),
        (TopP, {"p": "high"}, r"p: expected a number, got 'high'"),
        (MinP, {"min_p": -0.1}, r"min_p: must be in \[0, 1\], got -0.1"),
        (MinP, {"min_p": float("nan")}, r"min_p: expected a finite number, got nan"),
        (Greedy, {"repetition_penalty": 0}, r"repetition_penalty: must be in \(0, 100\], got 0"),
        (Temperature, {"repetition_window": 0}, r"repetition_window: must be in \[1, 10000\], got 0"),
        (
            Temperature,
            {"repetition_window": 10**9},
            r"repetition_window: must be in \[1, 10000\], got 1000000000",
        ),
        (Beam, {"beam_width": 0}, r"beam_width: must be in \[1, 1024\], got 0"),
    ],
)
def test_bad_options_are_rejected(cls, bad, message):
    assert re.fullmatch(message, option_problem(cls, "sampler", **bad))


@pytest.mark.parametrize("cls", PENALISED)
def test_repetition_penalty_adjusts_logits_as_defined_per_stream(cls):
    logits = np.array([[2.0, -1.0, 0.5, 0.8, 3.0, 1.0], [1.0, 2.0, -3.0, 0.4, -0.5, 0.0]])
    s = cls(repetition_penalty=2.0, repetition_window=3)
    s.reset(2)
    for ids in ([4, 1], [0, 1], [1, 2], [1, 1], [3, 4]):  # windows: stream 0 {1, 3}, stream 1 {1, 2, 4}
        s.observe(np.array(ids))
    temperature = getattr(s, "temperature", 1.0)
    expected = logits.copy()
    expected[0, [1, 3]] = [
        -1.0 * 2,
        0.8 / 2,
    ]  # ids 4 and 0 fell out of the window; 1, seen twice, counts once
    expected[1, [1, 2, 4]] = [2.0 / 2, -3.0 * 2, -0.5 * 2]
    expected /= temperature
    np.testing.assert_allclose(s.adjust(logits), expected, rtol=1e-15)
    s.reset(2)
    np.testing.assert_allclose(s.adjust(logits), logits / temperature, rtol=1e-15)


def test_repetition_penalty_makes_seen_ids_less_likely():
    logits = np.log(PROBS)[None].repeat(2, axis=0)
    s = Temperature(repetition_penalty=1.5)
    s.reset(2)
    s.observe(np.array([0, 5]))
    before, after = softmax(logits), softmax(s.adjust(logits))  # all logits < 0: multiplied
    assert after[0, 0] < before[0, 0] and after[1, 5] < before[1, 5]
    unseen = np.ones((2, 8), bool)
    unseen[[0, 1], [0, 5]] = False
    assert (after[unseen] > before[unseen]).all()
    assert Greedy(repetition_penalty=1.5).adjust(logits).argmax(-1).tolist() == [0, 0]
    g = Greedy(repetition_penalty=1.5)
    g.reset(2)
    g.observe(np.array([0, 1]))
    assert g(logits, np.random.default_rng(0)).tolist() == [1, 0]


def test_repetition_penalty_changes_what_top_k_keeps():
    logits = np.array([[3.0, 2.0, 1.0, 0.0]])
    s = TopK(k=1, repetition_penalty=2.0)
    s.reset(1)
    s.observe(np.array([0]))  # 3.0 -> 1.5: id 1 now leads
    assert s(logits, np.random.default_rng(0)).tolist() == [1]


def test_repetition_penalty_off_ignores_history():
    s = TopP(p=0.9)
    s.reset(1)
    s.observe(np.array([3]))
    logits = random_logits(1, 8)
    np.testing.assert_array_equal(s.adjust(logits), logits)


# Beam search on small deterministic models


class SecondOrder:
    """A second-order Markov chain as a Model: next-id log-probs `table[prev, cur]` (V, V, V)."""

    def __init__(self, table):
        self.table = table

    def init_state(self, k):
        return {"prev": np.zeros(k, np.intp)}

    def step(self, ids, state):
        return self.table[state["prev"], ids].copy(), {"prev": np.array(ids, np.intp)}


def random_chain(V, seed):
    return np.log(np.random.default_rng(seed).dirichlet(np.full(V, 0.5), size=(V, V)))


def score(model, state, last_ids, seqs):
    """Total log-probability of seqs (k, n) continuing k streams."""
    x, total = last_ids, np.zeros(len(last_ids))
    for t in range(seqs.shape[1]):
        logits, state = model.step(x, state)
        total += log_softmax(logits)[np.arange(len(x)), seqs[:, t]]
        x = seqs[:, t]
    return total


def greedy_ids(model, state, last_ids, n):
    x, out = last_ids, []
    for _ in range(n):
        logits, state = model.step(x, state)
        x = logits.argmax(-1)
        out.append(x)
    return np.stack(out, axis=1)


def primed(model, seeds):
    """State and last ids for one stream per seed sequence."""
    k = len(seeds)
    state = model.init_state(k)
    for t in range(len(seeds[0]) - 1):
        _, state = model.step(np.array([s[t] for s in seeds]), state)
    return state, np.array([s[-1] for s in seeds])


def test_beam_beats_myopic_greedy():
    step_probs = np.array(  # next-id probabilities given the current id only
        [[0.02, 0.55, 0.43], [0.34, 0.33, 0.33], [0.02, 0.02, 0.96]]
    )
    model = SecondOrder(np.log(np.broadcast_to(step_probs, (3, 3, 3))))
    state, last = primed(model, [[0]])
    greedy = greedy_ids(model, state, last, 2)
    beam = Beam(beam_width=2).search(model, state, last, 2, np.random.default_rng(0))
    assert greedy.tolist() == [[1, 0]] and beam.tolist() == [[2, 2]]
    np.testing.assert_allclose(score(model, state, last, beam), [np.log(0.43 * 0.96)])
    assert score(model, state, last, beam) > score(model, state, last, greedy)


def test_beam_width_one_equals_greedy():
    model = SecondOrder(random_chain(6, seed=1))
    state, last = primed(model, [[0, 1, 2], [3, 3, 5], [5, 4, 0]])
    beam = Beam(beam_width=1).search(model, state, last, 12)
    assert np.array_equal(beam, greedy_ids(model, state, last, 12))


def test_wide_beam_finds_the_exhaustive_optimum_per_stream():
    V, n = 3, 3
    model = SecondOrder(random_chain(V, seed=2))
    state, last = primed(model, [[0, 1], [2, 2]])
    beam = Beam(beam_width=V ** (n - 1)).search(model, state, last, n)
    for s in range(2):
        one = {name: a[s : s + 1] for name, a in state.items()}
        best = max(
            itertools.product(range(V), repeat=n),
            key=lambda q: score(model, one, last[s : s + 1], np.array([q]))[0],
        )
        assert beam[s].tolist() == list(best)


@pytest.mark.parametrize("width", [2, 3, 5])
def test_beam_on_an_rnn_scores_at_least_greedy(width):
    model = RNN(vocab_size=10, rng=np.random.default_rng(0), hidden_size=16, dtype="float64", init_scale=0.7)
    state, last = primed(model, [[1, 2, 3], [4, 5, 6], [7, 8, 9], [0, 0, 0]])
    beam = Beam(beam_width=width).search(model, state, last, 25)
    assert beam.shape == (4, 25) and beam.dtype == np.int64
    greedy = greedy_ids(model, state, last, 25)
    assert (score(model, state, last, beam) >= score(model, state, last, greedy) - 1e-12).all()
    assert np.array_equal(state["h"], primed(model, [[1, 2, 3], [4, 5, 6], [7, 8, 9], [0, 0, 0]])[0]["h"])


def test_beam_wider_than_vocabulary_and_zero_chars():
    model = SecondOrder(random_chain(3, seed=3))
    state, last = primed(model, [[0, 1]])
    assert Beam(beam_width=7).search(model, state, last, 0).shape == (1, 0)
    out = Beam(beam_width=7).search(model, state, last, 4)
    assert out.shape == (1, 4) and ((out >= 0) & (out < 3)).all()
    assert np.array_equal(out, Beam(beam_width=9).search(model, state, last, 4))  # 9 = all 3-prefixes


# End to end through the pipeline


@pytest.mark.parametrize("name", NAMES)
def test_pipeline_generates_with_every_sampler(tiny_config, name):
    tiny_config["sampler"] = {"type": name}
    result = charrnn.run_pipeline(tiny_config, plugins=[charrnn_plugins.beam])
    assert result.text.startswith("the ") and len(result.text) == len("the ") + 50


@pytest.mark.parametrize("name", NAMES)
def test_pipeline_batches_streams_with_options(tiny_config, name):
    tiny_config["stages"] = ["generate"]
    tiny_config["generate"]["num_samples"] = 3
    charrnn.run_pipeline({**tiny_config, "stages": ["train"]})
    options = {"beam": {"beam_width": 3}}.get(name, {"repetition_penalty": 1.3, "repetition_window": 5})
    tiny_config["sampler"] = {"type": name, **options}
    result = charrnn.run_pipeline(tiny_config, plugins=[charrnn_plugins.beam])
    assert len(result.texts) == 3 and all(len(t) == len("the ") + 50 for t in result.texts)


def test_pipeline_hands_generation_to_beam_search(tiny_config, monkeypatch):
    calls = []
    search = Beam.search

    def spy(self, model, state, last_ids, num_chars, rng):
        calls.append((len(last_ids), num_chars))
        return search(self, model, state, last_ids, num_chars, rng)

    monkeypatch.setattr(Beam, "search", spy)
    tiny_config["sampler"] = {"type": "beam", "beam_width": 2}
    tiny_config["generate"]["num_samples"] = 2
    result = charrnn.run_pipeline(tiny_config, plugins=[charrnn_plugins.beam])
    assert calls == [(1, 20), (1, 20), (2, 50)]  # two training-time samples, then the generate stage
    assert len(result.texts) == 2 and result.texts[0] == result.texts[1]  # deterministic


def test_changing_the_temperature_of_a_sampler_in_use_takes_effect():
    logits = random_logits(50, 12, seed=4)
    sampler, rng = Temperature(), np.random.default_rng(0)
    sampler(logits, rng)  # draws a block of noise at temperature 1
    sampler.temperature = 1e-4
    assert np.array_equal(sampler(logits, rng), logits.argmax(-1))
