"""The one reader of metrics files (`charrnn.metrics`), and `charrnn plot` on hostile files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from charrnn.cli import main
from charrnn.errors import CharrnnError
from charrnn.metrics import MAX_LINE, read_jsonl, read_metrics

GOOD = (
    '{"step": 100, "train_loss": 2.5, "val_loss": null}\n{"step": 200, "train_loss": 2.1, "val_loss": 2.2}\n'
)


def write(tmp_path, content, name="m.metrics.jsonl"):
    path = tmp_path / name
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


def plot(tmp_path, path, capsys):
    code = main(["plot", str(path), "-o", str(tmp_path / "out.svg")])
    return code, capsys.readouterr().err


def test_an_unfinished_last_line_is_left_out_and_plot_says_so(tmp_path, capsys):
    path = write(tmp_path, GOOD + '{"step": 300, "train_lo')  # a run killed (or still writing) mid-line
    assert [r["step"] for r in read_metrics(path)] == [100, 200]
    heard = []
    assert len(read_metrics(path, warn=heard.append)) == 2
    assert heard == [f"{path}:3: the last line is unfinished (a run still writing it, or killed); left out"]
    code, err = plot(tmp_path, path, capsys)
    assert code == 0 and err == f"warning: {heard[0]}\n"
    assert (tmp_path / "out.svg").read_text().startswith("<svg")


def test_a_cut_multibyte_character_at_the_end_is_unfinished_too(tmp_path):
    path = write(tmp_path, GOOD.encode() + '{"step": 300, "note": "\u00e9'.encode()[:-1])
    assert len(read_metrics(path)) == 2


def test_damage_before_the_last_line_is_refused_even_with_an_unfinished_last_line(tmp_path):
    path = write(tmp_path, '{"step": 1, "train_loss": 2.0}\ngarbage\n{"step": 3, "train_l')
    with pytest.raises(CharrnnError, match=r"m.metrics.jsonl:2: not a JSON line"):
        read_metrics(path)


def test_a_complete_last_line_without_a_newline_is_a_record(tmp_path):
    path = write(tmp_path, GOOD + '{"step": 300, "train_loss": 2.0}')
    assert [r["step"] for r in read_metrics(path)] == [100, 200, 300]


def test_only_an_unfinished_line_is_no_records(tmp_path):
    path = write(tmp_path, '{"step": 1, "train_')
    with pytest.raises(CharrnnError, match="no metrics records"):
        read_metrics(path)
    assert read_metrics(path, empty_ok=True) == []


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (
            '{"step": 1' + "0" * 4000 + ', "train_loss": 2.0}\n',
            ":1: 'step' must be a number >= 0, got an integer of 4001 digits",
        ),
        (
            '{"step": 1' + "0" * 5000 + ', "train_loss": 2.0}\n',
            ":1: not a JSON line (Exceeds the limit (4300 digits)",
        ),
        (
            '{"step": 5, "val_loss": 1' + "0" * 400 + "}\n",
            ":1: 'val_loss' must be a number or null, got an integer of 401 digits",
        ),
        ('{"step": 1e999, "train_loss": 2.0}\n', ":1: 'step' must be finite, got inf"),
        ("[" * 100_000 + "]" * 100_000 + "\n", ":1: not a JSON line (nested too deeply)"),
        (
            '{"step": 1, "train_loss": 2.0, "x": ' + "[" * 100_000 + "]" * 100_000 + "}\n",
            ":1: not a JSON line (nested too deeply)",
        ),
        (
            '{"step": 1, "train_loss": 2.0}\n' + "x" * (MAX_LINE + 5) + "\n",
            f":2: a line longer than {MAX_LINE:,} bytes",
        ),
        (
            '{"step": "' + "9" * 100 + '"}\n',
            ":1: 'step' must be a number >= 0, got '" + "9" * 38 + "\u2026",
        ),
    ],
)
def test_hostile_lines_are_one_line_errors_naming_the_line(tmp_path, capsys, content, problem):
    path = write(tmp_path, content)
    with pytest.raises(CharrnnError) as err:
        read_metrics(path)
    assert f"{path}{problem}" in str(err.value)
    code, stderr = plot(tmp_path, path, capsys)
    assert code == 2, stderr
    assert stderr.startswith("error: ") and stderr.count("\n") == 1 and problem in stderr
    assert len(stderr) < 300
    assert not (tmp_path / "out.svg").exists()


def _limited_memory():
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))  # reading /dev/zero whole must fail fast


@pytest.mark.skipif(not os.path.exists("/dev/zero") or not hasattr(os, "mkfifo"), reason="POSIX devices")
def test_devices_and_fifos_are_refused_without_reading_them(tmp_path, cli_env):
    fifo = tmp_path / "metrics.fifo"
    os.mkfifo(fifo)  # no writer: opening it to read would wait for one forever
    for path in ("/dev/zero", str(fifo)):
        done = subprocess.run(
            [sys.executable, "-m", "charrnn", "plot", path, "-o", str(tmp_path / "o.svg")],
            env=cli_env,
            capture_output=True,
            text=True,
            timeout=60,
            preexec_fn=_limited_memory,
        )
        assert done.returncode == 2, done.stderr
        assert (
            done.stderr == f"error: {path} is not a regular file (a device or a pipe?); give a metrics file\n"
        )
    with pytest.raises(CharrnnError, match="not a regular file"):
        read_jsonl("/dev/null", "sweep results")


def test_read_jsonl_checks_each_value_and_names_what_it_reads(tmp_path):
    path = write(tmp_path, '{"id": "0001"}\n{"id": 7}\n', "results.jsonl")

    def check(value):
        return None if isinstance(value.get("id"), str) else f"'id' must be a string, got {value.get('id')!r}"

    with pytest.raises(CharrnnError, match=r"results.jsonl:2: 'id' must be a string, got 7"):
        read_jsonl(path, "sweep results", check)
    with pytest.raises(CharrnnError, match="sweep results not found"):
        read_jsonl(tmp_path / "missing.jsonl", "sweep results")
    assert read_jsonl(write(tmp_path, '{"id": "0001"}\n\n', "r.jsonl"), "sweep results", check) == [
        {"id": "0001"}
    ]
    assert json.loads(GOOD.splitlines()[0])["step"] == 100
