"""`charrnn sweep`: the sweep file, --dry-run, and the local backend (trials as `charrnn run` processes)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import yaml
from sweep_helpers import first_done_second_running, results, resume_keeps_0000

from charrnn import cli
from charrnn.errors import ConfigError
from charrnn_plugins import sweep as sw
from charrnn_plugins.sweep import locks
from charrnn_plugins.sweep import trials as sweep_trials
from conftest import TINY_TEXT, process_gone, wait_for

BASE = {
    "seed": 1,
    "corpus": {"type": "text", "path": "tiny.txt", "val_fraction": 0.1},
    "model": {"type": "rnn", "hidden_size": 8},
    "optimizer": {"type": "adagrad", "lr": 0.1},
    "stages": ["train", "generate"],
    "train": {
        "steps": 40,
        "batch_size": 4,
        "seq_length": 8,
        "sample_every": None,
        "eval_every": 20,
        "checkpoint": "runs/base/model.npz",
    },
    "generate": {"num_chars": 20, "seed_text": "the "},
}


@pytest.fixture
def here(tmp_path, monkeypatch):
    """A launch folder with the tiny corpus and base.yaml; relative paths resolve here."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.txt").write_text(TINY_TEXT, encoding="utf-8")
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(BASE), encoding="utf-8")
    return tmp_path


def write(here, text: str, name: str = "s.yaml"):
    path = here / name
    path.write_text(text, encoding="utf-8")
    return str(path.name)


def sweep_main(capsys, *args):
    code = cli.main(["sweep", *args])
    out, err = capsys.readouterr()
    return code, out, err


GOOD = """pipeline: base.yaml
search:
  optimizer.lr: {loguniform: [0.01, 0.5]}
  model.hidden_size: {choice: [4, 8]}
  train.seq_length: {randint: [4, 9]}
  optimizer.clip_norm: {uniform: [1.0, 5.0]}
  model.type: {grid: [rnn, gru]}
samples: 3
backend: local
"""


def test_spaces_draws_are_in_range_seeded_and_grid_times_samples(here):
    sweep = sw.load_sweep(write(here, GOOD))
    trials = sw.draw_trials(sweep)
    assert [t.id for t in trials] == [f"{i:04d}" for i in range(6)]  # 2 grid points x 3 samples
    assert [t.values["model.type"] for t in trials] == ["rnn"] * 3 + ["gru"] * 3
    for t in trials:
        assert 0.01 <= t.values["optimizer.lr"] < 0.5
        assert t.values["model.hidden_size"] in (4, 8)
        assert isinstance(t.values["train.seq_length"], int) and 4 <= t.values["train.seq_length"] < 9
        assert 1.0 <= t.values["optimizer.clip_norm"] < 5.0
    assert [t.values for t in sw.draw_trials(sweep)] == [t.values for t in trials]
    other = sw.load_sweep(write(here, GOOD + "seed: 1\n"))
    assert [t.values for t in sw.draw_trials(other)] != [t.values for t in trials]


def test_randint_high_end_is_exclusive():
    space = sw.Space("k", "randint", (3, 5))
    draws = {space.draw(np.random.default_rng(i)) for i in range(200)}
    assert draws == {3, 4}


def test_loguniform_is_uniform_in_log_space():
    space = sw.Space("k", "loguniform", (1e-4, 1e-2))
    rng = np.random.default_rng(0)
    logs = np.log10([space.draw(rng) for _ in range(2000)])
    assert abs(np.mean(logs < -3) - 0.5) < 0.05  # half the draws below the geometric middle


