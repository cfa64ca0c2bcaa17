"""The `mingru` model: gradients, one-step generation against the full pass, carried state, resume, shapes."""

from __future__ import annotations

import ast
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

import charrnn
import charrnn.plugins
import charrnn_plugins.mingru as mingru_plugin
from charrnn import ConfigError, Model, PluginError
from charrnn.cli import main
from charrnn.engine import stepper
from charrnn.machine import flops
from charrnn.optim import packed_buffer
from charrnn_plugins.mingru import MinGRU
from charrnn_plugins.optimizers import Adam
from conftest import ROOT, option_problem, params_of
from reference_rnn import gradient_mismatches, random_batch, random_state, randomize

BLOCK_NAMES = ("gm", "Wc", "Wzh", "bzh", "Wo", "bo", "gf", "Wu", "bu", "Wd", "bd")


def make_model(V=5, D=4, seed=0, **options):
    options = {"num_layers": 2, "expansion": 1.25, "ffn_mult": 1.5, "conv_kernel": 3, **options}
    return randomize(MinGRU(V, np.random.default_rng(seed), hidden_size=D, dtype="float64", **options))


def test_fulfils_model_protocol(rng):
    assert isinstance(MinGRU(5, rng, hidden_size=8), Model)


def test_parameters_state_and_init(rng):
    model = MinGRU(7, rng, hidden_size=6, num_layers=2, expansion=1.5, ffn_mult=2, conv_kernel=3)
    H, F = 9, 12
    shapes = {"E": (7, 6), "gy": (6,), "Why": (6, 7), "by": (7,)}
    for suffix in ("", "1"):
        shapes.update(
            {
                f"gm{suffix}": (6,),
                f"Wc{suffix}": (3, 6),
                f"Wzh{suffix}": (6, 2 * H),
                f"bzh{suffix}": (2 * H,),
                f"Wo{suffix}": (H, 6),
                f"bo{suffix}": (6,),
                f"gf{suffix}": (6,),
                f"Wu{suffix}": (6, F),
                f"bu{suffix}": (F,),
                f"Wd{suffix}": (F, 6),
                f"bd{suffix}": (6,),
            }
        )
    assert {k: p.shape for k, p in model.params.items()} == shapes
    assert {p.dtype for p in model.params.values()} == {np.dtype(np.float32)}
    np.testing.assert_array_equal(model.params["Wc1"], [[0] * 6, [0] * 6, [1] * 6])  # the identity conv
    assert np.all(model.params["gm"] == 1) and np.all(model.params["gy"] == 1)
    z = 1 / (1 + np.exp(-model.params["bzh"][:H]))
    assert z.max() == pytest.approx(1 / 2) and z.min() == pytest.approx(1 / 64)  # memory of 2 to 64 steps
    state = model.init_state(4)
    assert {k: s.shape for k, s in state.items()} == {
        "h": (4, H),
        "conv": (4, 2, 6),
        "h1": (4, H),
        "conv1": (4, 2, 6),
    }
    assert all(not s.any() for s in state.values())
    assert set(MinGRU(7, rng, hidden_size=6, conv_kernel=1).init_state(2)) == {
        "h",
        "h1",
    }  # no conv, no window


@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("conv_kernel", [1, 3, 6])
@pytest.mark.parametrize("activation", ["gelu", "silu", "relu"])
def test_gradient_check_every_parameter_entry(num_layers, conv_kernel, activation):
    """Float64 central differences on every entry, from a non-zero carried state (T < K - 1 included)."""
    model = make_model(num_layers=num_layers, conv_kernel=conv_kernel, activation=activation)
    inputs, targets = random_batch(5, B=2, T=4)
    assert gradient_mismatches(model, inputs, targets, random_state(model, 2)) == []


