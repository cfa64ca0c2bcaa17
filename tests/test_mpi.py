"""Data-parallel training under a real `mpiexec` (the `mpi` extra): the CLI as users launch it.

These run wherever `mpiexec` and mpi4py are installed; outside CI they skip when either is
missing, in CI (`CI=true`, which installs `.[test,mpi]`) they must run.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from charrnn import checkpoint as ckpt_io
from charrnn.interrupts import NoInterrupts
from charrnn.pipeline import Pipeline
from charrnn.world import ThreadWorld
from conftest import TINY_TEXT, wait_for

MPIEXEC = shutil.which(
    "mpiexec", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
)


def _mpi_ready() -> bool:
    if MPIEXEC is None:
        return False
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return False
    return True


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not _mpi_ready() and not os.environ.get("CI"),
        reason="needs mpiexec and mpi4py: pip install '.[mpi]' (in CI these must run)",
    ),
]


@pytest.fixture
def pipeline_file(tmp_path):
    (tmp_path / "tiny.txt").write_text(TINY_TEXT * 4, encoding="utf-8")
    config = {
        "seed": 3,
        "corpus": {"type": "text", "path": str(tmp_path / "tiny.txt"), "val_fraction": 0.1},
        "model": {"type": "rnn", "hidden_size": 12, "dtype": "float64"},
        "optimizer": {"type": "adam", "lr": 0.01},
        "stages": ["train"],
        "train": {
            "steps": 20,
            "batch_size": 4,
            "seq_length": 8,
            "sample_every": 10,
            "sample_length": 10,
            "checkpoint": str(tmp_path / "mpi.npz"),
        },
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path, config


def mpirun(n, *args, timeout=120, cwd=None):
    assert MPIEXEC is not None
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [MPIEXEC, "-n", str(n), sys.executable, "-m", "charrnn", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=cwd,
    )


def params(path):
    return ckpt_io.load(path).params


def wait_for_first_save(proc: subprocess.Popen, ckpt: Path) -> None:
    """Until the run's first checkpoint exists (up to a minute); the run must still be going."""

    def saved() -> bool:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        return ckpt.exists()

    assert wait_for(saved, 60.0, 0.05), "no checkpoint within a minute"


