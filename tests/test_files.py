"""The atomic writer's temporaries: named after their writer, removed once that writer is gone.

A writer killed with SIGKILL cannot clean up after itself; the next write of the same file does,
and never touches the temporary of a writer that is still running.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from charrnn import checkpoint as ckpt_io
from charrnn.files import atomic_write, process_start, remove_stale_temporaries, temporary_prefix, writer_gone
from conftest import ROOT

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="processes are judged through /proc and kill")

#: a writer that stops half-way through its temporary until told on stdin to finish
WRITER = """
import sys
from charrnn.files import atomic_write
with atomic_write(sys.argv[1]) as f:
    f.write(b"half of " + sys.argv[2].encode() * 10000)
    f.flush()
    print("writing", flush=True)
    sys.stdin.readline()
    f.write(b" and the rest")
"""


def start_writer(path: Path, tag: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), tag],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert proc.stdout is not None and proc.stdout.readline() == "writing\n"
    return proc


def kill(proc: subprocess.Popen, reap: bool = True) -> None:
    proc.send_signal(signal.SIGKILL)
    if reap:
        proc.communicate(timeout=30)  # closes the pipes too


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def a_dead_pid() -> int:
    """The id of a process that has ended (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_temporary_names_its_writer():
    path = Path("/some/folder/model.npz")
    assert temporary_prefix(path) == f".model.npz.{os.getpid()}-{process_start(os.getpid()) or 0}."


def test_a_writer_killed_mid_write_leaves_a_temporary_the_next_save_removes(tmp_path):
    target = tmp_path / "model.npz"
    killed = start_writer(target, "killed")
    left = temporaries(tmp_path)
    assert len(left) == 1 and left[0].startswith(f".model.npz.{killed.pid}-")
    kill(killed)
    assert temporaries(tmp_path) == left  # SIGKILL: nothing could clean up
    live = start_writer(target, "live")
    mine = [name for name in temporaries(tmp_path) if name not in left]
    assert len(mine) == 1 and mine[0].startswith(f".model.npz.{live.pid}-")
    try:
        with atomic_write(target) as f:  # a later save of the same file
            f.write(b"saved")
        assert target.read_bytes() == b"saved"
        assert temporaries(tmp_path) == mine  # the dead writer's is gone, the live one's kept
    finally:
        out, _ = live.communicate("\n", timeout=30)
    assert live.returncode == 0  # two writers of one path both finish
    assert target.read_bytes().endswith(b" and the rest")
    assert temporaries(tmp_path) == []


def test_a_zombie_writer_is_gone(tmp_path):
    target = tmp_path / "model.npz"
    zombie = start_writer(target, "zombie")
    kill(zombie, reap=False)
    for _ in range(600):  # killed, not yet reaped: /proc says Z
        if writer_gone(zombie.pid, process_start(zombie.pid) or 0):
            break
        time.sleep(0.01)
    try:
        assert os.path.exists(f"/proc/{zombie.pid}") or not os.path.exists("/proc/self")
        assert len(remove_stale_temporaries(target)) == 1
        assert temporaries(tmp_path) == []
    finally:
        zombie.communicate(timeout=30)


def test_a_reused_process_id_is_told_by_its_start_time(tmp_path):
    if process_start(os.getpid()) is None:
        pytest.skip("no /proc: start times cannot be read here")
    target = tmp_path / "model.npz"
    me, parent = os.getpid(), os.getppid()
    reused = tmp_path / f".model.npz.{parent}-1.abcdefgh.tmp"  # a live pid, started at another time
    dead = tmp_path / f".model.npz.{a_dead_pid()}-{process_start(me)}.abcdefgh.tmp"
    mine = tmp_path / f".model.npz.{me}-{process_start(me)}.abcdefgh.tmp"  # this process, another thread
    unknown = tmp_path / f".model.npz.{parent}-0.abcdefgh.tmp"  # written where the start was unknown
    others = [tmp_path / ".model.npz.abcdefgh.tmp", tmp_path / ".other.npz.1-1.abcdefgh.tmp"]
    for path in (reused, dead, mine, unknown, *others):
        path.write_bytes(b"partial")
    assert sorted(remove_stale_temporaries(target)) == sorted([reused, dead])
    assert temporaries(tmp_path) == sorted(p.name for p in (mine, unknown, *others))


def test_a_training_run_removes_what_killed_runs_left_beside_its_checkpoint(tiny_config, tmp_path):
    import io

    import charrnn

    dead = a_dead_pid()
    names = ["model.npz", "model.best.npz", "model.metrics.jsonl", "model.loss.svg"]
    left = [tmp_path / f".{name}.{dead}-12345.k3j5h2x1.tmp" for name in names]
    for path in left:
        path.write_bytes(b"\0" * 1000)
    charrnn.run_pipeline(tiny_config, stdout=io.StringIO(), stderr=io.StringIO())
    assert all((tmp_path / name).exists() for name in names)
    assert temporaries(tmp_path) == []


def test_a_long_name_keeps_its_temporaries_within_the_file_system_limit(tmp_path):
    target = tmp_path / ("m" * 240 + ".npz")  # fits (244 bytes); with the tail it would not
    with atomic_write(target) as f:
        f.write(np.arange(3).tobytes())
    assert target.read_bytes() == np.arange(3).tobytes()
    prefix = temporary_prefix(target, pid=a_dead_pid())
    left = tmp_path / f"{prefix}abcdefgh.tmp"
    assert len(left.name.encode()) <= 255
    left.write_bytes(b"partial")
    ckpt_io.save(target, ckpt_io.Checkpoint({"W": np.zeros(2)}, {"step": 1}))
    assert temporaries(tmp_path) == []


# -- the names beside a checkpoint -------------------------------------------------------------


def test_the_files_of_a_run_are_named_beside_its_checkpoint():
    from charrnn.files import RunFiles

    files = RunFiles("runs/x/model.npz")
    assert files.name == "model"
    assert [p.as_posix() for p in (files.best, files.metrics, files.plot, files.tensorboard)] == [
        "runs/x/model.best.npz",
        "runs/x/model.metrics.jsonl",
        "runs/x/model.loss.svg",
        "runs/x/tb/model",
    ]
    assert RunFiles("runs/x/model.ckpt").best.as_posix() == "runs/x/model.ckpt.best.npz"
    assert RunFiles.from_metrics(files.metrics).checkpoint == files.checkpoint
    assert RunFiles.from_metrics("a/b.jsonl").plot.as_posix() == "a/b.loss.svg"
    longest = max(len(p.name) for p in (files.best, files.metrics, files.plot)) - len("model.npz")
    assert longest <= RunFiles.NAME_RESERVE


def test_a_training_run_writes_its_files_where_run_files_names_them(tiny_config, tmp_path):
    import io

    import charrnn
    from charrnn.files import RunFiles
    from charrnn.plot import default_output

    charrnn.run_pipeline(tiny_config, stdout=io.StringIO(), stderr=io.StringIO())
    files = RunFiles(tiny_config["train"]["checkpoint"])
    assert files.best.exists() and files.metrics.exists() and files.plot.exists()
    assert default_output(files.metrics) == files.plot  # `charrnn plot` redraws the same picture
