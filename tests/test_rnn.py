from __future__ import annotations

import numpy as np
import pytest

from charrnn import tuning
from charrnn.engine import StepAdapter
from charrnn.generate import generate
from charrnn.types import Corpus
from charrnn_plugins.recurrent import MAX_CACHED_SHAPES
from charrnn_plugins.rnn import RNN
from charrnn_plugins.samplers import Temperature
from conftest import option_problem
from reference_rnn import random_batch, randomize, reference_loss_and_grads
from reference_rnn import random_state as stacked_state

KEYS = ("Wxh", "Whh", "Why", "bh", "by")


def make_model(V=5, H=4, scale=0.5, seed=0, **options):
    """A float64 model with non-trivial weights and biases (biases start at zero otherwise)."""
    rng = np.random.default_rng(seed)
    model = RNN(V, rng, hidden_size=H, dtype="float64", init_scale=scale, **options)
    model.params["bh"][:] = rng.standard_normal(H) * scale
    model.params["by"][:] = rng.standard_normal(V) * scale
    return model


def make_batch(V, B, T, seed=1):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, size=(B, T + 1))
    return ids[:, :-1], ids[:, 1:]


def random_state(model, B, seed=2):
    return {"h": np.random.default_rng(seed).uniform(-0.9, 0.9, (B, model.hidden_size))}


def test_registered_as_rnn(pm):
    registered = {}
    pm.hook.charrnn_model(register=registered.__setitem__)
    assert registered["rnn"] is RNN


def test_gradient_check_every_parameter_entry():
    model = make_model()
    inputs, targets = make_batch(5, B=2, T=3)
    state = random_state(model, 2)
    _, grads, _ = model.train_step(inputs, targets, state)
    grads = {k: g.copy() for k, g in grads.items()}
    eps = 1e-5
    for key in KEYS:
        param = model.params[key]
        for i in np.ndindex(param.shape):
            old = param[i]
            param[i] = old + eps
            plus, _ = model.loss(inputs, targets, state)
            param[i] = old - eps
            minus, _ = model.loss(inputs, targets, state)
            param[i] = old
            numeric, analytic = (plus - minus) / (2 * eps), grads[key][i]
            diff = abs(numeric - analytic)
            assert diff <= 1e-6 * (abs(numeric) + abs(analytic)) or diff < 1e-9, (key, i, analytic, numeric)


def test_batch_of_one_matches_reference():
    model = make_model(V=7, H=6, seed=3)
    inputs, targets = make_batch(7, B=1, T=9)
    state = random_state(model, 1)
    loss, grads, new_state = model.train_step(inputs, targets, state)
    ref_loss, ref_grads, ref_h = reference_loss_and_grads(model.params, inputs[0], targets[0], state["h"][0])
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-10)
    for key in KEYS:
        np.testing.assert_allclose(grads[key], ref_grads[key], rtol=1e-10, atol=1e-15, err_msg=key)
    np.testing.assert_allclose(new_state["h"][0], ref_h, rtol=1e-10)


@pytest.mark.parametrize("dense_scatter", [True, False])
def test_batch_equals_mean_of_reference_runs(dense_scatter):
    model = make_model(V=6, H=5, seed=4)
    model._dense_scatter = dense_scatter  # both ways of building dWxh
    B = 4
    inputs, targets = make_batch(6, B=B, T=7, seed=5)
    state = random_state(model, B)
    loss, grads, new_state = model.train_step(inputs, targets, state)
    runs = [reference_loss_and_grads(model.params, inputs[b], targets[b], state["h"][b]) for b in range(B)]
    np.testing.assert_allclose(loss, np.mean([r[0] for r in runs]), rtol=1e-10)
    for key in KEYS:
        expected = np.mean([r[1][key] for r in runs], axis=0)
        np.testing.assert_allclose(grads[key], expected, rtol=1e-10, atol=1e-15, err_msg=key)
    np.testing.assert_allclose(new_state["h"], np.stack([r[2] for r in runs]), rtol=1e-10)


def test_incoming_state_is_not_modified():
    model = make_model()
    inputs, targets = make_batch(5, B=2, T=3)
    state = random_state(model, 2)
    before = state["h"].copy()
    result = model.train_step(inputs, targets, state)
    model.loss(inputs, targets, state)
    model.step(inputs[:, 0], state)
    model.train_step(inputs, targets, result.state)  # a returned state survives the next call
    np.testing.assert_array_equal(state["h"], before)
    assert not np.shares_memory(result.state["h"], model.train_step(inputs, targets, state).state["h"])
    logits1, state1 = model.step(inputs[:, 0], state)
    logits2, state2 = model.step(inputs[:, 1], state1)
    assert not np.shares_memory(logits1, logits2) and not np.shares_memory(state1["h"], state2["h"])