@pytest.mark.parametrize(
    "text, line, fragment",
    [
        ("pipeline: base.yaml\nsampels: 3\n", 2, "unknown key (did you mean 'samples'?)"),
        ("pipeline: base.yaml\nsearch:\n  optimizer.lr: {logunifrom: [0.1, 1.0]}\n", 3, "unknown space"),
        ("pipeline: base.yaml\nsearch:\n  model.hidden_size: {choice: []}\n", 3, "non-empty list"),
        (
            "pipeline: base.yaml\nsearch:\n  optimizer.lr: {uniform: [0.5, 0.1]}\n",
            3,
            "low must be below high",
        ),
        ("pipeline: base.yaml\nsearch:\n  train.seq_length: {randint: [4, 4]}\n", 3, "exclusive"),
        ("pipeline: base.yaml\nsearch:\n  train.seq_length: {randint: [4.5, 8]}\n", 3, "integers"),
        ("pipeline: base.yaml\nsearch:\n  optimizer.lr: {loguniform: [0.0, 1.0]}\n", 3, "low > 0"),
        ("pipeline: base.yaml\nsearch:\n  optimizer.lr: 0.1\n", 3, "expected one space"),
        ("pipeline: base.yaml\nsamples: 0\n", 2, "must be >= 1"),
        ("pipeline: base.yaml\nmetric: loss\n", 2, "metric: must be one of val_loss, train_loss, got 'loss'"),
        (
            "pipeline: base.yaml\nscheduler: {type: asha, grace_peroid: 20}\n",
            2,
            "unknown key (did you mean 'grace_period'?)",
        ),
        ("pipeline: base.yaml\nresources: {cpus_per_trial: 0}\n", 2, "must be > 0"),
        (
            "pipeline: base.yaml\nset:\n  corpus.val_fraction: 0.0\nmetric: val_loss\n",
            4,
            "val_loss needs a validation split",
        ),
        (
            "pipeline: base.yaml\nset:\n  train.eval_every: null\nbackend: ray\nscheduler: {type: asha}\n",
            5,
            "asha needs reports during training",
        ),
        (
            "pipeline: base.yaml\nbackend: ray\nscheduler:\n  type: asha\n  grace_period: 30\n",
            5,
            "not a multiple of the evaluation interval (20 steps",
        ),
        (
            "pipeline: base.yaml\nset:\n  optimizer.lr: 0.1\nsearch:\n  optimizer.lr: {choice: [0.1, 0.2]}\n",
            5,
            "also fixed (s.yaml: line 3: set.optimizer.lr)",
        ),
        (
            "pipeline: base.yaml\nsearch:\n  model.type: {grid: [rnn, gru]}\nsamples: 2\n",
            4,
            "every searched key is a grid",
        ),
        (
            "pipeline: base.yaml\nalgorithm: optuna\nsearch:\n  model.type: {grid: [rnn, gru]}\n",
            4,
            "grid is not supported with algorithm: optuna",
        ),
        ("pipeline: missing.yaml\n", 1, "pipeline file not found"),
        (
            "pipeline: base.yaml\nbackend: local\nscheduler: {type: asha}\n",
            3,
            "asha needs the ray backend (pip install 'charrnn[tune]')",
        ),
        (
            "pipeline: base.yaml\nbackend: local\nalgorithm: optuna\nsearch:\n  optimizer.lr: {choice: [0.1]}\n",
            3,
            "optuna needs the ray backend",
        ),
    ],
)
def test_bad_sweep_files_are_one_line_errors_with_the_line(here, capsys, text, line, fragment):
    code, out, err = sweep_main(capsys, write(here, text), "--dry-run")
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert f"s.yaml: line {line}: " in err
    assert fragment in err
    assert not (here / "runs").exists()


def test_a_misspelt_searched_option_fails_before_anything_runs_naming_the_trial(here, capsys):
    text = "pipeline: base.yaml\nsearch:\n  optimizer.lrr: {choice: [0.1]}\n"
    code, out, err = sweep_main(capsys, write(here, text), "--dry-run")
    assert code == 2 and err.count("\n") == 1
    assert "trial 0000 (--set optimizer.lrr=0.1)" in err
    assert "s.yaml: line 3: search.optimizer.lrr: unknown key (did you mean 'lr'?)" in err


def test_a_bad_searched_value_is_located_in_the_sweep_file(here, capsys):
    text = "pipeline: base.yaml\nsearch:\n  model.hidden_size: {grid: [8, many]}\n"
    code, out, err = sweep_main(capsys, write(here, text), "--dry-run")
    assert code == 2 and err.count("\n") == 1
    assert (
        "trial 0001" in err
        and "s.yaml: line 3: search.model.hidden_size: expected an integer, got 'many'" in err
    )


