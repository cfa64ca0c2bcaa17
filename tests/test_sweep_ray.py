"""`charrnn sweep` on Ray Tune (charrnn[tune]) and with Optuna (charrnn[optuna]); CI installs both."""

from __future__ import annotations

import importlib.util
import json
import os
import signal

import pytest
import yaml
from sweep_helpers import first_done_second_running, results, resume_keeps_0000

from charrnn import cli
from conftest import TINY_TEXT, process_gone

HAVE_RAY = importlib.util.find_spec("ray") is not None
HAVE_OPTUNA = importlib.util.find_spec("optuna") is not None

pytestmark = [
    pytest.mark.skipif(not HAVE_RAY and not os.environ.get("CI"), reason="needs charrnn[tune]"),
    pytest.mark.slow,
    # Ray and its dependencies warn about their own deprecations at import and shutdown
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::PendingDeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

BASE = {
    "seed": 1,
    "corpus": {"type": "text", "path": "tiny.txt", "val_fraction": 0.1},
    "model": {"type": "rnn", "hidden_size": 8},
    "optimizer": {"type": "adagrad", "lr": 0.1},
    "stages": ["train"],
    "train": {
        "steps": 160,
        "batch_size": 4,
        "seq_length": 8,
        "sample_every": None,
        "eval_every": 20,
        "checkpoint": "runs/base/model.npz",
    },
}


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray for the module: start-up costs seconds."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture
def here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.txt").write_text(TINY_TEXT, encoding="utf-8")
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(BASE), encoding="utf-8")
    return tmp_path


