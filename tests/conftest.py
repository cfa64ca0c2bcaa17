from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

import charrnn
from charrnn.plugins import get_plugin_manager

ROOT = Path(__file__).resolve().parent.parent
#: in CI every extra is installed (see .ci/run): a test that needs one runs there, it never skips
IN_CI = bool(os.environ.get("CI"))
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"

# Bit-exact comparisons (resume, MPI, sweeps) need one BLAS thread count for a whole run, and
# the thread chooser reacts to load, which a busy test machine has. Its own tests turn it on.
os.environ.setdefault("CHARRNN_TUNING", "-blas_threads")

TINY_TEXT = (
    "the cat sat on the mat. the dog sat on the log. a cat and a dog met on a mat by a log. the end.\n"
) * 8


def process_gone(pid: int, limit: float = 30.0) -> bool:
    """Whether process `pid` ended within `limit` seconds (a zombie of ours counts as ended)."""
    import time

    end = time.monotonic() + limit
    while time.monotonic() < end:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


def wait_for(predicate, timeout: float = 10.0, pause: float = 0.01) -> bool:
    """Whether `predicate()` became true within `timeout` seconds."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(pause)
    return False


def assert_usable_at(page, width: int, selectors) -> None:
    """A page at `width` px: nothing wider than the window, and every control reachable, big
    enough to tap and named (a label, an aria-label or its text)."""
    assert page.evaluate("document.documentElement.scrollWidth") <= width
    for selector in selectors:
        box = page.locator(selector).bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= width and box["height"] >= 16, selector
        label = page.evaluate(
            "(s) => { const e = document.querySelector(s); return e.labels && e.labels.length ? "
            "e.labels[0].textContent : e.getAttribute('aria-label') || e.textContent; }",
            selector,
        )
        assert label.strip(), f"{selector} has no accessible name"


def option_problem(factory, kind, *args, **options) -> str:
    """The message a component's bad options get on the build path: the one option checker
    (`charrnn.config.check_component`), then the factory itself (for rules between options)."""
    from charrnn.config import check_component
    from charrnn.errors import ConfigError

    try:
        resolved = check_component(factory, kind, options, lambda *keys: ".".join(keys))
        factory(*args, **resolved)
    except (ConfigError, ValueError) as exc:
        return str(exc)
    raise AssertionError(f"{factory.__name__}({options}) was accepted")


@pytest.fixture
def tiny_text() -> str:
    return TINY_TEXT


@pytest.fixture
def corpus_file(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text(TINY_TEXT, encoding="utf-8")
    return path


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def pm():
    """A fresh plugin manager with the builtins only (no entry points)."""
    return get_plugin_manager(load_entrypoints=False)


def tiny_pipeline(corpus: Path, checkpoint: Path, steps: int = 20) -> dict:
    """A pipeline dict that trains `steps` steps on the tiny text, in seconds."""
    return {
        "seed": 1,
        "corpus": {"type": "text", "path": str(corpus), "val_fraction": 0.1},
        "model": {"type": "rnn", "hidden_size": 16},
        "optimizer": {"type": "adagrad", "lr": 0.1},
        "sampler": {"type": "temperature", "temperature": 1.0},
        "stages": ["train", "generate"],
        "train": {
            "steps": steps,
            "batch_size": 4,
            "seq_length": 8,
            "sample_every": 10,
            "sample_length": 20,
            "checkpoint": str(checkpoint),
        },
        "generate": {"num_chars": 50, "seed_text": "the "},
    }


@pytest.fixture
def tiny_config(tmp_path, corpus_file):
    """A pipeline dict that trains a few steps on the tiny text, in seconds."""
    return tiny_pipeline(corpus_file, tmp_path / "model.npz")


@pytest.fixture
def cli_env(monkeypatch):
    """Environment for CLI subprocesses: no external plugins, unbuffered."""
    import os

    env = dict(os.environ, CHARRNN_LOAD_PLUGINS="", PYTHONUNBUFFERED="1")
    return env


def charrnn_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "charrnn", *args]


def params_of(path):
    """The arrays (without `meta`) and the metadata of a checkpoint."""
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files if k != "meta"}, json.loads(str(data["meta"]))


class FrozenOptimizer:
    """An optimizer that never changes the parameters (and has no `lr`)."""

    def step(self, params, grads):
        pass

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


class FrozenPlugin:
    """Registers `FrozenOptimizer` as optimizer `frozen`."""

    @charrnn.hookimpl
    def charrnn_optimizer(self, register):
        register("frozen", FrozenOptimizer)


@pytest.fixture(scope="session")
def export_checkpoints(tmp_path_factory):
    """Trained tiny checkpoints for the export tests: every `export_models.MODELS` spec, `bytes` (a
    byte-encoded GRU) and `wide` (a 2x96 LSTM, slow enough in the page to Stop)."""
    from export_models import BYTES_TEXT, MODELS, make_checkpoint

    tmp = tmp_path_factory.mktemp("export-models")
    paths = {spec: make_checkpoint(tmp, *spec) for spec in MODELS}
    paths["bytes"] = make_checkpoint(tmp, "gru", 2, text=BYTES_TEXT, encoding="bytes")
    paths["wide"] = make_checkpoint(tmp, "lstm", 2, hidden=96)
    return paths
