"""The public loaded model: `charrnn.load(path)`, then `generate` many times."""

from __future__ import annotations

import numpy as np
import pytest

import charrnn
from charrnn.cli import main
from charrnn.errors import ConfigError, PluginError

#: a plugin's sampler: the temperature sampler under another name
LOUD_PLUGIN = """
import charrnn
from charrnn_plugins.samplers import Temperature

class Loud(Temperature):
    pass

@charrnn.hookimpl
def charrnn_sampler(register):
    register("loud", Loud)
"""


@pytest.fixture(scope="module")
def loud(tmp_path_factory):
    path = tmp_path_factory.mktemp("plugin") / "loud.py"
    path.write_text(LOUD_PLUGIN)
    return str(path)


@pytest.fixture(scope="module")
def lstm_checkpoint(tmp_path_factory, loud):
    folder = tmp_path_factory.mktemp("loaded")
    text = folder / "t.txt"
    text.write_text("the cat sat on the mat. the dog sat on the log.\n" * 20)
    config = {
        "seed": 3,
        "corpus": {"type": "text", "path": str(text)},
        "model": {"type": "lstm", "hidden_size": 12, "num_layers": 2},
        "sampler": {"type": "loud", "temperature": 0.9},
        "stages": ["train"],
        "generate": {"seed_text": "the "},
        "train": {
            "steps": 5,
            "batch_size": 4,
            "seq_length": 8,
            "sample_every": None,
            "checkpoint": str(folder / "m.npz"),
        },
    }
    charrnn.run_pipeline(config, plugins=[loud])
    return str(folder / "m.npz")


def test_config_is_the_checkpoints_resolved_pipeline(lstm_checkpoint, loud):
    """Regression: `LoadedModel.load("lstm.npz").config["model"]` said {'type': 'rnn', 'hidden_size': 128}."""
    model = charrnn.load(lstm_checkpoint, plugins=[loud])
    assert model.config["model"] == {
        "type": "lstm",
        "hidden_size": 12,
        "num_layers": 2,
        "dropout": 0.0,
        "dtype": "float32",
    }
    assert model.config["train"]["steps"] == 5 and model.model_type == "lstm"
    assert model.config["sampler"]["type"] == "loud"


def test_generate_returns_the_samples_and_is_the_clis_text(lstm_checkpoint, loud, capsys):
    model = charrnn.load(lstm_checkpoint, plugins=[loud])
    one = model.generate("the ", 40, seed=5)
    assert isinstance(one, charrnn.Generation) and len(one) == 1 and len(one[0]) == 44
    assert str(one) == one.text == one[0] and one.reasons == ["length"]
    three = model.generate("the ", 30, seed=5, num_samples=3)
    assert [len(t) for t in three] == [34] * 3 and list(three) == three.texts
    assert str(three) == "\n---\n".join(three)
    assert (
        main(
            [
                "generate",
                lstm_checkpoint,
                "--plugin",
                loud,
                "--seed-text",
                "the ",
                "--num-chars",
                "40",
                "--seed",
                "5",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out == one.text + "\n"
    assert model.generate("the ", 40, seed=5) == one  # loaded once, generates many times alike


def test_stream_yields_the_first_sample_as_it_is_made(lstm_checkpoint, loud):
    model = charrnn.load(lstm_checkpoint, plugins=[loud])
    pieces = list(model.generate("the ", 300, seed=2, stream=True))
    assert pieces[0] == "the " and len(pieces) > 2  # the seed text, then several chunks
    assert "".join(pieces) == model.generate("the ", 300, seed=2)[0]
    seen = []
    whole = model.generate("the ", 50, seed=2, on_text=seen.append)
    assert "".join(seen) == whole[0]


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"num_chars": -1}, "num_chars: must be >= 0, got -1"),
        ({"num_samples": 0}, "num_samples: must be >= 1, got 0"),
        ({"seed": -2}, "seed: must be >= 0, got -2"),
        ({"sampler": "top_k", "k": 0}, "k: must be >= 1, got 0"),
        ({"temperature": "hot"}, "temperature: expected a number, got 'hot'"),
        ({"sampler": "top_k", "kk": 3}, "kk: unknown key (did you mean 'k'?)"),
        ({"stop": [""]}, "stop[0]: must be a non-empty string, got ''"),
    ],
)
def test_options_are_checked_per_call_in_the_callers_words(lstm_checkpoint, loud, options, words):
    model = charrnn.load(lstm_checkpoint, plugins=[loud])
    with pytest.raises(ConfigError) as info:
        model.generate(**options)
    assert str(info.value).startswith(words)


def test_an_explicit_sampler_needs_no_plugin_of_the_saved_one(lstm_checkpoint, capsys):
    """A checkpoint trained with a plugin's sampler generates with a builtin sampler without it."""
    model = charrnn.load(lstm_checkpoint)
    assert len(model.generate(num_chars=10, sampler="temperature")[0]) > 10
    assert len(model.generate(num_chars=10, sampler={"type": "greedy"})[0]) > 10
    with pytest.raises(
        PluginError, match=r"checkpoint .*m.npz: sampler.type: unknown sampler 'loud'.*--plugin|plugins"
    ):
        model.generate(num_chars=10)  # the saved one is needed only when no sampler is named
    assert main(["generate", lstm_checkpoint, "--sampler", "greedy", "--num-chars", "5"]) == 0
    assert len(capsys.readouterr().out) > 5


def test_the_engine_gives_one_request_the_same_text_alone_or_beside_others(lstm_checkpoint, loud):
    from charrnn.engine import Batch

    model = charrnn.load(lstm_checkpoint, plugins=[loud])
    alone = model.generate("the ", 60, seed=9, sampler="top_k", k=4)[0]
    requests = [
        model.request(seed_text="the ", num_chars=60, seed=9, sampler="top_k", sampler_options={"k": 4}),
        model.request(seed_text="a dog ", num_chars=25, seed=1, num_samples=3),
        model.request(seed_text="t", num_chars=80, seed=2, sampler="greedy"),
    ]
    batch = Batch(model.model, model.vocab, chunk=7)
    batch.add(requests[:1])
    batch.step()
    batch.add(requests[1:])  # join mid-way, at a chunk's end
    while batch.requests:
        batch.step()
    assert requests[0].texts == [alone]
    assert requests[2].texts == list(model.generate("t", 80, sampler="greedy"))
    assert np.all([len(t) == 31 for t in requests[1].texts])