@pytest.mark.parametrize("num_layers", [1, 2])
def test_gradient_check_with_dropout_under_a_fixed_mask(num_layers):
    model = make_model(num_layers=num_layers, dropout=0.4)
    inputs, targets = random_batch(5, B=2, T=5)
    state = random_state(model, 2)
    assert gradient_mismatches(model, inputs, targets, state, dropout_seed=7) == []


def test_gradcheck_command_on_a_mingru_pipeline(tmp_path, corpus_file, capsys):
    path = tmp_path / "p.yaml"
    config = {
        "corpus": {"type": "text", "path": str(corpus_file)},
        "model": {"type": "mingru", "hidden_size": 4, "num_layers": 2, "expansion": 1, "ffn_mult": 2},
    }
    path.write_text(yaml.safe_dump(config))
    assert main(["gradcheck", str(path), "--entries", "0"]) == 0
    out = capsys.readouterr().out
    assert out.count(" ok") == 4 + 2 * len(BLOCK_NAMES) and "FAIL" not in out
    assert main(["gradcheck", str(path), "--entries", "0", "--set", "model.dropout=0.3"]) == 0
    assert "FAIL" not in capsys.readouterr().out


def per_position_logits(model, inputs, state):
    """Logits (B, T, V) and the final state from `step`, one position at a time."""
    out = []
    for t in range(inputs.shape[1]):
        logits, state = model.step(inputs[:, t], state)
        out.append(logits)
    return np.stack(out, axis=1), state


@pytest.mark.parametrize("conv_kernel", [1, 3, 9])
@pytest.mark.parametrize("num_layers", [1, 2])
def test_one_step_generation_equals_the_full_forward_pass(conv_kernel, num_layers):
    model = make_model(V=6, D=5, num_layers=num_layers, conv_kernel=conv_kernel)
    inputs, targets = random_batch(6, B=3, T=7)
    for state in (model.init_state(3), random_state(model, 3)):  # zero and carried-in state
        logits, final = model.forward(inputs, state)
        stepped, stepped_final = per_position_logits(model, inputs, state)
        np.testing.assert_allclose(stepped, logits, rtol=1e-10, atol=1e-12)
        assert set(stepped_final) == set(final)
        for key in final:
            np.testing.assert_allclose(stepped_final[key], final[key], rtol=1e-10, atol=1e-12)
        logp = stepped - np.log(np.exp(stepped).sum(axis=2, keepdims=True))
        nll = -np.take_along_axis(logp, targets[..., None], axis=2).mean()
        assert model.loss(inputs, targets, state)[0] == pytest.approx(nll, rel=1e-12)


@pytest.mark.parametrize("conv_kernel", [1, 4])
@pytest.mark.parametrize("activation", ["gelu", "silu", "relu"])
@pytest.mark.parametrize("k", [1, 3])
def test_the_generation_stepper_computes_what_step_does(rng, conv_kernel, activation, k):
    """The stepper generation uses (`charrnn.engine.stepper`): `step`'s logits and state, call after call."""
    model = make_model(V=6, D=5, conv_kernel=conv_kernel, activation=activation)
    state = random_state(model, k)
    run = stepper(model, state)
    s = state
    for row in rng.integers(0, 6, (6, k)):
        expected, s = model.step(row, s)
        np.testing.assert_allclose(run(row), expected, rtol=1e-13, atol=1e-15)
        got = run.state()
        assert set(got) == set(s)
        for key, value in got.items():
            np.testing.assert_allclose(value, s[key], rtol=1e-13, atol=1e-15)
    for key in state:  # the state it started from is untouched
        assert not np.shares_memory(got[key], state[key])
    key = "conv" if conv_kernel > 1 else "h"
    with pytest.raises(ValueError, match=rf"state\['{key}'\] must have shape"):
        stepper(model, {**state, key: state[key][:, :1]})


