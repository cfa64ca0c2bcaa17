"""Checkpoints: one `.npz` of arrays plus a JSON metadata string, loadable without pickle.

Array keys are `param/<name>`, `optim/<name>` and `state/<name>`; `meta` holds the JSON
(vocabulary, resolved pipeline, step, data position, RNG state, smoothed loss, timings).
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from charrnn.errors import CheckpointError

FORMAT = "charrnn-checkpoint"
FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    """What a checkpoint holds, split by role."""

    params: dict[str, np.ndarray]
    meta: dict[str, Any]
    optim: dict[str, np.ndarray] = field(default_factory=dict)
    state: dict[str, np.ndarray] = field(default_factory=dict)


def save(path: str | Path, ckpt: Checkpoint) -> None:
    """Write atomically: a temporary file with a fixed name beside `path`, then a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {"meta": np.array(json.dumps(ckpt.meta, sort_keys=True))}
    for prefix, group in (("param", ckpt.params), ("optim", ckpt.optim), ("state", ckpt.state)):
        for name, value in group.items():
            arrays[f"{prefix}/{name}"] = np.asarray(value)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise CheckpointError(f"cannot write checkpoint {path}: {exc.strerror or exc}") from None


def load(path: str | Path) -> Checkpoint:
    """Read a checkpoint; anything missing, corrupt or pickled is a CheckpointError."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint path is not a file: {path}")
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"PK\x03\x04":
                raise CheckpointError(f"checkpoint {path} is corrupt or not an .npz file")
            f.seek(0)
            with np.load(f, allow_pickle=False) as data:
                arrays = {key: data[key] for key in data.files}
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise CheckpointError(f"checkpoint {path} holds pickled objects; refusing to load it") from None
        raise CheckpointError(f"checkpoint {path} is corrupt or not an .npz file: {exc}") from None
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated: {exc}") from None
    if "meta" not in arrays:
        raise CheckpointError(f"checkpoint {path} has no charrnn metadata (not a charrnn checkpoint)")
    try:
        meta = json.loads(str(arrays.pop("meta")))
    except (json.JSONDecodeError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path} has corrupt metadata: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a charrnn checkpoint")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} was written by a newer charrnn (format {meta['format_version']})"
        )
    for key in ("vocab", "config", "step"):
        if key not in meta:
            raise CheckpointError(f"checkpoint {path} metadata lacks {key!r}")
    groups: dict[str, dict[str, np.ndarray]] = {"param": {}, "optim": {}, "state": {}}
    for key, value in arrays.items():
        prefix, _, name = key.partition("/")
        if prefix not in groups or not name:
            raise CheckpointError(f"checkpoint {path} has an unexpected array {key!r}")
        groups[prefix][name] = value
    if not groups["param"]:
        raise CheckpointError(f"checkpoint {path} holds no parameters")
    return Checkpoint(groups["param"], meta, groups["optim"], groups["state"])