def test_float32_by_default(rng):
    model = RNN(5, rng, hidden_size=8)
    assert {p.dtype for p in model.params.values()} == {np.dtype(np.float32)}
    assert {k: p.shape for k, p in model.params.items()} == {
        "Wxh": (5, 8),
        "Whh": (8, 8),
        "Why": (8, 5),
        "bh": (8,),
        "by": (5,),
    }
    inputs, targets = make_batch(5, B=2, T=3)
    loss, grads, state = model.train_step(inputs, targets, model.init_state(2))
    assert isinstance(loss, float)
    assert {g.dtype for g in grads.values()} == {np.dtype(np.float32)}
    assert state["h"].dtype == np.float32
    logits, _ = model.step(inputs[:, 0], model.init_state(2))
    assert logits.dtype == np.float32 and logits.shape == (2, 5)


def test_init_state_is_zero(rng):
    state = RNN(5, rng, hidden_size=8).init_state(3)
    np.testing.assert_array_equal(state["h"], np.zeros((3, 8)))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"hidden_size": 0}, "hidden_size: must be >= 1, got 0"),
        ({"hidden_size": 2.5}, "hidden_size: expected an integer, got 2.5"),
        (
            {"dtype": "float16"},
            "dtype: must be one of float32, float64, got 'float16' (did you mean 'float64'?)",
        ),
        ({"init_scale": 0}, "init_scale: must be > 0, got 0"),
        ({"init_scale": "big"}, "init_scale: expected a number, got 'big'"),
    ],
)
def test_bad_options_are_refused_in_one_wording(rng, options, message):
    assert option_problem(RNN, "model", 5, rng, **options) == message


def test_a_vocabulary_of_nothing_is_refused(rng):
    with pytest.raises(ValueError, match="vocab_size must be a positive integer"):
        RNN(vocab_size=0, rng=rng)


def test_mismatched_shapes_raise_value_error(rng):
    model = RNN(5, rng, hidden_size=4)
    inputs, targets = make_batch(5, B=2, T=3)
    with pytest.raises(ValueError, match=r"state\['h'\] must have shape \(2, 4\)"):
        model.train_step(inputs, targets, model.init_state(3))
    with pytest.raises(ValueError, match="inputs and targets"):
        model.loss(inputs, targets[:, :2], model.init_state(2))
    with pytest.raises(ValueError, match="ids must have shape"):
        model.step(inputs[:, 0], model.init_state(3))
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 5\), got 5..5"):
        model.train_step(inputs, np.full_like(targets, 5), model.init_state(2))
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 5\), got -1..3"):
        model.loss(np.array([[-1, 3]]), np.array([[0, 0]]), model.init_state(1))
    with pytest.raises(ValueError, match="B, T > 0"):
        model.loss(inputs[:, :0], targets[:, :0], model.init_state(2))


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int64])
def test_integer_input_dtypes(dtype):
    model = make_model()
    inputs, targets = make_batch(5, B=2, T=3)
    state = random_state(model, 2)
    expected = model.train_step(inputs, targets, state)
    expected = (expected.loss, {k: g.copy() for k, g in expected.grads.items()})
    loss, grads, _ = model.train_step(inputs.astype(dtype), targets.astype(dtype), state)
    assert loss == expected[0]
    for key in KEYS:
        np.testing.assert_array_equal(grads[key], expected[1][key])
    logits, _ = model.step(inputs[:, 0].astype(dtype), state)
    assert logits.shape == (2, 5)


def test_strided_input_views_work():
    model = make_model()
    ids = np.random.default_rng(0).integers(0, 5, size=(2, 20)).astype(np.uint8)
    inputs, targets = ids[:, 4:7], ids[:, 5:8]  # non-contiguous slices, as the training loop passes
    state = random_state(model, 2)
    expected, _ = model.loss(inputs.copy(), targets.copy(), state)
    assert model.loss(inputs, targets, state)[0] == expected


def test_buffer_cache_is_bounded():
    model = make_model()
    state = random_state(model, 1)
    for T in range(1, 2 * MAX_CACHED_SHAPES):
        inputs, targets = make_batch(5, B=1, T=T)
        model.loss(inputs, targets, state)
    assert len(model._buffers) == MAX_CACHED_SHAPES


def test_sgd_reduces_loss_on_repetitive_text(tiny_text):
    vocab = sorted(set(tiny_text))
    ids = np.array([vocab.index(c) for c in tiny_text], dtype=np.uint8)
    model = RNN(len(vocab), np.random.default_rng(0), hidden_size=32, init_scale=0.1)
    B, T = 4, 16
    span = (len(ids) - 1) // B
    streams = np.stack([ids[b * span : (b + 1) * span + 1] for b in range(B)])  # (B, span + 1)
    state, losses, pos = model.init_state(B), [], 0
    for _ in range(60):
        if pos + T >= span:
            state, pos = model.init_state(B), 0
        loss, grads, state = model.train_step(
            streams[:, pos : pos + T], streams[:, pos + 1 : pos + T + 1], state
        )
        for key, g in grads.items():
            model.params[key] -= 1.0 * g
        losses.append(loss)
        pos += T
    assert losses[0] == pytest.approx(np.log(len(vocab)), rel=0.05)
    assert np.mean(losses[-10:]) < 0.5 * losses[0]