@pytest.mark.parametrize("conv_kernel", [1, 3, 6])
def test_state_carried_across_chunks_equals_one_long_chunk(conv_kernel):
    """Chunks of 1, 2 and 5 positions (shorter and longer than the conv window) make one of 8."""
    model = make_model(V=6, D=5, conv_kernel=conv_kernel)
    inputs, targets = random_batch(6, B=2, T=8)
    state = random_state(model, 2)
    whole, whole_state = model.loss(inputs, targets, state)
    logits, _ = model.forward(inputs, state)
    total, s, parts = 0.0, state, []
    for a, b in ((0, 1), (1, 3), (3, 8)):
        part, _ = model.forward(inputs[:, a:b], s)
        loss, s = model.loss(inputs[:, a:b], targets[:, a:b], s)
        total += loss * (b - a)
        parts.append(part)
    assert total / 8 == pytest.approx(whole, rel=1e-12)
    np.testing.assert_allclose(np.concatenate(parts, axis=1), logits, rtol=1e-12, atol=1e-14)
    for key in whole_state:
        np.testing.assert_allclose(s[key], whole_state[key], rtol=1e-12, atol=1e-14)
    carried = model.train_step(inputs[:, :3], targets[:, :3], state).state  # train_step carries the same
    for key, value in model.loss(inputs[:, :3], targets[:, :3], state)[1].items():
        np.testing.assert_allclose(carried[key], value, rtol=1e-12)


def test_loss_equals_train_step_loss_and_the_conv_window_holds_the_last_inputs():
    model = make_model(V=6, D=5, conv_kernel=3)
    inputs, targets = random_batch(6, B=3, T=5)
    state = random_state(model, 3)
    loss, new_state = model.loss(inputs, targets, state)
    result = model.train_step(inputs, targets, state)
    assert loss == pytest.approx(result.loss, rel=1e-12)
    for key in new_state:
        np.testing.assert_allclose(new_state[key], result.state[key], rtol=1e-12)
    # block 0's conv inputs are the normalised embeddings: the window is those of the last two ids
    E, gm = model.params["E"][inputs[:, -2:]], model.params["gm"]
    u = E / np.sqrt((E**2).mean(axis=-1, keepdims=True) + mingru_plugin.EPS) * gm
    np.testing.assert_allclose(new_state["conv"], u, rtol=1e-12)


def test_dropout_is_reproducible_from_the_rng_and_absent_from_loss_and_step():
    model = make_model(dropout=0.5)
    plain = make_model()
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


def test_incoming_state_is_not_modified_and_returned_arrays_are_fresh():
    model = make_model(dropout=0.3)
    inputs, targets = random_batch(5, B=2, T=3)
    state = random_state(model, 2)
    before = {k: v.copy() for k, v in state.items()}
    result = model.train_step(inputs, targets, state, rng=np.random.default_rng(0))
    model.loss(inputs, targets, state)
    model.forward(inputs, state)
    model.step(inputs[:, 0], state)
    model.train_step(inputs, targets, result.state, rng=np.random.default_rng(0))
    for key in before:
        np.testing.assert_array_equal(state[key], before[key])
    again = model.train_step(inputs, targets, state, rng=np.random.default_rng(0)).state
    assert not any(np.shares_memory(result.state[k], again[k]) for k in again)
    _, state1 = model.step(inputs[:, 0], state)
    _, state2 = model.step(inputs[:, 1], state1)
    assert not any(np.shares_memory(state1[k], state2[k]) for k in state1)


