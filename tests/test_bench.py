from __future__ import annotations

import json

import yaml

from charrnn.cli import main
from conftest import TINY_TEXT


def test_bench_reports_speeds_and_memory(tiny_config, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CHARRNN_LOAD_PLUGINS", "")
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(tiny_config))
    quick = ["bench", str(path), "--seconds", "0.5"]
    assert main([*quick, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["train_chars_per_sec"] > 0 and report["generate_chars_per_sec"] > 0
    assert report["train_steps"] >= 10 and report["batch_size"] == 4
    V, H = len(set(TINY_TEXT)), 16
    assert report["parameters"] == V * H + H * H + H * V + H + V
    assert report["peak_memory_mb"] > 0
    assert not (tmp_path / "model.npz").exists()  # bench never touches the pipeline's checkpoint

    assert main(quick) == 0
    table = capsys.readouterr().out
    assert "chars/s" in table and "peak memory" in table

    no_time = ["bench", str(path), "--seconds", "0"]
    assert main(no_time) == 2
    message = "error: --seconds must be > 0"  # a message check, not a timing
    assert capsys.readouterr().err.startswith(message)
