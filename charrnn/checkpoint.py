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

from charrnn.errors import CheckpointError, ConfigError

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


# -- checkpoints of training runs: what they record, and what resuming from one requires ----------


def training_meta(config: dict[str, Any], corpus: Any, corpus_meta: dict[str, Any]) -> dict[str, Any]:
    """The part of a training checkpoint's metadata that stays the same for the whole run."""
    from charrnn import __version__

    return _jsonable(
        {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "charrnn_version": __version__,
            "config": config,
            "vocab": corpus.vocab,
            "encoding": corpus.encoding,
            "corpus": corpus_meta,
        }
    )


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def load_params(model: Any, saved: Checkpoint, path: str | Path) -> None:
    """Copy checkpoint arrays into the model's own arrays (shapes and names must agree)."""
    if set(saved.params) != set(model.params):
        raise CheckpointError(
            f"checkpoint {path} has parameters {sorted(saved.params)}, the model expects {sorted(model.params)}"
        )
    for name, value in saved.params.items():
        if value.shape != model.params[name].shape:
            raise CheckpointError(
                f"checkpoint {path}: parameter {name} has shape {value.shape}, expected {model.params[name].shape}"
            )
        model.params[name][...] = value


def check_init_from(saved: Checkpoint, config: dict[str, Any], corpus: Any, path: str) -> None:
    """`train.init_from` starts a new run from a checkpoint's weights: same model type and vocabulary."""
    if saved.meta["vocab"] != corpus.vocab or saved.meta.get("encoding", "utf-8") != corpus.encoding:
        old, new = set(saved.meta["vocab"]), set(corpus.vocab)
        extra = "".join(sorted(new - old))[:20]
        raise CheckpointError(
            f"train.init_from: the vocabulary of {path} ({len(old)} symbols) differs from the corpus's "
            f"({len(new)} symbols"
            + (f"; new: {extra!r}" if extra else "")
            + "); fine-tuning needs the same vocabulary "
            "(use encoding: bytes for both to share one)"
        )
    old_model = saved.meta["config"]["model"]
    if old_model.get("type") != config["model"]["type"]:
        raise CheckpointError(
            f"train.init_from: {path} holds a {old_model.get('type')!r} model, the pipeline builds {config['model']['type']!r}"
        )


def check_resume(saved: Checkpoint, config: dict[str, Any], corpus: Any, digest: str, path: str) -> None:
    """Resuming continues the same run: same model, batch layout, optimizer, vocabulary and text."""
    t, old = config["train"], saved.meta["config"]
    if t["steps"] is not None and t["steps"] <= saved.meta["step"]:
        raise ConfigError(
            f"train.steps ({t['steps']}) must be beyond the checkpoint's step ({saved.meta['step']}) to resume"
        )
    for section, keys in (("model", None), ("train", ("batch_size", "seq_length"))):
        for key in keys or sorted(set(old[section]) | set(config[section])):
            a, b = old[section].get(key), config[section].get(key)
            if a != b:
                raise CheckpointError(
                    f"cannot resume: {section}.{key} is {b!r} but the checkpoint {path} was trained with {a!r}"
                )
    if old["optimizer"]["type"] != config["optimizer"]["type"]:
        raise CheckpointError(
            f"cannot resume: optimizer.type is {config['optimizer']['type']!r} but the checkpoint "
            f"{path} used {old['optimizer']['type']!r}"
        )
    if saved.meta["vocab"] != corpus.vocab or saved.meta.get("encoding", "utf-8") != corpus.encoding:
        raise CheckpointError(f"cannot resume: the corpus vocabulary differs from the checkpoint {path}'s")
    if saved.meta.get("corpus", {}).get("train_sha256") != digest:
        raise CheckpointError(f"cannot resume: the training text differs from the one checkpoint {path} used")