def test_state_of_the_wrong_layout_raises_value_error(rng):
    model = MinGRU(5, rng, hidden_size=4, num_layers=2)
    inputs, targets = random_batch(5, B=2, T=3)
    state = model.init_state(2)
    del state["conv1"]
    with pytest.raises(ValueError, match=r"state lacks 'conv1'"):
        model.loss(inputs, targets, state)
    with pytest.raises(ValueError, match=r"state\['h'\] must have shape \(2, 6\)"):
        model.train_step(inputs, targets, model.init_state(3))
    with pytest.raises(ValueError, match=r"ids must have shape \(2,\)"):
        model.step(np.zeros(3, np.int64), model.init_state(2))
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 5\)"):
        model.loss(inputs + 5, targets, model.init_state(2))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"num_layers": 0}, r"num_layers: must be in \[1, 64\], got 0"),
        ({"hidden_size": 0}, "hidden_size: must be >= 1, got 0"),
        ({"hidden_size": 2.5}, "hidden_size: expected an integer, got 2.5"),
        ({"expansion": 0}, r"expansion: must be in \(0, 8\], got 0"),
        ({"ffn_mult": -1}, r"ffn_mult: must be in \(0, 16\], got -1"),
        ({"conv_kernel": 0}, r"conv_kernel: must be in \[1, 32\], got 0"),
        ({"conv_kernel": 1.5}, "conv_kernel: expected an integer, got 1.5"),
        ({"activation": "tanh"}, "activation: must be one of gelu, silu, relu, got 'tanh'"),
        ({"dropout": 1.0}, r"dropout: must be in \[0, 1\), got 1.0"),
        ({"dropout": "0.2"}, r"dropout: expected a number, got '0.2'"),
        ({"dtype": "float16"}, "dtype: must be one of float32, float64, got 'float16'"),
        ({"width": 3}, "width"),
    ],
)
def test_bad_options_are_refused_in_the_checkers_words(rng, options, message):
    assert re.search(message, option_problem(MinGRU, "model", 5, rng, **options))


def test_a_huge_model_is_refused_before_allocating(rng):
    with pytest.raises(ConfigError, match=r"model.hidden_size=1000000, .*needs about .* of memory"):
        MinGRU(5, rng, hidden_size=1_000_000)
    model = MinGRU(65, rng, hidden_size=32, num_layers=2)
    assert (
        model.memory_bytes(32, 64)
        > model.memory_bytes(1, 1)
        > 6 * 4 * sum(p.size for p in model.params.values())
    )


def test_parameters_and_gradients_are_packed_alike():
    model = make_model()
    _, grads, _ = model.train_step(*random_batch(5, 3, 4), model.init_state(3))
    assert packed_buffer(list(model.params.values())) is not None
    assert packed_buffer(list(grads.values())) is not None
    assert [s.key for s in Adam().slots(model.params, grads)] == ["*"]


def test_float32_learns_repetitive_text(tiny_text):
    vocab = sorted(set(tiny_text))
    ids = np.array([vocab.index(c) for c in tiny_text], dtype=np.uint8)
    model = MinGRU(len(vocab), np.random.default_rng(0), hidden_size=32, num_layers=2, dropout=0.1)
    B, T = 4, 16
    span = (len(ids) - 1) // B
    streams = np.stack([ids[b * span : (b + 1) * span + 1] for b in range(B)])  # (B, span + 1)
    state, losses, pos, rng = model.init_state(B), [], 0, np.random.default_rng(1)
    optimizer = Adam(lr=0.01)
    for _ in range(80):
        if pos + T >= span:
            state, pos = model.init_state(B), 0
        loss, grads, state = model.train_step(
            streams[:, pos : pos + T], streams[:, pos + 1 : pos + T + 1], state, rng=rng
        )
        assert state["h"].dtype == np.float32 and state["conv1"].dtype == np.float32
        optimizer.step(model.params, grads)
        losses.append(loss)
        pos += T
    assert np.mean(losses[-10:]) < 0.5 * losses[0]


# -- in a pipeline ------------------------------------------------------------------------------


def mingru_config(tiny_config, **options):
    tiny_config["model"] = {"type": "mingru", "hidden_size": 16, "num_layers": 2, "dropout": 0.2, **options}
    tiny_config["optimizer"] = {"type": "adam", "lr": 0.01}
    return tiny_config