def test_mpiexec_equals_the_thread_world_bit_for_bit(pipeline_file, tmp_path):
    path, config = pipeline_file
    done = mpirun(2, "run", str(path))
    assert done.returncode == 0, done.stderr
    assert ckpt_io.load(tmp_path / "mpi.npz").meta["world_size"] == 2
    threads = dict(config, train={**config["train"], "checkpoint": str(tmp_path / "threads.npz")})

    def replica(world):
        Pipeline(threads).train(io.StringIO(), world=world, interrupts=NoInterrupts())

    from threadpoolctl import threadpool_limits  # as each MPI rank runs: one BLAS thread

    with threadpool_limits(1, user_api="blas"):
        ThreadWorld.run(2, replica)
    a, b = params(tmp_path / "mpi.npz"), params(tmp_path / "threads.npz")
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_stop_and_resume_under_mpiexec_equals_an_uninterrupted_run(pipeline_file, tmp_path):
    path, _ = pipeline_file
    full = mpirun(2, "run", str(path), "--set", f"train.checkpoint={tmp_path / 'full.npz'}")
    assert full.returncode == 0, full.stderr
    half = tmp_path / "half.npz"
    first = mpirun(2, "run", str(path), "--set", f"train.checkpoint={half}", "--set", "train.steps=10")
    assert first.returncode == 0, first.stderr
    second = mpirun(2, "run", str(path), "--set", f"train.checkpoint={half}", "--set", "train.resume=true")
    assert second.returncode == 0, second.stderr
    a, b = params(tmp_path / "full.npz"), params(half)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    # and the two-process checkpoint resumes in one process
    one = subprocess.run(
        [sys.executable, "-m", "charrnn", "run", str(path), "--set", f"train.checkpoint={half}",
         "--set", "train.resume=true", "--set", "train.steps=25"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr
    assert ckpt_io.load(half).meta["step"] == 25 and ckpt_io.load(half).meta["world_size"] == 1


def test_a_corpus_missing_on_one_rank_ends_the_job(pipeline_file, tmp_path):
    path, _ = pipeline_file
    plugin = tmp_path / "ranked.py"
    plugin.write_text(
        "import os\nimport charrnn\nfrom charrnn_plugins.text import load_text\n\n"
        "def load(path: str):\n"
        "    return load_text(path.format(rank=os.environ.get('PMI_RANK', os.environ.get('OMPI_COMM_WORLD_RANK', '0'))))\n\n"
        "@charrnn.hookimpl\ndef charrnn_corpus_loader(register):\n    register('ranked', load)\n"
    )
    (tmp_path / "c0.txt").write_text(TINY_TEXT * 4, encoding="utf-8")
    done = mpirun(
        2,
        "run",
        str(path),
        "--set",
        f"plugins=[{plugin}]",
        "--set",
        f"corpus={{type: ranked, path: '{tmp_path}/c{{rank}}.txt'}}",
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: rank 1: corpus file not found: {tmp_path}/c1.txt"], done.stderr
    assert "Traceback" not in done.stderr


def test_batch_not_divisible_by_the_processes(pipeline_file):
    path, _ = pipeline_file
    done = mpirun(3, "run", str(path), timeout=60)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: train.batch_size (4) must be divisible by the number of processes (3)"]


def test_ctrl_c_stops_every_rank_at_one_step_and_saves(pipeline_file, tmp_path):
    path, _ = pipeline_file
    ckpt = tmp_path / "int.npz"
    proc = subprocess.Popen(
        [MPIEXEC, "-n", "2", sys.executable, "-m", "charrnn", "run", str(path), "--set", "train.steps=null",
         "--set", "train.save_every=20", "--set", f"train.checkpoint={ckpt}", "--set", "stages=[train, generate]",
         "--set", "generate.num_chars=20", "--set", "sampler={type: greedy}", "--set", "generate.seed_text=the "],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    wait_for_first_save(proc, ckpt)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    saved = ckpt_io.load(ckpt)
    assert saved.meta["world_size"] == 2 and saved.meta["step"] > 0
    assert f"stopped at step {saved.meta['step']}; saved {ckpt}" in err
    assert "the " in out  # then the generate stage ran (on rank 0; MPICH adds notes of its own)


# an optimizer whose state takes a second to collect: rank 0's save is slow, as a large model's is
SLOW_TO_SAVE = """\
import time

import charrnn
from charrnn_plugins.optimizers import Adam


class SlowToSave(Adam):
    def state_dict(self):
        time.sleep(1.0)
        return super().state_dict()


@charrnn.hookimpl
def charrnn_optimizer(register):
    register("slow_to_save", SlowToSave)
"""


def test_sigterm_to_mpiexec_saves_on_rank_0_before_the_job_ends(pipeline_file, tmp_path):
    path, _ = pipeline_file
    plugin = tmp_path / "slow_to_save.py"
    plugin.write_text(SLOW_TO_SAVE, encoding="utf-8")
    ckpt = tmp_path / "term.npz"
    proc = subprocess.Popen(
        [MPIEXEC, "-n", "2", sys.executable, "-m", "charrnn", "run", str(path), "--set", "train.steps=null",
         "--set", "train.save_every=10", "--set", f"train.checkpoint={ckpt}", "--set", f"plugins=[{plugin}]",
         "--set", "optimizer={type: slow_to_save, lr: 0.01}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    wait_for_first_save(proc, ckpt)
    proc.send_signal(signal.SIGTERM)  # mpiexec forwards it to every rank
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "Traceback" not in err and "Abort" not in err, err
    saved = ckpt_io.load(ckpt)
    assert saved.meta["world_size"] == 2 and saved.meta["step"] > 10
    lines = [line for line in err.splitlines() if line.startswith("interrupted:")]
    assert lines == [f"interrupted: saved step {saved.meta['step']} to {ckpt}"], err  # said once, by rank 0
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