# -- stacked layers and dropout ----------------------------------------------------------------


def make_stacked(V=5, H=4, seed=0, **options):
    return randomize(RNN(V, np.random.default_rng(seed), hidden_size=H, dtype="float64", **options))


def test_stacked_parameters_and_state_names_and_the_first_layer_unchanged():
    one = RNN(5, np.random.default_rng(0), hidden_size=4)
    three = RNN(5, np.random.default_rng(0), hidden_size=4, num_layers=3)
    assert list(three.params) == [*KEYS, "Wxh1", "Whh1", "bh1", "Wxh2", "Whh2", "bh2"]
    assert three.params["Wxh2"].shape == three.params["Whh2"].shape == (4, 4)
    for key in KEYS:  # the same draws as one layer, then the layers above
        np.testing.assert_array_equal(three.params[key], one.params[key])
    assert set(three.init_state(2)) == {"h", "h1", "h2"}


def test_without_dropout_train_step_draws_nothing_from_the_rng():
    model = make_model()
    inputs, targets = random_batch(5, B=2, T=3)
    rng = np.random.default_rng(0)
    before = rng.bit_generator.state
    expected = model.train_step(inputs, targets, random_state(model, 2)).loss
    assert model.train_step(inputs, targets, random_state(model, 2), rng=rng).loss == expected
    assert rng.bit_generator.state == before


def test_stacked_step_loss_and_chunks_agree():
    model = make_stacked(V=6, H=5, num_layers=2)
    inputs, targets = random_batch(6, B=3, T=8)
    state = stacked_state(model, 3)
    whole, whole_state = model.loss(inputs, targets, state)
    result = model.train_step(inputs, targets, state)
    assert result.loss == pytest.approx(whole, rel=1e-12)
    first, mid = model.loss(inputs[:, :3], targets[:, :3], state)
    second, end = model.loss(inputs[:, 3:], targets[:, 3:], mid)
    assert (3 * first + 5 * second) / 8 == pytest.approx(whole, rel=1e-12)
    s, losses = state, []
    for t in range(8):
        logits, s = model.step(inputs[:, t], s)  # (B, V)
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        losses.append(-logp[np.arange(3), targets[:, t]])
    assert np.mean(losses) == pytest.approx(whole, rel=1e-12)
    for key in whole_state:
        np.testing.assert_allclose(result.state[key], whole_state[key], rtol=1e-12)
        np.testing.assert_allclose(end[key], whole_state[key], rtol=1e-12)
        np.testing.assert_allclose(s[key], whole_state[key], rtol=1e-12)


@pytest.mark.bench
def test_bench_generation_against_a_torch_loop():
    """One stream at H 512: `generate` (sampler `temperature`) vs a per-character torch loop.

    The loop calls nn.RNN (one-hot input) + Linear, softmax, torch.multinomial and `.item()`; the
    contenders alternate in one process. Run with `env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python -m pytest -m bench -s tests/test_rnn.py`.
    The floor is reading the weights once per character (`Whh` alone is 1 MB at H=512): ~9 us
    with the generation stepper's one stacked product on both cores.
    """
    import time

    torch = pytest.importorskip("torch")
    from charrnn import Corpus
    from charrnn.generate import generate
    from charrnn_plugins.samplers import Temperature

    torch.set_num_threads(2)
    V, H, n = 65, 512, 2000
    vocab = Corpus(np.zeros(0, np.uint8), [chr(32 + i) for i in range(V)])
    model, sampler = RNN(V, np.random.default_rng(0), hidden_size=H, init_scale=0.05), Temperature()
    rnn, linear = torch.nn.RNN(V, H, batch_first=True), torch.nn.Linear(H, V)

    def torch_loop():
        with torch.no_grad():
            h, x = torch.zeros(1, 1, H), 0
            for _ in range(n):
                out, h = rnn(torch.nn.functional.one_hot(torch.tensor([[x]]), V).float(), h)
                x = torch.multinomial(torch.softmax(linear(out[0, -1]), dim=-1), 1).item()

    def step_loop():
        state, ids = model.init_state(1), np.array([0])
        for _ in range(n):
            _, state = model.step(ids, state)

    def charrnn_generate():
        generate(model, sampler, vocab, np.random.default_rng(0), "A", n)

    times = {torch_loop: [], step_loop: [], charrnn_generate: []}
    for run in times:
        run()
    for _ in range(7):
        for run, spent in times.items():
            start = time.perf_counter()
            run()
            spent.append((time.perf_counter() - start) / n)
    torch_s, step_s, gen_s = (float(np.median(spent)) for spent in times.values())
    print(
        f"\nper character: torch loop {torch_s * 1e6:.1f} us, rnn.step {step_s * 1e6:.1f} us, "
        f"generate {gen_s * 1e6:.1f} us ({1 / gen_s:,.0f} chars/s, {torch_s / gen_s:.2f}x torch)"
    )
    assert torch_s / gen_s >= 4.0  # the target


