"""The training loop at its edges: output paths, metrics files, divergence, failing plugins."""

from __future__ import annotations

import builtins
import json
import os
import shutil

import numpy as np
import pytest

import charrnn
from charrnn import ConfigError, PluginFailure, TrainingError, run_pipeline
from charrnn.cli import main
from charrnn_plugins.rnn import RNN
from conftest import ROOT, params_of


def _strict_json(line):
    def refuse(name):
        raise ValueError(f"non-JSON constant {name}")

    return json.loads(line, parse_constant=refuse)


def _metrics(path):
    return [_strict_json(line) for line in path.read_text().splitlines()]


class Reports:
    """Records every report's step and, at each, the step of the checkpoint on disk (None: none yet)."""

    def __init__(self, checkpoint):
        self.checkpoint, self.steps, self.saved = checkpoint, [], []

    @charrnn.hookimpl
    def charrnn_train_report(self, step, metrics):
        self.steps.append(step)
        self.saved.append(params_of(self.checkpoint)[1]["step"] if os.path.exists(self.checkpoint) else None)


# -- 1: no validation split, checkpoint folder not there yet ------------------------------------


def test_issue_repro_default_run_without_val_split_creates_the_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "input.txt").write_text((ROOT / "data" / "input.txt").read_text()[:3000])
    (tmp_path / "m.yaml").write_text("corpus: {type: text, path: data/input.txt}\n")
    sets = [
        "train.steps=6",
        "train.sample_every=3",
        "train.batch_size=2",
        "model.hidden_size=8",
        "stages=[train]",
    ]
    code = main(["run", "m.yaml", *[arg for item in sets for arg in ("--set", item)]])
    assert code == 0, capsys.readouterr().err
    assert params_of(tmp_path / "runs" / "default" / "final_model.npz")[1]["step"] == 6
    records = _metrics(tmp_path / "runs" / "default" / "final_model.metrics.jsonl")
    assert [r["step"] for r in records] == [3, 6] and all(r["val_loss"] is None for r in records)


def test_a_metrics_write_failing_mid_run_warns_once_and_training_goes_on(tiny_config, tmp_path, capsys):
    metrics = tmp_path / "model.metrics.jsonl"

    class BreakMetrics:
        @charrnn.hookimpl
        def charrnn_train_report(self, step, metrics):
            if step == 5:  # the folder entry becomes a directory: every later append fails
                os.remove(tmp_path / "model.metrics.jsonl")
                os.mkdir(tmp_path / "model.metrics.jsonl")

    tiny_config["train"].update(steps=20, sample_every=5)
    result = run_pipeline(tiny_config, plugins=[BreakMetrics()])
    assert result.train.steps == 20 and [h["step"] for h in result.train.history] == [5, 10, 15, 20]
    assert params_of(tiny_config["train"]["checkpoint"])[1]["step"] == 20
    assert metrics.is_dir()
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and str(metrics) in warnings[0] and "training goes on" in warnings[0]


# -- 2: schedules checked at start-up; a failing plugin keeps the last good state ----------------


def test_cosine_warmup_without_steps_fails_at_start_up(tiny_config):
    tiny_config["schedule"] = {"type": "cosine", "warmup_steps": 3}
    tiny_config["train"].update(steps=None, save_every=2)
    with pytest.raises(ConfigError, match=r"schedule.*cosine.*needs train.steps or its own total_steps"):
        run_pipeline(tiny_config)
    assert not os.path.exists(tiny_config["train"]["checkpoint"])  # not a single step ran


def test_a_schedule_giving_a_non_finite_factor_fails_at_start_up(tiny_config):
    class Plugin:
        @charrnn.hookimpl
        def charrnn_schedule(self, register):
            register("cliff", lambda: lambda step, total: 1.0 if step < 15 else float("nan"))

    tiny_config["schedule"] = {"type": "cliff"}
    with pytest.raises(ConfigError, match=r"cliff.*factor nan for step 19"):
        run_pipeline(tiny_config, plugins=[Plugin()])


class Failing:
    """A plugin whose component raises RuntimeError at one step (it passes the start-up checks)."""

    def __init__(self, kind, at):
        self.kind, self.at = kind, at

    @charrnn.hookimpl
    def charrnn_schedule(self, register):
        def schedule(step, total):
            if self.kind == "schedule" and step == self.at:
                raise RuntimeError("schedule bug")
            return 1.0

        register("failing", lambda: schedule)

    @charrnn.hookimpl
    def charrnn_train_report(self, step, metrics):
        if self.kind == "report" and step == self.at:
            raise RuntimeError("report bug")


