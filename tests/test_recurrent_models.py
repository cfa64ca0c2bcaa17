"""Tests shared by the recurrent models (LSTM, GRU and, where it applies, the plain RNN).

What is specific to one model (parameter layout, the reference/oracle it must match) stays in
test_lstm.py, test_gru.py and test_rnn.py.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

import charrnn
import charrnn_plugins.gru as gru_plugin
import charrnn_plugins.lstm as lstm_plugin
import charrnn_plugins.rnn as rnn_plugin
from charrnn import Model
from charrnn.optim import packed_buffer
from charrnn_plugins.gru import GRU
from charrnn_plugins.lstm import LSTM
from charrnn_plugins.optimizers import Adam
from charrnn_plugins.rnn import RNN
from conftest import option_problem
from reference_rnn import gradient_mismatches, random_batch, random_state, randomize, speed_vs_torch

GATED = [pytest.param(LSTM, id="lstm"), pytest.param(GRU, id="gru")]
ALL = [*GATED, pytest.param(RNN, id="rnn")]

PLUGINS = {LSTM: lstm_plugin, GRU: gru_plugin, RNN: rnn_plugin}
NAMES = {LSTM: "lstm", GRU: "gru", RNN: "rnn"}
LAST_STATE_KEY = {LSTM: "c1", GRU: "h1", RNN: "h1"}  # of a two-layer model


def make_model(cls, V=5, H=4, seed=0, **options):
    return randomize(cls(V, np.random.default_rng(seed), hidden_size=H, dtype="float64", **options))


@pytest.mark.parametrize("cls", ALL)
def test_fulfils_model_protocol(rng, cls):
    assert isinstance(cls(5, rng), Model)


@pytest.mark.parametrize("cls", GATED)
def test_registered_and_trains_in_a_pipeline(tiny_config, cls):
    registered, name, plugin = {}, NAMES[cls], PLUGINS[cls]
    plugin.charrnn_model(register=registered.__setitem__)
    assert registered == {name: cls}
    tiny_config["model"] = {"type": name, "hidden_size": 16, "num_layers": 2, "dropout": 0.2}
    result = charrnn.run_pipeline(tiny_config, plugins=[plugin])
    assert len(result.texts[0]) == len("the ") + 50
    assert result.train.steps == 20


@pytest.mark.parametrize(
    "cls, gates, shapes, state_keys",
    [
        pytest.param(
            LSTM,
            4,
            {
                "Wxh": (7, 24),
                "Whh": (6, 24),
                "Why": (6, 7),
                "bh": (24,),
                "by": (7,),
                "Wxh1": (6, 24),
                "Whh1": (6, 24),
                "bh1": (24,),
            },
            {"h", "c", "h1", "c1"},
            id="lstm",
        ),
        pytest.param(
            GRU,
            3,
            {
                "Wxh": (7, 18),
                "Whh": (6, 18),
                "Why": (6, 7),
                "bh": (18,),
                "bhn": (6,),
                "by": (7,),
                "Wxh1": (6, 18),
                "Whh1": (6, 18),
                "bh1": (18,),
                "bhn1": (6,),
            },
            {"h", "h1"},
            id="gru",
        ),
    ],
)
def test_parameters_names_shapes_and_init(rng, cls, gates, shapes, state_keys):
    model = cls(7, rng, hidden_size=6, num_layers=2)
    assert {k: p.shape for k, p in model.params.items()} == shapes
    assert {p.dtype for p in model.params.values()} == {np.dtype(np.float32)}
    for block in np.split(model.params["Whh1"], gates, axis=1):  # orthogonal recurrent blocks
        np.testing.assert_allclose(block.T @ block, np.eye(6), atol=1e-6)
    assert set(model.init_state(3)) == state_keys
    assert all(np.array_equal(s, np.zeros((3, 6))) for s in model.init_state(3).values())


def assert_one_layer_matches_reference(cls, reference):
    """`reference(params, inputs, targets, state)` runs one stream and returns (loss, final state)."""
    model = make_model(cls, V=7, H=6, seed=3)
    B = 3
    inputs, targets = random_batch(7, B, 9, seed=5)
    state = random_state(model, B)
    loss, new_state = model.loss(inputs, targets, state)
    runs = [
        reference(model.params, inputs[b], targets[b], {k: s[b] for k, s in state.items()}) for b in range(B)
    ]
    assert loss == pytest.approx(np.mean([r[0] for r in runs]), rel=1e-12)
    assert set(new_state) == set(runs[0][1])
    for key in new_state:
        np.testing.assert_allclose(new_state[key], np.stack([r[1][key] for r in runs]), rtol=1e-12)


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_gradient_check_every_parameter_entry(cls, num_layers):
    model = make_model(cls, num_layers=num_layers)
    inputs, targets = random_batch(5, B=2, T=3)
    assert gradient_mismatches(model, inputs, targets, random_state(model, 2)) == []


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize("num_layers", [1, 2])
def test_gradient_check_with_dropout_under_a_fixed_mask(cls, num_layers):
    model = make_model(cls, num_layers=num_layers, dropout=0.4)
    inputs, targets = random_batch(5, B=2, T=3)
    state = random_state(model, 2)
    assert gradient_mismatches(model, inputs, targets, state, dropout_seed=7) == []


@pytest.mark.parametrize("cls", ALL)
def test_dropout_is_reproducible_from_the_rng_and_absent_from_loss_and_step(cls):
    model = make_model(cls, num_layers=2, dropout=0.5)
    plain = make_model(cls, num_layers=2)
    inputs, targets = random_batch(5, B=3, T=4)
    state = random_state(model, 3)
    first = model.train_step(inputs, targets, state, rng=np.random.default_rng(1)).loss
    assert model.train_step(inputs, targets, state, rng=np.random.default_rng(1)).loss == first
    assert model.train_step(inputs, targets, state, rng=np.random.default_rng(2)).loss != first
    assert plain.train_step(inputs, targets, state).loss != first
    assert model.loss(inputs, targets, state)[0] == plain.loss(inputs, targets, state)[0]
    np.testing.assert_array_equal(model.step(inputs[:, 0], state)[0], plain.step(inputs[:, 0], state)[0])
    with pytest.raises(ValueError, match="dropout > 0 needs"):
        model.train_step(inputs, targets, state)


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize("num_layers", [1, 2])
def test_loss_equals_train_step_loss(cls, num_layers):
    model = make_model(cls, V=6, H=5, num_layers=num_layers)
    inputs, targets = random_batch(6, B=3, T=5)
    state = random_state(model, 3)
    loss, new_state = model.loss(inputs, targets, state)
    result = model.train_step(inputs, targets, state)
    assert loss == pytest.approx(result.loss, rel=1e-12)
    for key in new_state:
        np.testing.assert_allclose(new_state[key], result.state[key], rtol=1e-12)


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize("num_layers", [1, 2])
def test_step_by_step_logits_give_the_same_loss(cls, num_layers):
    model = make_model(cls, V=6, H=5, num_layers=num_layers)
    inputs, targets = random_batch(6, B=3, T=5)
    state = random_state(model, 3)
    loss, final = model.loss(inputs, targets, state)
    s, losses = state, []
    for t in range(inputs.shape[1]):
        logits, s = model.step(inputs[:, t], s)  # (B, V)
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        losses.append(-logp[np.arange(3), targets[:, t]])
    assert np.mean(losses) == pytest.approx(loss, rel=1e-12)
    for key in final:
        np.testing.assert_allclose(s[key], final[key], rtol=1e-12)


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize("num_layers", [1, 2])
def test_state_carried_across_chunks_equals_one_long_chunk(cls, num_layers):
    model = make_model(cls, V=6, H=5, num_layers=num_layers)
    inputs, targets = random_batch(6, B=2, T=8)
    state = random_state(model, 2)
    whole, whole_state = model.loss(inputs, targets, state)
    first, mid = model.loss(inputs[:, :3], targets[:, :3], state)
    second, end = model.loss(inputs[:, 3:], targets[:, 3:], mid)
    assert (3 * first + 5 * second) / 8 == pytest.approx(whole, rel=1e-12)
    for key in end:
        np.testing.assert_allclose(end[key], whole_state[key], rtol=1e-12)


@pytest.mark.parametrize("cls", ALL)
def test_incoming_state_is_not_modified_and_returned_arrays_are_fresh(cls):
    model = make_model(cls, num_layers=2, dropout=0.3)
    inputs, targets = random_batch(5, B=2, T=3)
    state = random_state(model, 2)
    before = {k: v.copy() for k, v in state.items()}
    result = model.train_step(inputs, targets, state, rng=np.random.default_rng(0))
    model.loss(inputs, targets, state)
    model.step(inputs[:, 0], state)
    model.train_step(inputs, targets, result.state, rng=np.random.default_rng(0))
    for key in before:
        np.testing.assert_array_equal(state[key], before[key])
    again = model.train_step(inputs, targets, state, rng=np.random.default_rng(0)).state
    assert not any(np.shares_memory(result.state[k], again[k]) for k in again)
    _, state1 = model.step(inputs[:, 0], state)
    _, state2 = model.step(inputs[:, 1], state1)
    assert not any(np.shares_memory(state1[k], state2[k]) for k in state1)


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize(
    "options, message",
    [
        ({"num_layers": 0}, "num_layers: must be in \\[1, 64\\], got 0"),
        ({"num_layers": 1.5}, "num_layers: expected an integer, got 1.5"),
        ({"dropout": 1.0}, r"dropout: must be in \[0, 1\), got 1.0"),
        ({"dropout": -0.1}, r"dropout: must be in \[0, 1\)"),
        ({"dropout": -0.5}, r"dropout: must be in \[0, 1\)"),
        ({"dropout": True}, r"dropout: expected a number, got true"),
        ({"dropout": "0.2"}, r"dropout: expected a number, got '0.2'"),
        ({"hidden_size": 0}, "hidden_size: must be >= 1, got 0"),
        ({"dtype": "float16"}, "dtype: must be one of float32, float64, got 'float16'"),
    ],
)
def test_bad_options_are_refused_in_one_wording(rng, cls, options, message):
    assert re.search(message, option_problem(cls, "model", 5, rng, **options))


@pytest.mark.parametrize("cls", ALL)
def test_state_of_the_wrong_layout_raises_value_error(rng, cls):
    model = cls(5, rng, hidden_size=4, num_layers=2)
    inputs, targets = random_batch(5, B=2, T=3)
    state = model.init_state(2)
    missing = LAST_STATE_KEY[cls]
    del state[missing]
    with pytest.raises(ValueError, match=rf"state lacks '{missing}'"):
        model.loss(inputs, targets, state)
    with pytest.raises(ValueError, match=r"state\['h'\] must have shape \(2, 4\)"):
        model.train_step(inputs, targets, model.init_state(3))


@pytest.mark.parametrize("cls", GATED)
def test_float32_learns_repetitive_text(tiny_text, cls):
    vocab = sorted(set(tiny_text))
    ids = np.array([vocab.index(c) for c in tiny_text], dtype=np.uint8)
    model = cls(len(vocab), np.random.default_rng(0), hidden_size=32)
    B, T = 4, 16
    span = (len(ids) - 1) // B
    streams = np.stack([ids[b * span : (b + 1) * span + 1] for b in range(B)])  # (B, span + 1)
    state, losses, pos = model.init_state(B), [], 0
    optimizer = Adam(lr=0.01)
    for _ in range(80):
        if pos + T >= span:
            state, pos = model.init_state(B), 0
        loss, grads, state = model.train_step(
            streams[:, pos : pos + T], streams[:, pos + 1 : pos + T + 1], state
        )
        assert state["h"].dtype == np.float32
        optimizer.step(model.params, grads)
        losses.append(loss)
        pos += T
    assert losses[0] == pytest.approx(np.log(len(vocab)), rel=0.05)
    assert np.mean(losses[-10:]) < 0.5 * losses[0]


@pytest.mark.bench
@pytest.mark.parametrize("cls", GATED)
def test_bench_trains_at_least_0_9x_as_fast_as_torch(cls):
    """H 512, batch 32, seq 64, V 65, float32, Adam; torch: nn.LSTM / nn.GRU + Linear + cross-entropy + Adam.

    Run with `env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python -m pytest -m bench -s tests/test_recurrent_models.py`
    (add `-k lstm` or `-k gru` for one model).
    """
    torch = pytest.importorskip("torch")
    name = NAMES[cls]
    model = cls(65, np.random.default_rng(0), hidden_size=512)
    torch_module = getattr(torch.nn, cls.__name__)(65, 512, batch_first=True)
    ratio, ours, theirs = speed_vs_torch(model, torch_module, Adam(clip_norm=None))
    print(
        f"\n{name} H512 B32 T64: charrnn {ours * 1e3:.1f} ms/step, torch {theirs * 1e3:.1f} ms/step, {ratio:.2f}x"
    )
    assert ratio >= 0.9


@pytest.mark.parametrize("cls", ALL)
def test_parameters_and_gradients_are_packed_alike(tiny_config, tmp_path, cls):
    """Packed, the optimizer takes one slot over all parameters; a checkpoint reload keeps the packing."""
    model = make_model(cls, num_layers=2)
    _, grads, _ = model.train_step(*random_batch(5, 3, 4), model.init_state(3))
    assert packed_buffer(list(model.params.values())) is not None
    assert packed_buffer(list(grads.values())) is not None
    assert [s.key for s in Adam().slots(model.params, grads)] == ["*"]
    tiny_config["model"] = {"type": NAMES[cls], "hidden_size": 8}
    tiny_config["train"]["checkpoint"] = str(tmp_path / "m.npz")
    charrnn.run_pipeline(tiny_config)
    loaded = charrnn.Pipeline(tiny_config).load(str(tmp_path / "m.npz")).model
    assert packed_buffer(list(loaded.params.values())) is not None
