from __future__ import annotations

import builtins
import importlib.util
import io
import json
import os
import struct
import threading

import pytest
import yaml

import charrnn
from charrnn import cli, run_pipeline
from charrnn_plugins import tensorboard

HAVE_TBX = importlib.util.find_spec("tensorboardX") is not None
needs_tbx = pytest.mark.skipif(
    not HAVE_TBX and not os.environ.get("CI"), reason="needs tensorboardX: pip install 'charrnn[tensorboard]'"
)


def read_events(folder):
    """Every event in the folder's event files: TFRecord framing (length, crc, data, crc)."""
    from tensorboardX.proto import event_pb2

    events = []
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack_from("<Q", data, pos)
            events.append(event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length]))
            pos += 12 + length + 4
    return events


def scalars(events):
    out: dict[str, list[tuple[int, float]]] = {}
    for event in events:
        for value in event.summary.value:
            if value.WhichOneof("value") == "simple_value":
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def texts(events):
    out: dict[str, list[tuple[int, str]]] = {}
    for event in events:
        for value in event.summary.value:
            if value.metadata.plugin_data.plugin_name == "text":
                tag = value.tag.removesuffix("/text_summary")
                out.setdefault(tag, []).append((event.step, value.tensor.string_val[0].decode()))
    return out


@needs_tbx
def test_training_writes_scalars_and_samples_that_read_back(tiny_config, tmp_path):
    tiny_config["plugins"] = ["charrnn_plugins.tensorboard"]
    tiny_config["train"]["eval_every"] = 10
    run_pipeline(tiny_config)
    events = read_events(tmp_path / "tb" / "model")
    got = scalars(events)
    assert [step for step, _ in got["train_loss"]] == [10, 20]
    assert [step for step, _ in got["val_loss"]] == [10, 20]
    assert got["lr"] == [(10, pytest.approx(0.1)), (20, pytest.approx(0.1))]
    assert all(loss > 0 for _, loss in got["train_loss"] + got["val_loss"])
    assert all(speed > 0 for _, speed in got["chars_per_sec"])
    metrics = [line for line in (tmp_path / "model.metrics.jsonl").read_text().splitlines() if line]
    last = json.loads(metrics[-1])
    assert got["train_loss"][-1][1] == pytest.approx(last["train_loss"], rel=1e-6)
    samples = texts(events)["sample"]
    assert [step for step, _ in samples] == [10, 20]
    assert all(text.startswith("    ") and len(text.replace("\n    ", "\n")) == 24 for _, text in samples)
    ((config_step, config_text),) = texts(events)["config"]
    assert config_step == 0 and '"hidden_size": 16' in config_text


@needs_tbx
def test_resumed_run_continues_in_the_same_folder(tiny_config, tmp_path):
    tiny_config["plugins"] = ["charrnn_plugins.tensorboard"]
    tiny_config["stages"] = ["train"]
    run_pipeline(tiny_config)
    run_pipeline(tiny_config, overrides=["train.steps=30", "train.resume=true"])
    got = scalars(read_events(tmp_path / "tb" / "model"))
    assert sorted(step for step, _ in got["train_loss"]) == [10, 20, 30]


@needs_tbx
def test_runs_in_two_threads_keep_their_own_writers(tiny_config, tmp_path):
    configs = []
    for name in ("a", "b"):
        config = {**tiny_config, "plugins": ["charrnn_plugins.tensorboard"], "stages": ["train"]}
        config["train"] = {**tiny_config["train"], "checkpoint": str(tmp_path / f"{name}.npz")}
        configs.append(config)
    errors = []

    def train(config):
        try:
            run_pipeline(config, stderr=io.StringIO())
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=train, args=(c,)) for c in configs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for name in ("a", "b"):
        got = scalars(read_events(tmp_path / "tb" / name))
        assert [step for step, _ in got["train_loss"]] == [10, 20]


def test_missing_tensorboardx_is_one_line_naming_the_extra(tiny_config, tmp_path, monkeypatch, capsys):
    real_import = builtins.__import__

    def no_tbx(name, *args, **kwargs):
        if name.startswith("tensorboardX"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tbx)
    tiny_config["plugins"] = ["charrnn_plugins.tensorboard"]
    path = tmp_path / "tb.yaml"
    path.write_text(yaml.safe_dump(tiny_config))
    assert cli.main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: the TensorBoard logger needs tensorboardX: pip install 'charrnn[tensorboard]'"
    assert not (tmp_path / "tb").exists()


def test_not_a_default_plugin():
    assert "charrnn_plugins.tensorboard" not in charrnn.plugins.DEFAULT_PLUGINS
    assert tensorboard.log_dir("runs/x/final_model.npz").as_posix() == "runs/x/tb/final_model"


FULL_DISK = """
import errno, sys
import tensorboardX.record_writer as record_writer
from charrnn.cli import main

class FillingDisk:
    '''The event file on a disk with `budget` bytes left: a write beyond it fails as on a full disk.'''

    def __init__(self, path, budget):
        self.file, self.left = open(path, "wb", buffering=0), budget

    def write(self, data):
        if len(data) > self.left:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.left -= len(data)
        return self.file.write(data)

    def flush(self):
        pass

    def fileno(self):
        return self.file.fileno()

    def close(self):
        self.file.close()

budget = int(sys.argv[2])
record_writer.open_file = lambda path: FillingDisk(path, budget)
sys.exit(main(["run", sys.argv[1]]))
"""


@needs_tbx
@pytest.mark.slow
@pytest.mark.parametrize("budget", [0, 6000])  # full from the start; full after the first reports
def test_a_full_disk_is_one_line_and_nothing_after_it(tiny_config, tmp_path, cli_env, budget):
    import subprocess
    import sys

    tiny_config["plugins"] = ["charrnn_plugins.tensorboard"]
    tiny_config["stages"] = ["train"]
    tiny_config["train"].update(steps=200, sample_every=10, sample_length=100)
    path = tmp_path / "tb.yaml"
    path.write_text(yaml.safe_dump(tiny_config))
    done = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(path), str(budget)],
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = done.stderr.splitlines()
    assert done.returncode == 2, done.stderr
    events = next((tmp_path / "tb" / "model").glob("events.out.tfevents.*"))
    assert lines[-1] == f"error: cannot write TensorBoard events {events}: No space left on device"
    assert not [line for line in lines if "Traceback" in line or "Exception" in line], done.stderr
    if budget:
        assert any(line.startswith("step 10/200 ") for line in lines)  # training ran, then the disk filled
        assert lines[-2].startswith("saved step ") and lines[-2].endswith("before the error")
    else:
        assert not any(line.startswith("step ") for line in lines)  # refused before the first step
