"""Shared helpers of the sweep tests (local and Ray): a long sweep to stop, and what it leaves."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import wait_for


def results(here) -> list[dict]:
    """The rows of `out/results.jsonl`."""
    return [json.loads(line) for line in (here / "out" / "results.jsonl").read_text().splitlines()]


def first_done_second_running(here, proc: subprocess.Popen, limit: float = 120.0) -> int:
    """Wait until trial 0000 has its row (it finished) and trial 0001 has reported; 0001's process id."""
    rows = here / "out" / "results.jsonl"
    metrics = here / "out" / "trials" / "0001" / "model.metrics.jsonl"

    def ready() -> bool:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        return bool(
            rows.exists() and '"0000"' in rows.read_text() and metrics.exists() and metrics.stat().st_size
        )

    assert wait_for(ready, limit, 0.05), "trial 0000 did not finish with 0001 reporting"
    return int((here / "out" / "trials" / "0001" / ".lock").read_text())


def resume_keeps_0000(here, env=None) -> tuple[list[dict], str]:
    """`charrnn sweep s.yaml --resume` finishes all three trials, without training 0000 again."""
    done = subprocess.run(
        [sys.executable, "-m", "charrnn", "sweep", "s.yaml", "--resume"],
        cwd=here,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    rows = results(here)
    assert [(r["id"], r["status"], r["steps"]) for r in rows] == [
        ("0000", "done", 3000),
        ("0001", "done", 3000),
        ("0002", "done", 3000),
    ]
    assert "must be beyond the checkpoint" not in done.stderr
    return rows, done.stderr