def test_cli_set_is_fixed_for_every_trial_and_checked(here, capsys):
    code, out, err = sweep_main(capsys, write(here, GOOD), "--dry-run", "--set", "train.batch_size=zero")
    assert code == 2 and "--set train.batch_size: expected an integer" in err
    code, out, err = sweep_main(capsys, write(here, GOOD), "--dry-run", "--set", "optimizer.lr=0.1")
    assert code == 2 and "also fixed (--set optimizer.lr)" in err


def test_dry_run_prints_every_trial_and_runs_nothing(here, capsys):
    code, out, err = sweep_main(capsys, write(here, GOOD), "--dry-run")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "sweep s.yaml: 6 trials (2 grid points x 3 samples)"
    trials = sw.draw_trials(sw.load_sweep("s.yaml"))
    for trial, line in zip(trials, lines[1:7], strict=True):
        assert line == f"trial {trial.id}: {sw._sets(trial.values)}"
    assert "model.type=gru" in lines[6] and "optimizer.lr=" in lines[6]
    assert lines[-1] == "every trial's pipeline is valid; nothing was run (--dry-run)"
    assert not (here / "runs").exists()


def test_auto_without_ray_says_local_with_the_install_hint(here, capsys, monkeypatch):
    real = sw.importlib.util.find_spec
    monkeypatch.setattr(sw.importlib.util, "find_spec", lambda name: None if name == "ray" else real(name))
    text = GOOD.replace("backend: local", "backend: auto")
    code, out, err = sweep_main(capsys, write(here, text), "--dry-run")
    assert code == 0
    assert (
        err
        == "backend: local processes (Ray Tune is not installed; pip install 'charrnn[tune]' to run on Ray)\n"
    )
    assert "backend local," in out
    code, out, err = sweep_main(capsys, write(here, text), "--dry-run", "--backend", "ray")
    assert code == 2 and "ray: Ray Tune is not installed (pip install 'charrnn[tune]')" in err


def test_address_needs_the_ray_backend(here, capsys):
    code, out, err = sweep_main(capsys, write(here, GOOD), "--dry-run", "--address", "10.0.0.1:6379")
    assert code == 2 and err == "error: --address joins a Ray cluster: it needs the ray backend\n"


LOCAL = """pipeline: base.yaml
search:
  optimizer.lr: {grid: [0.05, 0.2]}
  train.seq_length: {grid: [8, 5000]}
backend: local
max_concurrent: 2
output: out
"""


@pytest.mark.slow
def test_local_sweep_writes_results_best_and_a_failing_trial_fails_alone(here, capsys):
    code, out, err = sweep_main(capsys, write(here, LOCAL))
    assert code == 0, err
    assert out == ""
    with (here / "out" / "results.csv").open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["id"] for r in rows] == ["0000", "0001", "0002", "0003"]
    assert [r["status"] for r in rows] == ["done", "error", "done", "error"]
    assert [(r["optimizer.lr"], r["train.seq_length"]) for r in rows][:2] == [("0.05", "8"), ("0.05", "5000")]
    for r in rows:
        if r["status"] == "error":  # seq_length 5000 is longer than the corpus: that trial alone fails
            assert r["error"].startswith("error: ") and "seq_length" in r["error"]
            assert f"trial {r['id']}: {r['error']}" in err
            continue
        folder = here / "out" / "trials" / r["id"]
        for name in ("model.npz", "model.best.npz", "model.metrics.jsonl", "train.log"):
            assert (folder / name).is_file(), name
        records = [json.loads(line) for line in (folder / "model.metrics.jsonl").read_text().splitlines()]
        vals = [m["val_loss"] for m in records if m["val_loss"] is not None]
        assert int(r["steps"]) == 40 and float(r["best_val_loss"]) == min(vals)
        assert float(r["last_val_loss"]) == vals[-1]
        assert r["checkpoint"] == str(folder / "model.best.npz")
    jsonl = [json.loads(line) for line in (here / "out" / "results.jsonl").read_text().splitlines()]
    assert [r["status"] for r in jsonl] == [r["status"] for r in rows]
    winner = min((r for r in jsonl if r["status"] == "done"), key=lambda r: r["best_val_loss"])
    assert (
        f"best: trial {winner['id']} val {winner['best_val_loss']:.4f} nats/char: "
        f"--set optimizer.lr={winner['optimizer.lr']} --set train.seq_length=8 ({winner['checkpoint']})\n"
    ) in err
    svg = (here / "out" / "sweep.svg").read_text()
    assert svg.startswith("<svg") and "0000 (done)" in svg and "0002 (done)" in svg

    # best.yaml trains the winner again, elsewhere, to the same validation loss, bit for bit
    best = yaml.safe_load((here / "out" / "best.yaml").read_text())
    assert best["optimizer"]["lr"] == winner["optimizer.lr"] and best["stages"] == ["train", "generate"]
    assert cli.main(["run", "out/best.yaml"]) == 0
    capsys.readouterr()
    records = [
        json.loads(line) for line in (here / "out" / "best" / "model.metrics.jsonl").read_text().splitlines()
    ]
    assert min(m["val_loss"] for m in records if m["val_loss"] is not None) == winner["best_val_loss"]

    # the output holds a sweep now: starting again without --resume would overwrite it
    code, out, err = sweep_main(capsys, write(here, LOCAL))
    assert code == 2 and "already holds a sweep; pass --resume" in err


