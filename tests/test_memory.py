"""Huge sizes are refused with one line and the estimate, before anything is allocated."""

from __future__ import annotations

import os

import numpy as np
import pytest
import yaml

import charrnn.memory
from charrnn import ConfigError, run_pipeline
from charrnn.cli import main
from charrnn.memory import check, format_bytes
from charrnn_plugins.beam import Beam
from charrnn_plugins.gru import GRU
from charrnn_plugins.lstm import LSTM
from charrnn_plugins.rnn import RNN

GiB = 1 << 30


@pytest.fixture
def eight_gib(monkeypatch):
    """This machine has 8 GiB available, whatever it really has: messages are deterministic."""
    monkeypatch.setattr(charrnn.memory, "available_bytes", lambda: 8 * GiB)


@pytest.fixture
def checkpoint(tiny_config, tmp_path):
    tiny_config["stages"] = ["train"]
    tiny_config["train"]["steps"] = 2
    run_pipeline(tiny_config)
    return tiny_config["train"]["checkpoint"]


def one_error_line(capsys, argv):
    capsys.readouterr()
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "Traceback" not in captured.err
    return lines[0]


def test_available_bytes_is_a_positive_count():
    found = charrnn.memory.available_bytes()
    assert found is None or (isinstance(found, int) and found > 0)


def test_format_bytes():
    assert format_bytes(512) == "512 bytes"
    assert format_bytes(3.5 * 1024 * 1024) == "3.5 MiB"
    assert format_bytes(120 * GiB) == "120 GiB"
    assert format_bytes(1 << 60) == "1,024 PiB"


def test_check_passes_what_fits_and_names_what_does_not(eight_gib, monkeypatch):
    check(8 * GiB, "anything")
    monkeypatch.setattr(charrnn.memory, "available_bytes", lambda: 1000)
    check(charrnn.memory.ALWAYS_FITS - 1, "small")  # never refused, never looked up
    with pytest.raises(ConfigError, match="this machine has 1000 bytes available"):
        check(charrnn.memory.ALWAYS_FITS, "large")
    monkeypatch.setattr(charrnn.memory, "available_bytes", lambda: 8 * GiB)
    with pytest.raises(ConfigError) as exc:
        check(120 * GiB, "model.hidden_size=100000", "parameters, gradients", "; use less")
    assert str(exc.value) == (
        "model.hidden_size=100000 needs about 120 GiB of memory (parameters, gradients); "
        "this machine has 8.0 GiB available; use less"
    )


def test_unknown_available_memory_refuses_nothing(monkeypatch):
    monkeypatch.setattr(charrnn.memory, "available_bytes", lambda: None)
    check(1 << 70, "anything")


@pytest.mark.parametrize("cls", [RNN, LSTM, GRU])
def test_huge_model_is_refused_before_allocating(cls, eight_gib, rng):
    with pytest.raises(
        ConfigError,
        match=r"^model.hidden_size=100000 \(vocabulary of 65\) needs about [\d.,]+ [GT]iB of memory",
    ):
        cls(vocab_size=65, rng=rng, hidden_size=100000)
    with pytest.raises(
        ConfigError, match=r"^model.hidden_size=1024, num_layers=100000 \(vocabulary of 65\) needs"
    ):
        cls(vocab_size=65, rng=rng, hidden_size=1024, num_layers=100000)


@pytest.mark.parametrize("cls", [RNN, LSTM, GRU])
def test_memory_estimate_covers_what_a_training_step_allocates(cls, rng):
    import tracemalloc

    B, T, V = 8, 20, 30
    tracemalloc.start()
    try:
        model = cls(vocab_size=V, rng=rng, hidden_size=32, num_layers=2, dropout=0.1)
        model.train_step(rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T)), model.init_state(B), rng=rng)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= model.memory_bytes(B, T) <= 4 * peak  # an estimate: not less, not far more


def test_cli_refuses_a_huge_hidden_size_in_one_line(capsys, tiny_config, tmp_path, eight_gib):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(tiny_config))
    line = one_error_line(capsys, ["run", str(path), "--set", "model.hidden_size=100000"])
    assert "model.hidden_size=100000" in line and "(parameters, gradients, optimizer state)" in line
    assert line.endswith("this machine has 8.0 GiB available")