# -- the generation stepper ----------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize(("dtype", "rtol"), [("float64", 1e-12), ("float32", 2e-5)])
def test_stepper_gives_the_logits_and_state_of_step(k, dtype, rtol):
    V, H = 11, 16
    model = RNN(V, np.random.default_rng(0), hidden_size=H, dtype=dtype, init_scale=0.3)
    model.params["bh"][:] = np.random.default_rng(1).standard_normal(H) * 0.3
    model.params["by"][:] = np.random.default_rng(2).standard_normal(V) * 0.3
    state = {"h": np.random.default_rng(3).uniform(-0.9, 0.9, (k, H)).astype(dtype)}
    before = state["h"].copy()
    step = model.stepper(state)
    reference = state
    for ids in np.random.default_rng(4).integers(0, V, size=(30, k)):
        logits = step(ids)
        expected, reference = model.step(ids, reference)
        assert logits.shape == (k, V)
        np.testing.assert_allclose(logits, expected, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(step.state()["h"], reference["h"], rtol=rtol, atol=rtol)
    assert step.state()["h"].shape == (k, H) and step.state()["h"] is not step.state()["h"]
    assert np.array_equal(state["h"], before)  # the incoming state is not modified


def test_stepper_of_a_stacked_rnn_wraps_step():
    model = RNN(5, np.random.default_rng(0), hidden_size=4, num_layers=2)
    assert isinstance(model.stepper(model.init_state(2)), StepAdapter)


def test_generation_with_the_stepper_equals_generation_with_step(tiny_text):
    """Same model, same seed: the fast path and the plain `step` loop pick the same characters."""
    corpus = Corpus.from_text(tiny_text)
    model = RNN(len(corpus.vocab), np.random.default_rng(0), hidden_size=32, dtype="float64", init_scale=0.3)

    class StepOnly:  # the model without its stepper
        def __init__(self, m):
            self.init_state, self.step = m.init_state, m.step

    sampler = Temperature()
    for k in (1, 3):
        fast = generate(model, sampler, corpus, np.random.default_rng(5), "the ", 300, num_samples=k)
        slow = generate(
            StepOnly(model), sampler, corpus, np.random.default_rng(5), "the ", 300, num_samples=k
        )
        assert fast == slow


@pytest.mark.parametrize("several_cpus", [True, False])
def test_padded_rows_only_just_below_the_openblas_threading_threshold(monkeypatch, several_cpus):
    monkeypatch.setenv("CHARRNN_TUNING", "pad_gemv")
    monkeypatch.setattr(tuning, "_openblas_on_several_threads", lambda: several_cpus)
    threshold = tuning.OPENBLAS_THREADED_GEMV
    assert tuning.padded_rows(577, 512) == (900 if several_cpus else 577)  # hidden 512, V 65
    assert (tuning.padded_rows(577, 512) * 512 >= threshold) == several_cpus
    assert tuning.padded_rows(165, 100) == 165  # far below: padding would cost more than it gives
    assert tuning.padded_rows(1000, 512) == 1000  # threaded already
    monkeypatch.setenv("CHARRNN_TUNING", "off")
    assert tuning.padded_rows(577, 512) == 577  # the trick turned off


@pytest.mark.parametrize("padded", [True, False])
def test_stepper_with_a_padded_matrix_gives_the_logits_of_step(monkeypatch, padded):
    monkeypatch.setenv("CHARRNN_TUNING", "pad_gemv")
    monkeypatch.setattr(tuning, "_openblas_on_several_threads", lambda: padded)
    V, H = 65, 512
    model = RNN(V, np.random.default_rng(0), hidden_size=H, init_scale=0.05)
    model.params["by"][:] = np.random.default_rng(2).standard_normal(V)
    state = {"h": np.random.default_rng(3).uniform(-0.9, 0.9, (1, H)).astype(np.float32)}
    step, reference = model.stepper(state), state
    assert step.W.shape[0] == (900 if padded else H + V)
    for ids in np.random.default_rng(4).integers(0, V, size=(20, 1)):
        expected, reference = model.step(ids, reference)
        np.testing.assert_allclose(step(ids), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(step.state()["h"], reference["h"], rtol=1e-4, atol=1e-5)