@pytest.mark.slow
def test_a_sweep_whose_every_trial_fails_exits_1(here, capsys):
    text = "pipeline: base.yaml\nsearch:\n  train.seq_length: {grid: [4000, 5000]}\nbackend: local\n"
    code, out, err = sweep_main(capsys, write(here, text))
    assert code == 1
    assert err.count("trial 000") >= 4 and "best: none" in err
    assert "error: " in err.splitlines()[-2] or "error: " in err


@pytest.mark.slow
def test_ctrl_c_saves_writes_results_exits_130_and_resume_finishes_exactly(here, cli_env):
    base = dict(BASE, train={**BASE["train"], "steps": 3000, "eval_every": 100})
    (here / "base.yaml").write_text(yaml.safe_dump(base), encoding="utf-8")
    text = "pipeline: base.yaml\nsearch:\n  optimizer.lr: {grid: [0.1, 0.2]}\nbackend: local\nmax_concurrent: 1\noutput: out\n"
    write(here, text)
    metrics = here / "out" / "trials" / "0000" / "model.metrics.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "charrnn", "sweep", "s.yaml"], env=cli_env, stderr=subprocess.PIPE, text=True
    )
    assert wait_for(lambda: metrics.exists() and metrics.stat().st_size > 0, 60.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted: results so far in" in err and "--resume continues" in err
    rows = [json.loads(line) for line in (here / "out" / "results.jsonl").read_text().splitlines()]
    assert [(r["id"], r["status"]) for r in rows] == [("0000", "interrupted")]  # 0001 never started
    assert 0 < rows[0]["steps"] < 3000
    assert (here / "out" / "trials" / "0000" / "model.npz").is_file()

    done = subprocess.run(
        [sys.executable, "-m", "charrnn", "sweep", "s.yaml", "--resume"],
        env=cli_env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in (here / "out" / "results.jsonl").read_text().splitlines()]
    assert [(r["id"], r["status"], r["steps"]) for r in rows] == [
        ("0000", "done", 3000),
        ("0001", "done", 3000),
    ]
    log = (here / "out" / "trials" / "0000" / "train.log").read_text()
    assert "train.resume=true" in log
    # the resumed trial ends exactly where an uninterrupted run of it ends
    ref = {"optimizer.lr": 0.1, "train.checkpoint": "ref/model.npz", "stages": ["train"]}
    ref_run = subprocess.run(
        [
            sys.executable,
            "-m",
            "charrnn",
            "run",
            "base.yaml",
            *(f"--set={k}={sw._value(v)}" for k, v in ref.items()),
        ],
        env=cli_env,
        capture_output=True,
        text=True,
    )
    assert ref_run.returncode == 0, ref_run.stderr
    with (
        np.load(here / "out" / "trials" / "0000" / "model.npz") as a,
        np.load(here / "ref" / "model.npz") as b,
    ):
        for key in a.files:
            if key.startswith("param/"):
                np.testing.assert_array_equal(a[key], b[key])


def test_resume_refuses_a_changed_sweep(here, capsys):
    write(here, GOOD.replace("samples: 3", "samples: 1") + "output: out\n")
    sweep = sw.load_sweep("s.yaml")
    sw.start_state(sweep, sw.draw_trials(sweep), "local", resume=False)
    changed = sw.load_sweep(
        write(here, GOOD.replace("samples: 3", "samples: 1").replace("0.5]", "0.4]") + "output: out\n")
    )
    with pytest.raises(ConfigError, match="differs"):
        sw.start_state(changed, sw.draw_trials(changed), "local", resume=True)
    with pytest.raises(ConfigError, match="no sweep to resume"):
        fresh = sw.load_sweep(write(here, GOOD + "output: elsewhere\n"))
        sw.start_state(fresh, sw.draw_trials(fresh), "local", resume=True)


def test_values_round_trip_through_set_exactly():
    from charrnn.config import apply_overrides

    values = {"a": 0.1 + 0.2, "b": 1e-05, "c": "rnn", "d": "yes", "e": 7, "f": True, "g": "1.5"}
    parsed: dict = {}
    apply_overrides(parsed, [f"{k}={sw._value(v)}" for k, v in values.items()])
    assert parsed == values


def test_sweep_is_a_registered_command_without_importing_ray():
    code = subprocess.run(
        [sys.executable, "-c", "import sys, charrnn.cli as c; c._commands(); print('ray' in sys.modules)"],
        capture_output=True,
        text=True,
        env=dict(os.environ, CHARRNN_LOAD_PLUGINS=""),
    )
    assert code.stdout.strip() == "False"


# ---------------------------------------------------------------- signals, kills, locks and damage


def _long_sweep(here, backend="local"):
    """Three trials of 3,000 steps, one at a time: a few seconds each on the tiny text."""
    base = dict(BASE, stages=["train"], train={**BASE["train"], "steps": 3000, "eval_every": 100})
    (here / "base.yaml").write_text(yaml.safe_dump(base), encoding="utf-8")
    write(
        here,
        "pipeline: base.yaml\nsearch:\n  optimizer.lr: {grid: [0.1, 0.2, 0.3]}\n"
        f"backend: {backend}\nmax_concurrent: 1\noutput: out\n",
    )


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigterm_means_ctrl_c_and_resume_keeps_the_finished_trials(here, cli_env):
    _long_sweep(here)
    proc = subprocess.Popen(
        [sys.executable, "-m", "charrnn", "sweep", "s.yaml"], env=cli_env, stderr=subprocess.PIPE, text=True
    )
    child = first_done_second_running(here, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "interrupted: results so far in" in err and "--resume continues" in err
    assert process_gone(child), f"trial 0001's process {child} outlived the sweep"
    rows = results(here)
    assert [(r["id"], r["status"]) for r in rows] == [("0000", "done"), ("0001", "interrupted")]
    assert rows[0]["steps"] == 3000 and 0 < rows[1]["steps"] < 3000
    assert (here / "out" / "best.yaml").is_file()

    rows, err = resume_keeps_0000(here, cli_env)
    log = (here / "out" / "trials" / "0000" / "train.log").read_text()
    assert log.count("$ ") == 1  # the finished trial did not train again
    assert "train.resume=true" in (here / "out" / "trials" / "0001" / "train.log").read_text()
    winner = min(rows, key=lambda r: r["best_val_loss"])
    assert f"best: trial {winner['id']} " in err
    best = yaml.safe_load((here / "out" / "best.yaml").read_text())
    assert best["optimizer"]["lr"] == winner["optimizer.lr"]


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG, /proc")
def test_sigkill_keeps_finished_trials_and_the_running_one_dies_with_the_sweep(here, cli_env):
    _long_sweep(here)
    proc = subprocess.Popen(
        [sys.executable, "-m", "charrnn", "sweep", "s.yaml"], env=cli_env, stderr=subprocess.PIPE, text=True
    )
    child = first_done_second_running(here, proc)
    proc.kill()
    proc.communicate(timeout=60)
    assert process_gone(child), f"trial 0001's process {child} went on as an orphan"
    # it stopped where the kill found it, saving on its way out, instead of training on to the end
    log = (here / "out" / "trials" / "0001" / "train.log").read_text()
    assert "interrupted: saved step " in log and "step 3000/3000" not in log
    with np.load(here / "out" / "trials" / "0001" / "model.npz") as saved:
        assert json.loads(str(saved["meta"]))["step"] < 3000
    rows = results(here)  # written as 0000 ended, before the kill
    assert [(r["id"], r["status"], r["steps"]) for r in rows] == [("0000", "done", 3000)]

    rows, err = resume_keeps_0000(here, cli_env)
    assert (here / "out" / "trials" / "0000" / "train.log").read_text().count("$ ") == 1
    assert "must be beyond the checkpoint" not in err
    assert (here / "out" / "best.yaml").is_file() and "best: trial " in err


@pytest.mark.slow
def test_resume_recognises_a_trial_whose_checkpoint_reached_the_end(here, capsys):
    text = "pipeline: base.yaml\nsearch:\n  optimizer.lr: {grid: [0.1, 0.2]}\nbackend: local\noutput: out\n"
    code, _, err = sweep_main(capsys, write(here, text))
    assert code == 0, err
    before = results(here)
    (here / "out" / "results.jsonl").unlink()  # as if the sweep was killed before it could record them
    code, _, err = sweep_main(capsys, "s.yaml", "--resume")
    assert code == 0, err
    assert "trial 0000 done (its checkpoint reached step 40 before the sweep stopped)" in err
    assert "must be beyond" not in err and "started" not in err
    after = results(here)
    assert [(r["id"], r["status"], r["best_val_loss"]) for r in after] == [
        (r["id"], r["status"], r["best_val_loss"]) for r in before
    ]
    for tid in ("0000", "0001"):
        assert (here / "out" / "trials" / tid / "train.log").read_text().count("$ ") == 1
    assert (here / "out" / "best.yaml").is_file()


def _state(here, rows_text):
    """A sweep of two trials that ran nothing, with this results.jsonl."""
    write(
        here,
        "pipeline: base.yaml\nsearch:\n  optimizer.lr: {grid: [0.1, 0.2]}\nbackend: local\noutput: out\n",
    )
    sweep = sw.load_sweep("s.yaml")
    sw.start_state(sweep, sw.draw_trials(sweep), "local", resume=False)
    (here / "out" / "results.jsonl").write_text(rows_text, encoding="utf-8")


def _row(tid, **change):
    r = {"id": tid, "status": "done", "optimizer.lr": 0.1, "steps": 40, "best_val_loss": 1.0}
    r.update(last_val_loss=1.0, train_loss=1.0, seconds=1.5, checkpoint=None, error=None)
    r.update(change)
    return json.dumps(r) + "\n"


@pytest.mark.parametrize(
    ("text", "line", "problem"),
    [
        (_row("0000") + "{not json\n" + _row("0001"), 2, "not a JSON line"),
        (_row("0000") + _row("0001", status="finished"), 2, "'status' must be one of done, stopped early"),
        (_row("0000", seconds="1.5"), 1, "'seconds' must be a number >= 0, got '1.5'"),
        (_row("0000", steps=4.5), 1, "'steps' must be an integer >= 0, got 4.5"),
        (_row("0009"), 1, "'id' must be the id of one of this sweep's trials, got '0009'"),
        ("[1, 2]\n", 1, "expected a JSON object (a trial's row), got list"),
        (_row("0000").replace('"optimizer.lr": 0.1, ', ""), 1, "no value for the searched key optimizer.lr"),
        (
            '{"id": "0000", "x": ' + "[" * 50_000 + "]" * 50_000 + "}\n",
            1,
            "not a JSON line (nested too deeply)",
        ),
    ],
)
def test_a_damaged_results_file_is_one_line_naming_the_line(here, capsys, text, line, problem):
    _state(here, text)
    code, _, err = sweep_main(capsys, "s.yaml", "--resume")
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("error: --resume: ")
    assert f"{here / 'out' / 'results.jsonl'}:{line}: {problem}" in err


def test_a_results_line_cut_by_a_kill_is_left_out(here, capsys):
    _state(here, _row("0000") + _row("0001") + _row("0001")[:25])
    code, _, err = sweep_main(capsys, "s.yaml", "--resume")
    assert code == 0, err  # both trials finished earlier: nothing runs
    assert "started" not in err
    assert [(r["id"], r["status"]) for r in results(here)] == [("0000", "done"), ("0001", "done")]


def test_an_output_that_is_a_file_is_one_line(here, capsys):
    (here / "out").write_text("not a folder")
    text = "pipeline: base.yaml\nbackend: local\noutput: out\n"
    for extra in ((), ("--dry-run",)):
        code, _, err = sweep_main(capsys, write(here, text), *extra)
        assert code == 2 and err.count("\n") == 1, err
        assert (
            err
            == f"error: s.yaml: line 3: output: {here / 'out'} is a file, not a folder; give a folder for the sweep's results\n"
        )
    (here / "out").unlink()
    (here / "parent").write_text("a file")
    code, _, err = sweep_main(capsys, write(here, text.replace("out\n", "parent/out\n")))
    assert code == 2 and err.count("\n") == 1 and "s.yaml: line 3: output: cannot write" in err, err


def test_a_read_only_output_is_one_line_before_anything_runs(here, capsys, monkeypatch):
    """Every way of creating a file in `ro/` fails as on a read-only mount (root ignores chmod)."""
    import builtins

    ro = here / "ro"
    ro.mkdir()
    real_open, real_os_open = builtins.open, os.open

    def refuse(path):
        if isinstance(path, (str, os.PathLike)) and str(os.path.abspath(path)).startswith(str(ro)):
            raise OSError(30, "Read-only file system", str(path))

    monkeypatch.setattr(builtins, "open", lambda path, *a, **k: refuse(path) or real_open(path, *a, **k))
    monkeypatch.setattr(os, "open", lambda path, *a, **k: refuse(path) or real_os_open(path, *a, **k))
    code, _, err = sweep_main(capsys, write(here, "pipeline: base.yaml\nbackend: local\noutput: ro\n"))
    assert code == 2, err
    assert err == f"error: s.yaml: line 3: output: cannot write {ro / 'sweep.json'}: Read-only file system\n"
    assert os.listdir(ro) == []


def test_a_huge_sweep_is_refused_with_the_estimate_before_drawing(here, cli_env):
    """`samples: 1000000000` once grew for a minute and ended in a MemoryError traceback."""
    import resource

    def limited():
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    write(here, GOOD.replace("samples: 3", "samples: 1000000000"))
    done = subprocess.run(
        [sys.executable, "-m", "charrnn", "sweep", "s.yaml", "--dry-run"],
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=limited,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr == (
        "error: s.yaml: line 8: samples: 2,000,000,000 trials (2 grid points x 1,000,000,000 samples) is beyond "
        "the 100,000 a sweep sets up: drawing and checking them would take about 2.6 TB of memory and 231 days "
        "(~1,300 bytes and ~10 ms a trial); lower samples or the grid\n"
    )
    assert done.stdout == ""
    write(here, GOOD.replace("samples: 3", f"samples: {sweep_trials.MAX_TRIALS // 2}"))
    sweep = sw.load_sweep("s.yaml")
    assert sweep_trials.planned_trials(sweep) == sweep_trials.MAX_TRIALS
    sweep_trials.check_size(sweep)  # the bound itself is allowed


@pytest.mark.skipif(locks.fcntl is None, reason="flock")
def test_a_trial_held_by_another_process_is_never_run_twice(here, capsys, monkeypatch):
    _state(here, "")
    folder = here / "out" / "trials" / "0000"
    folder.mkdir(parents=True)
    holder = subprocess.Popen(  # another process holds trial 0000's lock, as a trial left running would
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from charrnn_plugins.sweep import locks; "
            "fd = locks.take(Path(sys.argv[1])); print('held', flush=True); time.sleep(60)",
            str(folder / ".lock"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "held\n"
        monkeypatch.setattr(sw.locks, "ORPHAN_WAIT", 0.3)
        code, _, err = sweep_main(capsys, "s.yaml", "--resume")
        assert code == 2, err
        assert err.splitlines()[-1] == (
            f"error: trial 0000 is still running in process {holder.pid} from an earlier sweep; stop it, then --resume"
        )
        assert not (folder / "train.log").exists()
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()


@pytest.mark.skipif(locks.fcntl is None, reason="flock")
def test_two_sweeps_never_run_in_one_output(here, capsys):
    _state(here, "")
    fd = locks.take(here / "out" / ".lock")
    try:
        code, _, err = sweep_main(capsys, "s.yaml", "--resume")
    finally:
        locks.release(fd)
    assert code == 2
    assert err == (
        f"error: another charrnn sweep (process {os.getpid()}) is running in {here / 'out'}; "
        "wait for it to end, or stop it (then --resume continues)\n"
    )
