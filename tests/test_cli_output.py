"""Real processes: an unwritable or closed stdout and an early Ctrl+C give one line, no traceback."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

import charrnn
from conftest import charrnn_cmd


@pytest.fixture
def checkpoint(tiny_config):
    tiny_config["stages"] = ["train"]
    tiny_config["train"].update(steps=2, sample_every=None)
    charrnn.run_pipeline(tiny_config)
    return tiny_config["train"]["checkpoint"]


def one_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("stream", [False, True])
def test_stdout_on_a_full_device_is_one_line(checkpoint, cli_env, stream):
    argv = charrnn_cmd("generate", checkpoint, "--num-chars", "50", *(["--stream"] if stream else []))
    with open("/dev/full", "w") as full:
        proc = subprocess.run(argv, stdout=full, stderr=subprocess.PIPE, text=True, env=cli_env, timeout=60)
    assert proc.returncode == 1
    assert one_line(proc.stderr) == "error: cannot write to stdout: No space left on device"


@pytest.mark.slow
def test_closed_stdout_is_one_line(checkpoint, cli_env):
    argv = ["sh", "-c", 'exec "$@" >&-', "sh", *charrnn_cmd("generate", checkpoint, "--num-chars", "5")]
    proc = subprocess.run(argv, stderr=subprocess.PIPE, text=True, env=cli_env, timeout=60)
    assert proc.returncode == 1
    assert one_line(proc.stderr).startswith("error: stdout is closed")


@pytest.mark.slow
def test_ctrl_c_during_start_up_exits_130_without_a_traceback(checkpoint, cli_env, tmp_path):
    marker = tmp_path / "importing"
    plugin = tmp_path / "slow_plugin.py"
    plugin.write_text(f"import pathlib, time\npathlib.Path({str(marker)!r}).touch()\ntime.sleep(60)\n")
    argv = charrnn_cmd("generate", checkpoint, "--plugin", str(plugin))
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env)
    try:
        deadline = time.monotonic() + 30
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert marker.exists(), proc.communicate(timeout=5)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert one_line(err) == "interrupted"


@pytest.mark.slow
def test_importing_the_cli_loads_no_heavy_module(cli_env):
    """numpy and friends load inside `main`, where Ctrl+C is handled, not before it runs."""
    code = (
        "import sys, charrnn.cli; print(sorted(m for m in ('numpy', 'yaml', 'pluggy') if m in sys.modules))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=cli_env, timeout=60, check=True
    )
    assert proc.stdout.strip() == "[]"