def test_training_batch_is_estimated_with_its_activations(tiny_config, monkeypatch, rng):
    """Parameters fit, the (batch_size, seq_length) work arrays do not: refused before training."""
    tiny_config["model"]["hidden_size"] = 256
    tiny_config["train"].update(batch_size=4, seq_length=150)
    tiny_config["corpus"]["val_fraction"] = 0
    model = RNN(vocab_size=13, rng=rng, hidden_size=256)  # the tiny text has 13 characters
    assert model.memory_bytes(4, 150) > model.memory_bytes(0, 0) + 2_000_000
    monkeypatch.setattr(charrnn.memory, "available_bytes", lambda: model.memory_bytes(0, 0) + 1_000_000)
    monkeypatch.setattr(charrnn.memory, "ALWAYS_FITS", 0)  # megabytes: checked only for this test
    with pytest.raises(
        ConfigError,
        match=r"^training model 'rnn' with train.batch_size=4 and train.seq_length=150 needs about [\d.]+ MiB "
        r"of memory \(parameters, gradients, optimizer state, activations\)",
    ):
        run_pipeline(tiny_config)
    assert not os.path.exists(tiny_config["train"]["checkpoint"])  # refused before the first step


def test_yaml_num_chars_beyond_memory_is_refused(tiny_config, checkpoint, eight_gib):
    tiny_config["stages"] = ["generate"]
    tiny_config["generate"].update(num_chars=10_000_000_000, checkpoint=checkpoint)
    with pytest.raises(ConfigError) as exc:
        run_pipeline(tiny_config)
    message = str(exc.value)
    assert message.startswith("generate.num_chars=10000000000 needs about ")
    assert "(the generated text, kept whole also when streamed)" in message
    assert message.endswith("this machine has 8.0 GiB available; ask for fewer characters")


def test_cli_num_chars_and_samples_beyond_memory(capsys, checkpoint, eight_gib):
    line = one_error_line(capsys, ["generate", checkpoint, "--num-chars", "2000000000", "--num-samples", "8"])
    assert line.startswith("error: generate.num_chars=2000000000 with num_samples=8 needs about ")


def test_cli_huge_beam_width_is_refused(capsys, checkpoint, eight_gib):
    line = one_error_line(
        capsys,
        ["generate", checkpoint, "--sampler", "beam", "-o", "beam_width=100000000", "--num-chars", "10"],
    )
    assert line == "error: -o beam_width: must be in [1, 1024], got 100000000"
    line = one_error_line(
        capsys,
        ["generate", checkpoint, "--sampler", "beam", "-o", "beam_width=1024", "--num-chars", "3000000"],
    )
    assert line.startswith("error: beam search with beam_width=1024 over 3000000 characters needs about ")
    assert "(beam states, scores and back-pointers)" in line


def test_beam_estimate_grows_with_width_and_length():
    state = {"h": np.zeros((2, 64), np.float32)}
    small, wide, long = Beam(5), Beam(500), Beam(5)
    assert wide.memory_bytes(state, 2, 100, 65) > 50 * small.memory_bytes(state, 2, 100, 65)
    assert long.memory_bytes(state, 2, 100_000, 65) > 100 * small.memory_bytes(state, 2, 100, 65)


def test_ordinary_generation_is_not_refused(tiny_config, checkpoint, eight_gib):
    tiny_config["stages"] = ["generate"]
    tiny_config["sampler"] = {"type": "beam", "beam_width": 3}
    tiny_config["generate"].update(num_chars=40, checkpoint=checkpoint)
    assert len(run_pipeline(tiny_config).text) == 4 + 40


@pytest.mark.parametrize(
    ("key", "value", "start"),
    [
        ("generate.num_chars", 10_000_000_000, "generate.num_chars=10000000000 needs about "),
        ("train.sample_length", 10_000_000_000, "train.sample_length=10000000000 needs about "),
    ],
)
def test_train_then_generate_refuses_a_later_size_before_training(tiny_config, eight_gib, key, value, start):
    """The refusal comes before the first step, not after all the training (no work to lose)."""
    section, option = key.split(".")
    tiny_config[section][option] = value
    with pytest.raises(ConfigError, match=f"^{start}"):
        run_pipeline(tiny_config)
    assert not os.path.exists(tiny_config["train"]["checkpoint"])