def test_asha_stops_poor_trials_early_and_keeps_every_model(ray_cluster, here, capsys):
    # the good learning rates start first, so the poor ones meet full rungs and are cut at grace_period
    text = """pipeline: base.yaml
search:
  optimizer.lr: {grid: [0.3, 0.2, 0.0003, 0.0001]}
backend: ray
scheduler: {type: asha, grace_period: 20, reduction_factor: 2}
max_concurrent: 2
output: out
"""
    (here / "s.yaml").write_text(text, encoding="utf-8")
    handler = signal.getsignal(signal.SIGINT)
    code = cli.main(["sweep", "s.yaml"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out == ""
    assert signal.getsignal(signal.SIGINT) is handler  # Ctrl+C means what it meant before the sweep
    rows = results(here)
    assert [r["id"] for r in rows] == ["0000", "0001", "0002", "0003"]
    assert all(r["status"] in ("done", "stopped early") for r in rows), rows
    assert any(r["status"] == "done" and r["steps"] == 160 for r in rows[:2]), rows
    # which of the two good ones ASHA cuts depends on who reaches a rung first; the poor ones are cut
    assert [r["status"] for r in rows[2:]] == ["stopped early"] * 2, rows
    assert all(r["steps"] < 160 for r in rows if r["status"] == "stopped early")
    for r in rows:  # a trial ASHA stopped still has the model of its last report
        folder = here / "out" / "trials" / r["id"]
        assert (folder / "model.npz").is_file() and (folder / "model.best.npz").is_file()
        assert r["checkpoint"] == str(folder / "model.best.npz")
        records = [json.loads(line) for line in (folder / "model.metrics.jsonl").read_text().splitlines()]
        assert records[-1]["step"] == r["steps"]
    assert "best: trial 000" in err and (here / "out" / "best.yaml").is_file()
    svg = (here / "out" / "sweep.svg").read_text()
    assert "(stopped early)" in svg


@pytest.mark.skipif(not HAVE_OPTUNA and not os.environ.get("CI"), reason="needs charrnn[optuna]")
def test_optuna_search_runs_trials_it_picks(ray_cluster, here, capsys):
    text = """pipeline: base.yaml
set:
  train.steps: 40
search:
  optimizer.lr: {loguniform: [0.01, 0.5]}
  model.hidden_size: {choice: [4, 8]}
algorithm: optuna
samples: 3
backend: ray
output: out
"""
    (here / "s.yaml").write_text(text, encoding="utf-8")
    code = cli.main(["sweep", "s.yaml"])
    out, err = capsys.readouterr()
    assert code == 0, err
    rows = results(here)
    assert len(rows) == 3 and all(r["status"] == "done" for r in rows), rows
    assert len({r["optimizer.lr"] for r in rows}) == 3
    assert all(0.01 <= r["optimizer.lr"] <= 0.5 and r["model.hidden_size"] in (4, 8) for r in rows)
    for r in rows:
        values = json.loads((here / "out" / "trials" / r["id"] / "values.json").read_text())
        assert values == {"optimizer.lr": r["optimizer.lr"], "model.hidden_size": r["model.hidden_size"]}
    best = yaml.safe_load((here / "out" / "best.yaml").read_text())
    winner = min(rows, key=lambda r: r["best_val_loss"])
    assert best["optimizer"]["lr"] == winner["optimizer.lr"]


def test_ctrl_c_on_ray_marks_running_trials_interrupted_and_exits_130(here):
    """Tune handles Ctrl+C itself (stops the trials, saves its state): the sweep still says so."""
    import subprocess
    import sys
    import time

    base = dict(BASE, train={**BASE["train"], "steps": 200_000})
    (here / "base.yaml").write_text(yaml.safe_dump(base), encoding="utf-8")
    (here / "s.yaml").write_text(
        "pipeline: base.yaml\nsearch:\n  optimizer.lr: {grid: [0.1, 0.2, 0.3, 0.4]}\n"
        "backend: ray\nmax_concurrent: 1\noutput: out\n",
        encoding="utf-8",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "charrnn", "sweep", "s.yaml"], cwd=here, stderr=subprocess.PIPE, text=True
    )
    end = time.monotonic() + 120
    while not list((here / "out" / "trials").glob("*/model.metrics.jsonl")):
        assert proc.poll() is None and time.monotonic() < end, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.1)
    time.sleep(1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted: results so far in" in err
    rows = results(here)
    assert any(r["status"] == "interrupted" for r in rows), rows
    assert not any(r["status"] in ("done", "stopped early") for r in rows), rows  # none reached 200,000 steps
    running = [r for r in rows if r["steps"]]
    assert running and all((here / "out" / "trials" / r["id"] / "model.npz").is_file() for r in running)


def test_an_interrupted_ray_sweep_resumes_to_the_end(here):
    """`--resume` restores Tune's experiment: the cut trial continues from its checkpoint, the rest run."""
    import subprocess
    import sys
    import time

    base = dict(BASE, model={"type": "rnn", "hidden_size": 128})
    base["train"] = {**BASE["train"], "steps": 3000, "batch_size": 16, "seq_length": 16, "eval_every": 100}
    (here / "tiny.txt").write_text(TINY_TEXT * 20, encoding="utf-8")
    (here / "base.yaml").write_text(yaml.safe_dump(base), encoding="utf-8")
    (here / "s.yaml").write_text(
        "pipeline: base.yaml\nsearch:\n  optimizer.lr: {grid: [0.05, 0.1]}\n"
        "backend: ray\nmax_concurrent: 1\noutput: out\n",
        encoding="utf-8",
    )
    sweep = [sys.executable, "-m", "charrnn", "sweep", "s.yaml"]
    proc = subprocess.Popen(sweep, cwd=here, stderr=subprocess.PIPE, text=True)
    end = time.monotonic() + 120
    while not list((here / "out" / "trials").glob("*/model.npz")):
        assert proc.poll() is None and time.monotonic() < end, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    cut = [r for r in results(here) if r["status"] == "interrupted" and r["steps"]]
    assert cut and all(r["steps"] < 3000 for r in cut), results(here)
    done = subprocess.run([*sweep, "--resume"], cwd=here, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = results(here)
    assert [(r["id"], r["status"], r["steps"]) for r in rows] == [
        ("0000", "done", 3000),
        ("0001", "done", 3000),
    ]
    for r in cut:  # the cut trial went on from its checkpoint (a resumed run), not from scratch
        metrics = (here / "out" / "trials" / r["id"] / "model.metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in metrics] == list(range(100, 3001, 100))
        log = (here / "out" / "trials" / r["id"] / "train.log").read_text()
        assert log.count("step 100/3000 ") == 1 and log.count("step 3000/3000 ") == 1  # no second start


# ---------------------------------------------------------------- signals and kills


def _long_sweep(here):
    """Three trials of 3,000 steps, one at a time."""
    base = dict(BASE, train={**BASE["train"], "steps": 3000, "eval_every": 100})
    (here / "base.yaml").write_text(yaml.safe_dump(base), encoding="utf-8")
    (here / "s.yaml").write_text(
        "pipeline: base.yaml\nsearch:\n  optimizer.lr: {grid: [0.1, 0.2, 0.3]}\n"
        "backend: ray\nmax_concurrent: 1\noutput: out\n",
        encoding="utf-8",
    )


def _resume_keeps_0000(here):
    rows, err = resume_keeps_0000(here)
    log = (here / "out" / "trials" / "0000" / "train.log").read_text()
    assert log.count("step 100/3000 ") == 1  # trained once
    winner = min(rows, key=lambda r: r["best_val_loss"])
    assert f"best: trial {winner['id']} " in err
    assert (
        yaml.safe_load((here / "out" / "best.yaml").read_text())["optimizer"]["lr"] == winner["optimizer.lr"]
    )


def _started_long_sweep(here):
    """The long sweep on Ray, running until trial 0000 is done and 0001 has reported: (process, 0001's pid)."""
    import subprocess
    import sys

    _long_sweep(here)
    proc = subprocess.Popen(
        [sys.executable, "-m", "charrnn", "sweep", "s.yaml"], cwd=here, stderr=subprocess.PIPE, text=True
    )
    return proc, first_done_second_running(here, proc, 180.0)


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads /proc")
def test_sigterm_on_ray_means_ctrl_c_and_resume_keeps_the_finished_trials(here):
    proc, child = _started_long_sweep(here)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "interrupted: results so far in" in err
    assert process_gone(child), f"trial 0001's Ray worker {child} outlived the sweep"
    rows = results(here)
    assert [(r["id"], r["status"]) for r in rows] == [("0000", "done"), ("0001", "interrupted")]
    assert rows[0]["steps"] == 3000 and 0 < rows[1]["steps"] < 3000
    _resume_keeps_0000(here)


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads /proc")
def test_sigkill_on_ray_keeps_the_finished_trials_and_no_trial_trains_on(here):
    proc, child = _started_long_sweep(here)
    proc.kill()
    proc.communicate(timeout=60)
    assert process_gone(child), f"trial 0001's Ray worker {child} went on as an orphan"
    assert [(r["id"], r["status"]) for r in results(here)] == [("0000", "done")]  # recorded as it ended
    _resume_keeps_0000(here)


def test_a_finished_trial_started_again_trains_nothing(ray_cluster, here, capsys):
    """A sweep killed before Tune's first snapshot and before its rows were written: on --resume
    Tune starts every trial afresh, and those whose checkpoint reached train.steps only report."""
    import shutil

    text = "pipeline: base.yaml\nsearch:\n  optimizer.lr: {grid: [0.1, 0.2]}\nbackend: ray\noutput: out\n"
    (here / "s.yaml").write_text(text, encoding="utf-8")
    assert cli.main(["sweep", "s.yaml"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    before = results(here)
    (here / "out" / "results.jsonl").unlink()
    shutil.rmtree(here / "out" / "ray")
    code = cli.main(["sweep", "s.yaml", "--resume"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert [(r["id"], r["status"], r["best_val_loss"]) for r in results(here)] == [
        (r["id"], r["status"], r["best_val_loss"]) for r in before
    ]
    for r in before:
        log = (here / "out" / "trials" / r["id"] / "train.log").read_text()
        assert (
            log.count("step 20/160 ") == 1
            and "step 160 reached before the sweep stopped: nothing to train" in log
        )
    assert "best: trial " in err and (here / "out" / "best.yaml").is_file()


HOLD = """
import time
from pathlib import Path

import charrnn


@charrnn.hookimpl
def charrnn_train_start(config, checkpoint, step):
    Path(checkpoint).with_name("holding").touch()
    time.sleep(300)  # still setting up when Ctrl+C comes: Tune must stop it, nothing else will
"""


def test_a_trial_cut_by_ctrl_c_is_interrupted_never_stopped_early(here):
    """Under fifo, nothing stops a trial early; one Tune stops at Ctrl+C before it wrote anything
    (killed before its own files) was once recorded as 'stopped early'."""
    import subprocess
    import sys
    import time

    (here / "hold.py").write_text(HOLD, encoding="utf-8")
    (here / "base.yaml").write_text(yaml.safe_dump(dict(BASE, plugins=["hold"])), encoding="utf-8")
    (here / "s.yaml").write_text(
        "pipeline: base.yaml\nsearch:\n  optimizer.lr: {grid: [0.1, 0.2]}\n"
        "backend: ray\nscheduler: fifo\nmax_concurrent: 1\noutput: out\n",
        encoding="utf-8",
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(here), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(
        [sys.executable, "-m", "charrnn", "sweep", "s.yaml"],
        cwd=here,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    end = time.monotonic() + 180
    while not (here / "out" / "trials" / "0000" / "holding").exists():
        assert proc.poll() is None and time.monotonic() < end, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert [(r["id"], r["status"], r["steps"]) for r in results(here)] == [("0000", "interrupted", 0)]