def test_exact_resume(tiny_config, tmp_path):
    """30 steps straight equal 13 steps resumed to 30: parameters, optimizer and model state, metrics."""
    config = mingru_config(tiny_config)
    config["train"].update(steps=30, sample_every=7, eval_every=10)
    charrnn.run_pipeline(config)
    full, full_meta = params_of(config["train"]["checkpoint"])
    assert {"state/h1", "state/conv1", "optim/m.Wzh1", "optim/t"} <= full.keys()
    straight = metrics(config["train"]["checkpoint"])

    config["train"].update(steps=13, checkpoint=str(tmp_path / "part.npz"))
    charrnn.run_pipeline(config)
    config["train"].update(steps=30, resume=True)
    charrnn.run_pipeline(config)
    resumed, meta = params_of(config["train"]["checkpoint"])
    assert meta["step"] == 30 and full.keys() == resumed.keys()
    for key in full:
        assert np.array_equal(full[key], resumed[key]), key
    assert meta["smooth_loss"] == full_meta["smooth_loss"]
    assert meta["best_val_loss"] == full_meta["best_val_loss"]
    after = metrics(config["train"]["checkpoint"])
    assert after and {s: r for s, r in straight.items() if s > 13} == {
        s: r for s, r in after.items() if s > 13
    }


def metrics(checkpoint):
    """step -> (train_loss, val_loss) of a run's metrics file."""
    path = Path(checkpoint).with_suffix(".metrics.jsonl")
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return {r["step"]: (r["train_loss"], r.get("val_loss")) for r in records if "train_loss" in r}


def test_trains_and_generates_from_its_checkpoint(tiny_config):
    config = mingru_config(tiny_config, conv_kernel=3, activation="relu")
    result = charrnn.run_pipeline(config)
    assert result.train.steps == 20 and len(result.texts[0]) == len("the ") + 50
    text = charrnn.generate_text(config["train"]["checkpoint"], num_chars=None, seed_text=None)
    assert text == result.text  # the carried conv window and h reload with the model
    assert charrnn.generate_text(config["train"]["checkpoint"], num_chars=0, seed_text="dog") == "dog"


def test_export_refuses_it_in_one_line(tiny_config, tmp_path, capsys):
    config = mingru_config(tiny_config)
    config["train"]["steps"] = 2
    charrnn.run_pipeline(config)
    capsys.readouterr()
    assert main(["export", config["train"]["checkpoint"], "-o", str(tmp_path / "m.html")]) == 2
    err = capsys.readouterr().err.strip()
    assert "mingru" in err and len(err.splitlines()) == 1 and not (tmp_path / "m.html").exists()


# -- a plain plugin -----------------------------------------------------------------------------


def test_a_plain_model_plugin_loaded_from_its_file_as_a_third_party_would(tiny_config, monkeypatch):
    """Without the builtin registration, the module file listed under `plugins:` provides the model."""
    registered = {}
    mingru_plugin.charrnn_model(register=registered.__setitem__)
    assert registered == {"mingru": MinGRU}
    builtins = tuple(p for p in charrnn.plugins.DEFAULT_PLUGINS if p != "charrnn_plugins.mingru")
    monkeypatch.setattr(charrnn.plugins, "DEFAULT_PLUGINS", builtins)
    config = mingru_config(tiny_config)
    with pytest.raises(PluginError, match="unknown model 'mingru'"):
        charrnn.run_pipeline(config)
    config["plugins"] = [mingru_plugin.__file__]
    assert charrnn.run_pipeline(config).train.steps == 20


