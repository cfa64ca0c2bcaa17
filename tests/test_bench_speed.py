from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SHAKESPEARE

SCRIPT = Path(__file__).resolve().parent / "bench_speed.py"


@pytest.mark.bench
def test_bench_speed_reports_every_contender():
    corpus = Path(os.environ.get("CHARRNN_BENCH_CORPUS", SHAKESPEARE))
    if not corpus.is_file():
        pytest.skip(f"{corpus} is absent (set CHARRNN_BENCH_CORPUS)")
    args = ["--seconds", "0.2", "--rounds", "1", "--retries", "0", "--gen-chars", "200", "--json"]
    args += ["--configs", "classic,big"]  # the lstm's report cycle alone takes half a minute
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    sections = {s["key"]: s["rows"] for s in report["results"]}
    assert set(sections) == {"classic", "big", "generation"}
    for key in ("classic", "big"):
        assert {"charrnn", "charrnn kernel", "naive numpy"} <= set(sections[key])
        assert sections[key]["charrnn"]["last_loss"] < 4.5  # real training on 65 symbols (ln 65 = 4.17)
    assert all(r["median"] > 0 for rows in sections.values() for r in rows.values())
    for section in report["results"]:  # every speed also as a share of the model's bound here
        assert section["bound"]["chars_per_sec"] > 0
        for row in section["rows"].values():
            assert row["of bound"] == row["median"] / section["bound"]["chars_per_sec"]
    assert [t["name"] for t in report["bound_targets"]] == ["big"]
    assert report["cpu"]["cpus"] >= 1 and report["date"]
    assert [t["name"] for t in report["targets"]] == ["big", "classic", "generation"]
    assert 0.3 < report["memory"]["ratio"] < 10