@pytest.mark.parametrize(("kind", "saved"), [("schedule", 7), ("report", 10)])
def test_a_plugin_failing_inside_the_loop_saves_the_last_good_state_first(
    tiny_config, tmp_path, capsys, kind, saved
):
    tiny_config["schedule"] = {"type": "failing"}
    tiny_config["train"].update(steps=30, sample_every=10)
    with pytest.raises(PluginFailure, match=f"failed: RuntimeError: {kind} bug"):
        run_pipeline(tiny_config, plugins=[Failing(kind, 7 if kind == "schedule" else 10)])
    arrays, meta = params_of(tiny_config["train"]["checkpoint"])
    assert meta["step"] == saved
    assert (
        f"saved step {saved} to {tiny_config['train']['checkpoint']} before the error"
        in capsys.readouterr().err
    )
    # the saved state is exact: resuming it to step 12 matches an uninterrupted run to step 12
    tiny_config["train"].update(steps=12, resume=True)
    tiny_config["stages"] = ["train"]
    run_pipeline(tiny_config, plugins=[Failing(kind, -1)])
    resumed, _ = params_of(tiny_config["train"]["checkpoint"])
    tiny_config["train"].update(resume=False, checkpoint=str(tmp_path / "straight.npz"))
    run_pipeline(tiny_config, plugins=[Failing(kind, -1)])
    straight, _ = params_of(tmp_path / "straight.npz")
    assert all(np.array_equal(straight[k], resumed[k]) for k in straight)


class TornOptimizer:
    """SGD that fails half-way through its update at call `at` (one parameter updated, not the rest)."""

    def __init__(self, at: int = 5, lr: float = 0.1):
        self.at, self.lr, self.calls = at, lr, 0

    def step(self, params, grads):
        self.calls += 1
        for i, name in enumerate(params):
            if self.calls == self.at and i == 1:
                raise RuntimeError("optimizer bug")
            params[name] -= self.lr * grads[name]

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


class NaNOptimizer(TornOptimizer):
    """SGD whose update at call `at` writes NaN into Wxh (the loss of that step is still finite)."""

    def step(self, params, grads):
        self.calls += 1
        for name in params:
            params[name] -= self.lr * grads[name]
        if self.calls >= self.at:
            params["Wxh"][...] = np.nan


class Optimizers:
    @charrnn.hookimpl
    def charrnn_optimizer(self, register):
        register("torn", TornOptimizer)
        register("nan", NaNOptimizer)


def test_an_optimizer_failing_half_way_saves_nothing(tiny_config):
    tiny_config["optimizer"] = {"type": "torn", "at": 5}
    tiny_config["train"].update(save_every=3)
    with pytest.raises(PluginFailure, match="failed: RuntimeError: optimizer bug"):
        run_pipeline(tiny_config, plugins=[Optimizers()])
    assert (
        params_of(tiny_config["train"]["checkpoint"])[1]["step"] == 3
    )  # the half-updated 5th step is not saved


# -- 4: output paths checked before the first step ----------------------------------------------


def _no_step_ran(tiny_config, plugins=()):
    reports = Reports(tiny_config["train"]["checkpoint"])
    tiny_config["train"].update(sample_every=1)
    return reports, [reports, *plugins]


@pytest.mark.parametrize(
    ("where", "key", "message"),
    [
        ("model.npz", "train.checkpoint", "is an existing folder"),
        ("model.best.npz", "train.keep_best", "is an existing folder"),
        ("model.metrics.jsonl", "train.metrics", "is an existing folder"),
    ],
)
def test_an_existing_folder_at_an_output_path_is_a_config_error(tiny_config, tmp_path, where, key, message):
    (tmp_path / where).mkdir()
    reports, plugins = _no_step_ran(tiny_config)
    with pytest.raises(ConfigError, match=f"^{key}: .*{where} {message}"):
        run_pipeline(tiny_config, plugins=plugins)
    assert reports.steps == []


@pytest.mark.parametrize(
    ("checkpoint", "message"),
    [
        ("runs\0x/model.npz", "NUL byte"),
        ("x" * 300 + ".npz", "bytes long; the file system allows"),
        ("afile/model.npz", "cannot write .*afile/model.npz"),  # a parent that is a file
        ("sub/", "expected a file path, got the folder .*sub/."),
    ],
)
def test_bad_checkpoint_paths_are_one_line_config_errors(tiny_config, tmp_path, capsys, checkpoint, message):
    (tmp_path / "afile").write_text("not a folder")
    tiny_config["train"]["checkpoint"] = f"{tmp_path}/{checkpoint}"
    reports, plugins = _no_step_ran(tiny_config)
    with pytest.raises(ConfigError, match=f"^train.checkpoint: .*{message}"):
        run_pipeline(tiny_config, plugins=plugins)
    assert reports.steps == []


