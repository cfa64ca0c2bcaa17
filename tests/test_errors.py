"""Every bad input gets one line `error: ...` on stderr and exit status 2, never a traceback."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

import charrnn
from charrnn.cli import main

GOOD = """\
seed: 1
corpus: {{type: text, path: {corpus}, val_fraction: 0.1}}
model: {{type: rnn, hidden_size: 8}}
optimizer: {{type: adagrad, lr: 0.1}}
sampler: {{type: temperature, temperature: 1.0}}
stages: [train, generate]
train: {{steps: 3, batch_size: 2, seq_length: 8, sample_every: null, checkpoint: {ckpt}}}
generate: {{num_chars: 10, seed_text: "the "}}
"""


@pytest.fixture
def pipeline(tmp_path, corpus_file, monkeypatch):
    monkeypatch.setenv("CHARRNN_LOAD_PLUGINS", "")
    path = tmp_path / "p.yaml"
    path.write_text(GOOD.format(corpus=corpus_file, ckpt=tmp_path / "m.npz"))
    return path


def run_error(capsys, argv):
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert "Traceback" not in err
    return lines[0]


def test_good_pipeline_runs(capsys, pipeline):
    assert main(["run", str(pipeline)]) == 0
    assert capsys.readouterr().out.startswith("the ")


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda t: t.replace("seed: 1", "seed: [1"), r"line \d+.*malformed YAML"),
        (
            lambda t: t.replace("stages:", "stagse:"),
            r"line 6: stagse: unknown key \(did you mean 'stages'\?\)",
        ),
        (
            lambda t: t.replace("steps: 3", "stpes: 3"),
            r"line 7: train.stpes: unknown key \(did you mean 'steps'\?\)",
        ),
        (
            lambda t: t.replace("steps: 3", "steps: abc"),
            r"train.steps: expected an integer or null, got 'abc'",
        ),
        (lambda t: t.replace("steps: 3", "steps: 0"), r"train.steps: must be >= 1, got 0"),
        (lambda t: t.replace("seq_length: 8", "seq_length: 0"), r"train.seq_length: must be >= 1"),
        (lambda t: t.replace("lr: 0.1", "lr: -0.1"), r"line 4: optimizer.lr: must be > 0, got -0.1"),
        (lambda t: t.replace("lr: 0.1", "lr: fast"), r"line 4: optimizer.lr: expected a number, got 'fast'"),
        (
            lambda t: t.replace("lr: 0.1", "lrr: 0.1"),
            r"optimizer.lrr: unknown key \(did you mean 'lr'\?\); known keys: lr, eps, clip, clip_norm",
        ),
        (lambda t: t.replace("hidden_size: 8", "hidden_size: -3"), r"model.*hidden_size"),
        (
            lambda t: t.replace("type: rnn", "type: rnnn"),
            r"unknown model 'rnnn' \(did you mean 'rnn'\?\); available: .*rnn",
        ),
        (
            lambda t: t.replace("temperature: 1.0", "temperature: 0"),
            r"sampler.temperature: must be in \(0, 100\], got 0",
        ),
        (
            lambda t: t.replace("val_fraction: 0.1", "val_fraction: 1.0"),
            r"corpus.val_fraction: must be in \[0, 1\)",
        ),
        (
            lambda t: t.replace("val_fraction: 0.1", "val_fraction: -0.1"),
            r"corpus.val_fraction: must be in \[0, 1\)",
        ),
        (lambda t: t.replace("num_chars: 10", "num_chars: -1"), r"generate.num_chars: must be >= 0"),
        (
            lambda t: t.replace("[train, generate]", "[train, sing]"),
            r"stages\[1\]: must be one of train, evaluate, generate, got 'sing'",
        ),
        (
            lambda t: t.replace('seed_text: "the "', 'seed_text: "the Z"'),
            r"character 'Z' \(U\+005A\) is not in",
        ),
        (lambda t: t.replace("batch_size: 2", "batch_size: 1000"), r"batch_size x seq_length \+ 1 = 8001"),
        (
            lambda t: t.replace("val_fraction: 0.1", "val_fraction: 0.01"),
            r"validation split .* seq_length \+ 1 = 9",
        ),
        (lambda t: "plugins: [no_such_module_xyz]\n" + t, r"plugin module 'no_such_module_xyz' not found"),
        (lambda t: "- just\n- a list\n", r"must be a YAML mapping"),
        (
            lambda t: t.replace("steps: 3", "steps: null") + "schedule: {type: cosine}\n",
            r"schedule \(cosine\): .*needs train.steps",
        ),
        (lambda t: t.replace("sample_every: null", "sample_every: null, stepz: 3"), r"did you mean 'steps'"),
    ],
)
def test_bad_pipeline(capsys, pipeline, edit, expected):
    pipeline.write_text(edit(pipeline.read_text()))
    line = run_error(capsys, ["run", str(pipeline)])
    assert __import__("re").search(expected, line), line


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, r"corpus file not found"),
        (b"", r"is empty"),
        (b"\xff\xfe\xfa not utf8", r"not valid UTF-8"),
        (b"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", r"1 distinct character"),
    ],
)
def test_bad_corpus(capsys, pipeline, tmp_path, content, expected):
    bad = tmp_path / "bad.txt"
    if content is not None:
        bad.write_bytes(content)
    line = run_error(capsys, ["run", str(pipeline), "--set", f"corpus.path={bad}"])
    assert __import__("re").search(expected, line), line


def test_missing_pipeline_file(capsys, tmp_path):
    assert "pipeline file not found" in run_error(capsys, ["run", str(tmp_path / "nope.yaml")])


def test_bad_set_syntax(capsys, pipeline):
    assert "expected KEY.PATH=VALUE" in run_error(capsys, ["run", str(pipeline), "--set", "train.steps"])
    assert "not valid YAML" in run_error(capsys, ["run", str(pipeline), "--set", "train.steps=[1"])
    assert "did you mean 'steps'" in run_error(capsys, ["run", str(pipeline), "--set", "train.stepz=5"])


def test_bad_cli_arguments(capsys, pipeline):
    assert "invalid choice" in run_error(capsys, ["rnu", str(pipeline)])
    assert "invalid int value" in run_error(capsys, ["generate", "x.npz", "--num-chars", "many"])


@pytest.fixture
def checkpoint(capsys, pipeline, tmp_path):
    assert main(["run", str(pipeline), "--set", "stages=[train]"]) == 0
    capsys.readouterr()
    return tmp_path / "m.npz"


def test_bad_checkpoints(capsys, checkpoint, tmp_path):
    assert "checkpoint not found" in run_error(capsys, ["generate", str(tmp_path / "none.npz")])
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    assert "corrupt" in run_error(capsys, ["generate", str(truncated)])
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file at all")
    assert "corrupt" in run_error(capsys, ["generate", str(garbage)])
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, meta=np.array([{"evil": 1}], dtype=object))
    assert "pickled objects" in run_error(capsys, ["generate", str(pickled)])
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, weights=np.zeros(3))
    assert "not a charrnn checkpoint" in run_error(capsys, ["generate", str(foreign)])


def test_generate_errors(capsys, checkpoint):
    assert "--num-chars: must be >= 0, got -5" in run_error(
        capsys, ["generate", str(checkpoint), "--num-chars", "-5"]
    )
    assert "--temperature: must be in (0, 100], got 0" in run_error(
        capsys, ["generate", str(checkpoint), "--temperature", "0"]
    )
    line = run_error(capsys, ["generate", str(checkpoint), "--seed-text", "héllo"])
    assert "'é'" in line
    line = run_error(capsys, ["generate", str(checkpoint), "--sampler", "nope"])
    assert "available: " in line and "temperature" in line.split("available: ")[1]


class Explode:
    """An optimizer that works like plain SGD, then blows the parameters up after `after` steps."""

    def __init__(self, after: int = 0):
        self.after, self.calls = after, 0

    def step(self, params, grads):
        self.calls += 1
        for key, p in params.items():
            p -= 0.1 * grads[key]
            if self.calls > self.after:
                p *= np.float32(1e30)
                p *= np.float32(1e30)

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


class ExplodePlugin:
    @charrnn.hookimpl
    def charrnn_optimizer(self, register):
        register("explode", Explode)


def test_nan_loss_keeps_last_good_checkpoint(capsys, pipeline, tmp_path):
    args = ["train.steps=50", "train.save_every=20", "stages=[train]"]
    with pytest.raises(charrnn.TrainingError, match="no checkpoint was saved"):
        charrnn.run_pipeline(
            pipeline, plugins=[ExplodePlugin()], overrides=[*args, "optimizer={type: explode}"]
        )
    assert not (tmp_path / "m.npz").exists()

    with pytest.raises(
        charrnn.TrainingError, match=r"loss became nan at step 2[6-9].* step 20 in .* is kept"
    ):
        charrnn.run_pipeline(
            pipeline, plugins=[ExplodePlugin()], overrides=[*args, "optimizer={type: explode, after: 25}"]
        )
    with np.load(tmp_path / "m.npz", allow_pickle=False) as saved:
        assert all(np.isfinite(saved[k]).all() for k in saved.files if k.startswith("param/"))
        assert json.loads(str(saved["meta"]))["step"] == 20


def test_nan_loss_is_a_one_line_cli_error(capsys, pipeline, tmp_path):
    plugin = tmp_path / "explode_plugin.py"
    plugin.write_text(
        "import numpy as np\nimport charrnn\n\n"
        "class Explode:\n"
        "    def step(self, params, grads):\n"
        "        for p in params.values():\n"
        "            p *= np.float32(1e30)\n"
        "    def state_dict(self):\n        return {}\n"
        "    def load_state_dict(self, state):\n        pass\n\n"
        "@charrnn.hookimpl\ndef charrnn_optimizer(register):\n    register('explode', Explode)\n"
    )
    line = run_error(
        capsys, ["run", str(pipeline), "--set", f"plugins=[{plugin}]", "--set", "optimizer=explode"]
    )
    assert "loss became nan" in line


def test_print_config(capsys, pipeline):
    assert main(["run", str(pipeline), "--print-config", "--set", "train.steps=7"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["train"]["steps"] == 7
    assert resolved["optimizer"] == {
        "type": "adagrad",
        "lr": 0.1,
        "eps": 1e-8,
        "clip": 5.0,
        "clip_norm": None,
    }
    assert resolved["generate"]["checkpoint"] is None


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--temperature", "0"], "error: --temperature: must be in (0, 100], got 0.0"),
        (["--sampler", "top_k", "-o", "k=0"], "error: -o k: must be >= 1, got 0"),
        (["--sampler", "top_k", "-o", "kk=3"], "error: -o kk: unknown key (did you mean 'k'?)"),
        (["-o", "temperature=abc"], "error: -o temperature: expected a number, got 'abc'"),
        (["--sampler", "nope"], "error: --sampler: unknown sampler 'nope'"),
        (["--seed-text", "héllo"], "error: --seed-text: character 'é'"),
        (["--seed", "-3"], "error: --seed: must be >= 0"),
    ],
)
def test_generate_errors_name_the_flag_that_was_typed(capsys, checkpoint, args, expected):
    line = run_error(capsys, ["generate", str(checkpoint), *args])
    assert line.startswith(expected), line
    assert "--set" not in line


class BoostSampler:
    def __init__(self, boost: float = 1.0):
        self.boost = boost

    def __call__(self, logits, rng):
        return logits.argmax(-1)


class BoostPlugin:
    @charrnn.hookimpl
    def charrnn_sampler(self, register):
        register("vowel_boost", BoostSampler)


def test_checkpoint_whose_sampler_plugin_is_not_loaded_says_how_to_load_it(capsys, pipeline, tmp_path):
    config = yaml.safe_load(pipeline.read_text())
    config.update(stages=["train"], sampler={"type": "vowel_boost"})
    charrnn.run_pipeline(config, plugins=[BoostPlugin()])
    capsys.readouterr()
    line = run_error(capsys, ["generate", config["train"]["checkpoint"]])
    assert f"checkpoint {config['train']['checkpoint']}: sampler.type: unknown sampler 'vowel_boost'" in line
    assert line.endswith("install its plugin or name it with --plugin")
    text = charrnn.generate_text(config["train"]["checkpoint"], 5, "the ", plugins=[BoostPlugin()])
    assert len(text) == len("the ") + 5