def test_imports_only_what_a_third_party_plugin_can():
    """numpy, the standard library, `charrnn`'s exported names and public modules, the shared recurrent code."""
    tree = ast.parse(Path(mingru_plugin.__file__).read_text())
    public_modules = {"charrnn.memory", "charrnn.optim", "charrnn.options", "charrnn_plugins.recurrent"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            assert {a.name for a in node.names} <= {"numpy", "math"}
        elif isinstance(node, ast.ImportFrom):
            if node.module == "charrnn":
                assert {a.name for a in node.names} <= set(charrnn.__all__)
            else:
                assert node.module in public_modules | {"__future__", "typing"}, node.module
    hooks = [n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("charrnn_")]
    assert hooks == ["charrnn_model"]


# -- matmul_shapes ------------------------------------------------------------------------------

V, D, B, T = 7, 5, 3, 4  # with expansion 0.6: H = 3; ffn_mult 1.6: F = 8 (all sides differ)


@pytest.fixture
def recorded(monkeypatch):
    """Every NumPy matrix product (2-D by 2-D, or a vector side counted as 1) the model runs."""
    seen: list[tuple[int, int, int]] = []

    def wrap(fn):
        def counted(a, b, *args, **kwargs):
            a, b = np.asarray(a), np.asarray(b)
            if a.ndim <= 2 and b.ndim <= 2 and max(a.ndim, b.ndim) == 2:
                seen.append((a.shape[0] if a.ndim == 2 else 1, a.shape[-1], b.shape[1] if b.ndim == 2 else 1))
            return fn(a, b, *args, **kwargs)

        return counted

    monkeypatch.setattr(np, "dot", wrap(np.dot))
    monkeypatch.setattr(np, "matmul", wrap(np.matmul))
    monkeypatch.setattr(mingru_plugin, "fast_dot", wrap(mingru_plugin.fast_dot))
    monkeypatch.setattr(mingru_plugin, "DENSE_SCATTER_MAX_VOCAB", 0)  # the one-hot scatter is a shortcut
    return seen


def expand(products):
    total = Counter()
    for m, k, n, count in products:
        total[(m, k, n)] += count
    return +total


def small_model(rng, layers, kernel):
    return MinGRU(V, rng, hidden_size=D, num_layers=layers, expansion=0.6, ffn_mult=1.6, conv_kernel=kernel)


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("kernel", [1, 3])
def test_train_products_are_those_the_step_performs(recorded, rng, layers, kernel):
    model = small_model(rng, layers, kernel)
    inputs, targets = rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))
    state = model.init_state(B)
    recorded.clear()
    model.train_step(inputs, targets, state)
    seen = Counter(s for s in recorded if 1 not in s)  # less the sums done as products with a vector
    assert seen == expand(model.matmul_shapes(B, T)["train"])


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("k", [1, 3])
def test_generate_products_are_those_one_step_performs(recorded, rng, layers, k):
    model = small_model(rng, layers, 3)
    run = stepper(model, model.init_state(k))
    recorded.clear()
    run(rng.integers(0, V, k))
    assert Counter(recorded) == expand(model.matmul_shapes(k, 1)["generate"])


def test_flops_per_char_match_the_closed_forms(rng):
    model = MinGRU(13, rng, hidden_size=8, num_layers=3, expansion=1.5, ffn_mult=4)
    Dm, H, F, L, Vm = 8, 12, 32, 3, 13
    assert flops(model.matmul_shapes(4, 6)["train"]) / 24 == 18 * L * Dm * H + 12 * L * Dm * F + 6 * Dm * Vm
    assert flops(model.matmul_shapes(1, 1)["generate"]) == 6 * L * Dm * H + 4 * L * Dm * F + 2 * Dm * Vm


def test_the_shakespeare_config_builds_a_3m_parameter_model():
    config = yaml.safe_load((ROOT / "configs" / "shakespeare_mingru.yaml").read_text())
    reference = yaml.safe_load((ROOT / "configs" / "shakespeare.yaml").read_text())
    assert config["corpus"] == reference["corpus"] and config["model"]["type"] == "mingru"
    options = {k: v for k, v in config["model"].items() if k != "type"}
    model = MinGRU(65, np.random.default_rng(0), **options)
    assert 2.5e6 < sum(p.size for p in model.params.values()) < 4e6
