from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SHAKESPEARE

SCRIPT = Path(__file__).resolve().parent / "bench_speed.py"


@pytest.mark.bench
def test_bench_speed_reports_every_contender():
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} is absent")
    args = ["--seconds", "0.2", "--rounds", "1", "--retries", "0", "--gen-chars", "200", "--json"]
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    sections = {s["key"]: s["rows"] for s in report["results"]}
    assert set(sections) == {"classic", "big", "generation"}
    for key in ("classic", "big"):
        assert {"charrnn", "charrnn kernel", "naive numpy"} <= set(sections[key])
        assert sections[key]["charrnn"]["last_loss"] < 4.5  # real training on 65 symbols (ln 65 = 4.17)
    assert all(r["median"] > 0 for rows in sections.values() for r in rows.values())
    assert [t["name"] for t in report["targets"]] == ["big", "classic", "generation"]
    assert 0.3 < report["memory"]["ratio"] < 10