def test_bad_checkpoint_path_from_the_cli_is_exit_2_and_one_line(tiny_config, tmp_path, capsys):
    import yaml

    tiny_config["train"]["checkpoint"] = str(tmp_path / ("y" * 300) / "model.npz")
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(tiny_config))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: line ") and err.count("\n") == 1
    assert "train.checkpoint: the name 'yyyy" in err and "is 300 bytes long" in err


def test_a_read_only_folder_is_found_before_the_first_step(tiny_config, tmp_path, monkeypatch):
    """Every way of creating a file in `ro/` fails as on a read-only mount (root ignores chmod)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    real_open, real_os_open = builtins.open, os.open

    def refuse(path):
        if isinstance(path, (str, os.PathLike)) and os.path.dirname(os.path.abspath(path)) == str(ro):
            raise OSError(30, "Read-only file system", str(path))

    monkeypatch.setattr(builtins, "open", lambda path, *a, **k: refuse(path) or real_open(path, *a, **k))
    monkeypatch.setattr(os, "open", lambda path, *a, **k: refuse(path) or real_os_open(path, *a, **k))
    tiny_config["train"]["checkpoint"] = str(ro / "model.npz")
    reports, plugins = _no_step_ran(tiny_config)
    with pytest.raises(
        ConfigError, match=r"^train.checkpoint: cannot write .*ro/model.npz: Read-only file system"
    ):
        run_pipeline(tiny_config, plugins=plugins)
    assert reports.steps == []


def test_output_folders_are_created_and_the_probe_leaves_nothing(tiny_config, tmp_path):
    ckpt = tmp_path / "a" / "b" / "model.npz"
    tiny_config["train"].update(checkpoint=str(ckpt), save_every=None)
    tiny_config["stages"] = ["train"]
    run_pipeline(tiny_config)
    assert sorted(p.name for p in ckpt.parent.iterdir()) == [
        "model.best.npz",
        "model.loss.svg",
        "model.metrics.jsonl",
        "model.npz",
    ]


# -- 5: divergence at the last step -------------------------------------------------------------


def test_nan_parameters_at_the_last_step_are_never_saved(tiny_config, tmp_path, capsys):
    tiny_config["optimizer"] = {"type": "nan", "at": 20}  # the 20th (last) update writes NaN
    tiny_config["train"].update(steps=20, sample_every=5, save_every=10)
    with pytest.raises(
        TrainingError, match=r"Wxh became non-finite at step 20.*checkpoint of step 10 .* is kept"
    ):
        run_pipeline(tiny_config, plugins=[Optimizers()])
    arrays, meta = params_of(tiny_config["train"]["checkpoint"])
    assert meta["step"] == 10 and all(np.isfinite(v).all() for v in arrays.values() if v.dtype.kind == "f")
    best, best_meta = params_of(tmp_path / "model.best.npz")
    assert best_meta["step"] <= 15 and np.isfinite(best["param/Wxh"]).all()
    assert [r["step"] for r in _metrics(tmp_path / "model.metrics.jsonl")] == [5, 10, 15]
    err = capsys.readouterr().err
    assert "val nan" not in err and "step 20" not in err


class NaNValRNN(RNN):
    """An RNN whose forward-only loss (used by evaluation) is NaN from the second evaluation on."""

    evaluations = 0

    def loss(self, inputs, targets, state):
        loss, state = super().loss(inputs, targets, state)
        return (float("nan") if NaNValRNN.evaluations >= 1 else loss), state


class NaNVal:
    @charrnn.hookimpl
    def charrnn_model(self, register):
        register("nanval", NaNValRNN)

    @charrnn.hookimpl
    def charrnn_train_report(self, step, metrics):
        NaNValRNN.evaluations += 1


def test_a_nan_validation_loss_is_an_error_never_the_best(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setattr(NaNValRNN, "evaluations", 0)
    tiny_config["model"]["type"] = "nanval"
    tiny_config["train"].update(steps=20, sample_every=5)
    with pytest.raises(TrainingError, match="the validation loss became nan at step 10"):
        run_pipeline(tiny_config, plugins=[NaNVal()])
    assert params_of(tmp_path / "model.best.npz")[1]["step"] == 5
    assert [r["step"] for r in _metrics(tmp_path / "model.metrics.jsonl")] == [5]


# -- 15: metrics files of fresh and resumed runs ------------------------------------------------


def _records(path):
    return [{k: v for k, v in r.items() if k not in ("time", "chars_per_sec")} for r in _metrics(path)]


def test_a_fresh_run_starts_the_metrics_file_anew(tiny_config, tmp_path):
    tiny_config["stages"] = ["train"]
    tiny_config["train"].update(steps=30, sample_every=10)
    run_pipeline(tiny_config)
    tiny_config["train"]["steps"] = 10
    run_pipeline(tiny_config)
    assert [r["step"] for r in _metrics(tmp_path / "model.metrics.jsonl")] == [10]


def test_a_resumed_run_has_the_metrics_of_an_uninterrupted_one(tiny_config, tmp_path):
    tiny_config["stages"] = ["train"]
    tiny_config["train"].update(steps=30, sample_every=5, checkpoint=str(tmp_path / "straight.npz"))
    run_pipeline(tiny_config)
    straight = _records(tmp_path / "straight.metrics.jsonl")
    assert [r["step"] for r in straight] == [5, 10, 15, 20, 25, 30]

    # a long run left lines up to step 30; then the model is resumed from a step-13 checkpoint
    tiny_config["train"].update(checkpoint=str(tmp_path / "model.npz"))
    run_pipeline(tiny_config)
    tiny_config["train"].update(steps=13, checkpoint=str(tmp_path / "part.npz"))
    run_pipeline(tiny_config)  # reports at 5, 10 and its end, 13
    shutil.copy(tmp_path / "part.npz", tmp_path / "model.npz")
    with open(tmp_path / "model.metrics.jsonl", "a") as f:
        f.write('{"step": 3')  # a line torn by a crash
    tiny_config["train"].update(steps=30, resume=True, checkpoint=str(tmp_path / "model.npz"))
    run_pipeline(tiny_config)
    assert _records(tmp_path / "model.metrics.jsonl") == straight

    # a run stopped at step 13 (its end-of-run report is not a regular one), then resumed
    assert [r["step"] for r in _metrics(tmp_path / "part.metrics.jsonl")] == [5, 10, 13]
    tiny_config["train"].update(checkpoint=str(tmp_path / "part.npz"))
    run_pipeline(tiny_config)
    assert _records(tmp_path / "part.metrics.jsonl") == straight


# -- contract: the final checkpoint is written before the last report -------------------------


def test_the_final_checkpoint_is_saved_before_the_last_report(tiny_config):
    reports = Reports(tiny_config["train"]["checkpoint"])
    tiny_config["train"].update(steps=23, sample_every=10, save_every=None)
    run_pipeline(tiny_config, plugins=[reports])
    assert reports.steps == [10, 20, 23]
    assert reports.saved[-1] == 23


def test_early_stopping_saves_before_its_last_report(tiny_config):
    from conftest import FrozenPlugin

    reports = Reports(tiny_config["train"]["checkpoint"])
    tiny_config["optimizer"] = {"type": "frozen"}
    tiny_config["train"].update(steps=500, sample_every=None, eval_every=2, patience=3)
    result = run_pipeline(tiny_config, plugins=[FrozenPlugin(), reports])
    assert result.train.steps == 8 and reports.steps == [2, 4, 6, 8] and reports.saved[-1] == 8


def test_report_metrics_hold_what_the_hookspec_says(tiny_config):
    seen = []

    class Reporter:
        @charrnn.hookimpl
        def charrnn_train_report(self, step, metrics):
            seen.append((step, metrics))

    tiny_config["train"].update(steps=22, sample_every=10, eval_every=4)
    run_pipeline(tiny_config, plugins=[Reporter()])
    assert [step for step, _ in seen] == [4, 8, 10, 12, 16, 20, 22]
    for step, m in seen:
        assert (
            set(m) == {"step", "train_loss", "val_loss", "lr", "chars_per_sec", "sample"}
            and m["step"] == step
        )
        assert (m["val_loss"] is not None) == (step % 4 == 0 or step == 22)
        assert (m["sample"] is not None) == (step % 10 == 0) and m["lr"] == 0.1


def test_gitignore_covers_what_the_classic_config_writes(tmp_path, monkeypatch, capsys):
    from fnmatch import fnmatch

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "input.txt").write_text((ROOT / "data" / "input.txt").read_text()[:3000])
    sets = ["train.steps=3", "train.sample_every=3", "corpus.val_fraction=0.5", "stages=[train]"]
    assert (
        main(["run", str(ROOT / "configs" / "classic.yaml"), *[a for s in sets for a in ("--set", s)]]) == 0
    )
    written = sorted(p.name for p in tmp_path.iterdir() if p.is_file())
    assert written == [
        "final_model.best.npz",
        "final_model.loss.svg",
        "final_model.metrics.jsonl",
        "final_model.npz",
    ]
    patterns = [line for line in (ROOT / ".gitignore").read_text().splitlines() if line and "/" not in line]
    for name in [
        *written,
        "final_model.npz.tmp",  # the start-up probe of a writable folder
        ".final_model.npz.x1y2z3.tmp",  # the atomic writers' temporaries
        ".final_model.loss.svg.x1y2z3.tmp",
    ]:
        assert any(fnmatch(name, pattern) for pattern in patterns), name
