"""Checkpoints: one `.npz` of arrays plus a JSON metadata string, loadable without pickle.

Array keys are `param/<name>`, `optim/<name>` and `state/<name>`; `meta` holds the JSON
(vocabulary, resolved pipeline, step, data position, RNG state, smoothed loss, timings).

Loading trusts nothing in the file: `meta` is checked against one schema (`check_meta`), and
every array's `.npy` header is read and checked (dtype, declared size against the bytes the zip
member holds, and against the shapes the caller expects) before any array data is read, so a
damaged or hostile file is a one-line CheckpointError, never a traceback or a huge allocation.
"""

from __future__ import annotations

import dataclasses
import json
import math
import stat
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np

from charrnn import options as opt
from charrnn.errors import CheckpointError, ConfigError, CorpusError
from charrnn.files import atomic_write
from charrnn.options import Check, Choice, Range

FORMAT = "charrnn-checkpoint"
FORMAT_VERSION = 1
GROUPS = ("param", "optim", "state")
ENCODINGS = ("utf-8", "bytes")
MAX_META_BYTES = 64 << 20  # the JSON metadata of a real checkpoint is a few kB
ARRAY_KINDS = "fiu"  # floats, and integers for counters (Adam's `t`); never objects or strings

ArraySpec = tuple[tuple[int, ...], str]  # (shape, allowed dtype kinds, e.g. "f")
Expect = Callable[[dict[str, Any]], Mapping[str, Mapping[str, ArraySpec]]]


@dataclass
class Checkpoint:
    """What a checkpoint holds, split by role."""

    params: dict[str, np.ndarray]
    meta: dict[str, Any]
    optim: dict[str, np.ndarray] = field(default_factory=dict)
    state: dict[str, np.ndarray] = field(default_factory=dict)


def save(path: str | Path, ckpt: Checkpoint) -> None:
    """Write `ckpt` to `path` atomically (see `atomic_write`)."""
    arrays: dict[str, np.ndarray] = {"meta": np.array(json.dumps(ckpt.meta, sort_keys=True))}
    for prefix, group in (("param", ckpt.params), ("optim", ckpt.optim), ("state", ckpt.state)):
        for name, value in group.items():
            arrays[f"{prefix}/{name}"] = np.asarray(value)
    with atomic_write(path) as f:
        np.savez(f, **arrays)


def specs(arrays: Mapping[str, np.ndarray], kinds: str | None = None) -> dict[str, ArraySpec]:
    """The shapes (and dtype kinds, default: each array's own) that `load(expect=...)` compares with."""
    return {name: (tuple(a.shape), kinds or np.asarray(a).dtype.kind) for name, a in arrays.items()}


def read_meta(path: str | Path) -> dict[str, Any]:
    """The checked metadata of a checkpoint, without reading its arrays."""
    with _open(Path(path)) as (zf, members):
        return _read_meta(zf, members, Path(path))


def load(path: str | Path, expect: Expect | None = None) -> Checkpoint:
    """Read a checkpoint; anything missing, corrupt, pickled or inconsistent is a CheckpointError.

    `expect(meta)` (called once the metadata passed its checks) returns, per group (`param`,
    `optim`, `state`), the arrays the caller needs by name with their shapes and dtype kinds;
    the archive must hold exactly those, which is checked before any data is read. Groups it
    leaves out are not read. Without `expect` every array is read.
    """
    path = Path(path)
    with _open(path) as (zf, members):
        meta = _read_meta(zf, members, path)
        headers = {key: _header(zf, info, path) for key, info in members.items() if key != "meta"}
        groups: dict[str, dict[str, zipfile.ZipInfo]] = {g: {} for g in GROUPS}
        for key, info in members.items():
            prefix, _, name = key.partition("/")
            if key == "meta":
                continue
            if prefix not in groups or not name:
                raise CheckpointError(f"checkpoint {path} has an unexpected array {key!r}")
            groups[prefix][name] = info
        if not groups["param"]:
            raise CheckpointError(f"checkpoint {path} holds no parameters")
        wanted: Mapping[str, Any] = {g: None for g in GROUPS} if expect is None else expect(meta)
        for group, need in wanted.items():
            if need is not None:
                _compare(path, group, {n: headers[f"{group}/{n}"] for n in groups[group]}, need)
        out: dict[str, dict[str, np.ndarray]] = {g: {} for g in GROUPS}
        for group in wanted:
            for name, info in groups[group].items():
                key = f"{group}/{name}"
                out[group][name] = _read_array(zf, info, headers[key], path, key)
    return Checkpoint(out["param"], meta, out["optim"], out["state"])


# -- reading ----------------------------------------------------------------------------------


@dataclass
class _Header:
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool
    offset: int  # bytes of magic and header before the data
    nbytes: int


@contextmanager
def _damage(path: Path) -> Iterator[None]:
    """Turn what zipfile and zlib raise for a damaged archive (bad CRC, truncation, bogus headers) into one line."""
    try:
        yield
    except (
        OSError,
        EOFError,
        zipfile.BadZipFile,
        zipfile.LargeZipFile,
        zlib.error,
        ValueError,
        KeyError,
    ) as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated: {_one_line(exc)}") from None
    except (NotImplementedError, RuntimeError) as exc:  # an unknown compression method, encryption
        raise CheckpointError(
            f"checkpoint {path} uses an unsupported zip feature: {_one_line(exc)}"
        ) from None


@contextmanager
def _open(path: Path) -> Iterator[tuple[zipfile.ZipFile, dict[str, zipfile.ZipInfo]]]:
    """The zip archive and its `.npy` members by key."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except (OSError, ValueError) as exc:  # a name too long or with a NUL byte, no permission
        raise CheckpointError(
            f"cannot read checkpoint {path!r}: {getattr(exc, 'strerror', None) or exc}"
        ) from None
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"checkpoint path is not a file: {path}")
    with ExitStack() as stack:
        with _damage(path):
            f = stack.enter_context(open(path, "rb"))
            if f.read(4) != b"PK\x03\x04":
                raise CheckpointError(f"checkpoint {path} is corrupt or not an .npz file")
            f.seek(0)
            zf = stack.enter_context(zipfile.ZipFile(f))
            members: dict[str, zipfile.ZipInfo] = {}
            for info in zf.infolist():
                key = info.filename.removesuffix(".npy")
                if key == info.filename or key in members:
                    raise CheckpointError(
                        f"checkpoint {path} has an unexpected or repeated member {info.filename!r}"
                    )
                members[key] = info
        if "meta" not in members:
            raise CheckpointError(f"checkpoint {path} has no charrnn metadata (not a charrnn checkpoint)")
        yield zf, members


def _header(zf: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path) -> _Header:
    """The `.npy` header of a member, checked against the bytes the member holds; no data is read."""
    key = info.filename.removesuffix(".npy")
    with _damage(path), zf.open(info) as f:
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy version {version}")
        except (ValueError, SyntaxError, TypeError) as exc:
            raise CheckpointError(
                f"checkpoint {path}: array {key!r} has a corrupt header ({_one_line(exc)})"
            ) from None
        offset = f.tell()
    if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
        raise CheckpointError(
            f"checkpoint {path}: array {key!r} holds pickled objects or records; refusing to load it"
        )
    if any(n < 0 for n in shape):
        raise CheckpointError(f"checkpoint {path}: array {key!r} has a negative dimension {shape}")
    nbytes = math.prod(shape) * dtype.itemsize  # Python ints: no overflow, nothing allocated
    if offset + nbytes != info.file_size:
        raise CheckpointError(
            f"checkpoint {path}: array {key!r} declares shape {shape} of {dtype} ({nbytes:,} bytes) "
            f"but its zip member holds {max(info.file_size - offset, 0):,}"
        )
    return _Header(tuple(shape), dtype, fortran, offset, nbytes)


def _compare(path: Path, group: str, found: dict[str, _Header], need: Mapping[str, ArraySpec]) -> None:
    """The arrays of `group` must be exactly those the caller needs, with their shapes and kinds."""
    if set(found) != set(need):
        what = {"param": "parameters", "optim": "optimizer state", "state": "hidden state"}[group]
        raise CheckpointError(
            f"checkpoint {path} has {what} {sorted(found)}, this run expects {sorted(need)}"
        )
    for name, (shape, kinds) in need.items():
        h = found[name]
        if h.shape != tuple(shape):
            raise CheckpointError(
                f"checkpoint {path}: {group}/{name} has shape {h.shape}, expected {tuple(shape)}"
            )
        if h.dtype.kind not in kinds:
            raise CheckpointError(
                f"checkpoint {path}: {group}/{name} has dtype {h.dtype}, expected {_kinds(kinds)}"
            )


def _read_array(zf: zipfile.ZipFile, info: zipfile.ZipInfo, h: _Header, path: Path, key: str) -> np.ndarray:
    """The data of a member whose header passed `_header`, read into a fresh writable array."""
    if h.dtype.kind not in (ARRAY_KINDS if key != "meta" else "U"):
        raise CheckpointError(f"checkpoint {path}: {key} has dtype {h.dtype}, expected {_kinds(ARRAY_KINDS)}")
    out = np.empty(h.shape[::-1] if h.fortran else h.shape, dtype=h.dtype)
    with _damage(path), zf.open(info) as f:
        f.seek(h.offset)
        buf, got = memoryview(out.reshape(-1).view(np.uint8)), 0
        while got < h.nbytes:
            n = f.readinto(buf[got:])
            if not n:
                raise CheckpointError(f"checkpoint {path}: array {key!r} is truncated")
            got += n
        if f.read(1):  # reading to the end also makes zipfile check the member's CRC
            raise CheckpointError(
                f"checkpoint {path}: array {key!r} holds more data than its header declares"
            )
    out = out.T if h.fortran else out
    if out.dtype.kind == "f" and not np.isfinite(out).all():
        raise CheckpointError(f"checkpoint {path}: {key} holds NaN or infinite values")
    return out


def _read_meta(zf: zipfile.ZipFile, members: dict[str, zipfile.ZipInfo], path: Path) -> dict[str, Any]:
    info = members["meta"]
    h = _header(zf, info, path)
    if h.dtype.kind != "U" or h.shape != () or h.nbytes > MAX_META_BYTES:
        raise CheckpointError(f"checkpoint {path}: its metadata is not a JSON string")
    try:
        meta = json.loads(str(_read_array(zf, info, h, path, "meta")[()]))
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {path} has corrupt metadata: {_one_line(exc)}") from None
    return check_meta(meta, path)


# -- the metadata: one description, written, read and checked -----------------------------------


def _vocab_ok(vocab: list[str]) -> bool:
    return len(vocab) >= 2 and all(len(c) == 1 for c in vocab) and len(set(vocab)) == len(vocab)


def _section_ok(section: dict[str, Any]) -> bool:
    return isinstance(section.get("type", ""), str)


def _rng_ok(state: Any) -> bool:
    try:
        check_rng_state(state, ValueError)
    except ValueError:
        return False
    return True


def _saved_config_ok(config: dict[str, Any]) -> bool:
    """The parts of a saved pipeline that readers rely on: the model, optimizer and train sections
    as mappings with a string `type` (the model's required), positive batch and sequence sizes."""
    for section in ("model", "optimizer", "train"):
        if not isinstance(config.get(section), dict) or not _section_ok(config[section]):
            return False
    if not isinstance(config["model"].get("type"), str):
        return False
    for key in ("batch_size", "seq_length"):
        value = config["train"].get(key, 1)
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return False
    return all(isinstance(config.get(s, {}), dict) for s in ("sampler", "generate", "schedule", "corpus"))


Count = Annotated[int, Range(ge=0)]
Loss = Annotated[float | None, "nats per character"]


@dataclass(kw_only=True)
class RunMeta:
    """What a checkpoint's `meta` holds: the vocabulary, the resolved pipeline, and where the run
    stood (step, data position, random state, losses), so that it generates and resumes exactly.

    Training writes it through this class and every reader checks it against the same
    description (`check_meta`), so a damaged or hostile file is refused in one wording.
    """

    format: Annotated[str, Choice(FORMAT), "the file's kind"] = FORMAT
    format_version: Annotated[int, Range(ge=1), "the layout's version"] = FORMAT_VERSION
    charrnn_version: Annotated[str, "the charrnn that wrote it"] = ""
    vocab: Annotated[list[str], Check(_vocab_ok, "a list of at least 2 distinct one-character strings")]
    encoding: Annotated[Literal["utf-8", "bytes"], "how text maps to the vocabulary"] = "utf-8"
    config: Annotated[
        dict[str, Any],
        Check(_saved_config_ok, "a resolved pipeline with model, optimizer and train sections"),
        "the resolved pipeline the run trained with",
    ]
    corpus: Annotated[dict[str, Any], "what the training text was (source, size, digest)"] = field(
        default_factory=dict
    )
    step: Annotated[Count, "training steps done"]
    data_position: Annotated[int | None, Range(ge=0), "where the next batch starts"] = None
    smooth_loss: Loss = None
    rng: Annotated[
        dict[str, Any] | None, Check(lambda v: v is None or _rng_ok(v), "a PCG64 bit generator state")
    ] = None
    rng_ranks: Annotated[list[dict[str, Any]] | None, "each MPI rank's generator state"] = None
    best_val_loss: Loss = None
    bad_evals: Annotated[Count, "evaluations since the best one (early stopping)"] = 0
    world_size: Annotated[int, Range(ge=1), "processes that trained it"] = 1
    saved_at: Annotated[float | None, "when it was written (seconds since the epoch)"] = None
    elapsed_seconds: Annotated[float | None, "wall time of the run when it was written"] = None
    chars_per_sec: Annotated[float | None, "training speed at the last report"] = None
    val_loss: Loss = None


RUN_META = opt.schema_of(RunMeta)


def check_meta(meta: Any, path: str | Path) -> dict[str, Any]:
    """The JSON metadata of a checkpoint, checked against `RunMeta` (defaults filled): one
    description for every reader (generate, resume, init_from, the server)."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a charrnn checkpoint")
    for name in ("format_version", "vocab", "config", "step"):
        if name not in meta:
            raise CheckpointError(f"checkpoint {path} metadata lacks {name!r}")
    version = meta["format_version"]
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} was written by a newer charrnn (format {version})")
    try:
        checked = opt.check(RUN_META.merged(opt.Schema({}, open=True)), meta, lambda *k: ".".join(k))
    except opt.OptionError as exc:
        raise CheckpointError(f"checkpoint {path}: meta {exc}") from None
    if checked["encoding"] == "bytes" and checked["vocab"] != [chr(i) for i in range(256)]:
        raise CheckpointError(
            f"checkpoint {path}: meta vocab: must be the 256 byte values with encoding 'bytes'"
        )
    return checked


def check_rng_state(state: Any, bad: Callable[[str], Exception]) -> None:
    """A saved `Generator.bit_generator.state` that the training loop's PCG64 accepts exactly."""
    must = "a PCG64 bit generator state"
    if (
        not isinstance(state, dict)
        or set(state) != {"bit_generator", "state", "has_uint32", "uinteger"}
        or state["bit_generator"] != "PCG64"
        or not isinstance(state["state"], dict)
        or set(state["state"]) != {"state", "inc"}
        or not all(_is_int(v) and 0 <= v < 1 << 128 for v in state["state"].values())
        or state["has_uint32"] not in (0, 1)
        or not _is_int(state["has_uint32"])
        or not (_is_int(state["uinteger"]) and 0 <= state["uinteger"] < 1 << 32)
    ):
        raise bad(must)
    try:
        np.random.PCG64().state = state
    except (ValueError, TypeError, KeyError, OverflowError):
        raise bad(must) from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _kinds(kinds: str) -> str:
    names = {"f": "floating point", "i": "integer", "u": "unsigned integer", "U": "a string"}
    return " or ".join(names.get(k, k) for k in kinds)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# -- checkpoints of training runs: what they record, and what starting from one requires ----------


def training_meta(config: dict[str, Any], corpus: Any, corpus_meta: dict[str, Any]) -> dict[str, Any]:
    """The part of a training checkpoint's metadata that stays the same for the whole run."""
    from charrnn import __version__

    meta = RunMeta(
        charrnn_version=__version__,
        config=config,
        vocab=list(corpus.vocab),
        encoding=corpus.encoding,
        corpus=corpus_meta,
        step=0,
    )
    return _jsonable(dataclasses.asdict(meta))


def run_meta(static: Mapping[str, Any], **progress: Any) -> dict[str, Any]:
    """A checkpoint's metadata: the run's `training_meta` with where it stands now (`step`, ...).

    Built through `RunMeta`, so a key that the description lacks is a bug found at the first save.
    """
    return _jsonable(dataclasses.asdict(RunMeta(**{**static, **progress})))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def load_params(model: Any, saved: Checkpoint, path: str | Path) -> None:
    """Copy checkpoint arrays into the model's own arrays (names, shapes and finiteness must agree).

    Everything is checked before the first copy, so a mismatch leaves the model untouched.
    """
    if set(saved.params) != set(model.params):
        raise CheckpointError(
            f"checkpoint {path} has parameters {sorted(saved.params)}, the model expects {sorted(model.params)}"
        )
    for name, value in saved.params.items():
        if value.shape != model.params[name].shape:
            raise CheckpointError(
                f"checkpoint {path}: parameter {name} has shape {value.shape}, expected {model.params[name].shape}"
            )
        if value.dtype.kind != "f" or not np.isfinite(value).all():
            raise CheckpointError(
                f"checkpoint {path}: parameter {name} must hold finite floating-point numbers"
            )
    for name, value in saved.params.items():
        model.params[name][...] = value


def vocabulary_for_init(corpus: Any, path: str) -> Any:
    """`train.init_from`: the corpus encoded with the checkpoint's vocabulary (it may use a subset)."""
    meta = read_meta(path)
    encoding = meta.get("encoding", "utf-8")
    if encoding != corpus.encoding:
        raise CheckpointError(
            f"train.init_from: {path} was trained with encoding {encoding!r}, the corpus uses "
            f"{corpus.encoding!r}; fine-tuning needs the same encoding"
        )
    try:
        return corpus.with_vocab(meta["vocab"])
    except CorpusError as exc:
        raise CheckpointError(
            f"train.init_from: the vocabulary of {path} differs from the corpus's: {exc}; "
            "fine-tuning needs every character of the corpus in it (encoding: bytes for both shares one)"
        ) from None


def check_init_from(meta: dict[str, Any], config: dict[str, Any], corpus: Any, path: str) -> None:
    """`train.init_from` starts a new run from a checkpoint's weights: same model type and vocabulary
    (the corpus was encoded with the checkpoint's, see `vocabulary_for_init`)."""
    if meta["vocab"] != corpus.vocab or meta.get("encoding", "utf-8") != corpus.encoding:
        raise CheckpointError(f"train.init_from: the vocabulary of {path} changed while reading it")
    old_type = meta["config"]["model"]["type"]
    if old_type != config["model"]["type"]:
        raise CheckpointError(
            f"train.init_from: {path} holds a {old_type!r} model, the pipeline builds {config['model']['type']!r}"
        )


def check_resume(meta: dict[str, Any], config: dict[str, Any], corpus: Any, digest: str, path: str) -> None:
    """Resuming continues the same run: model, batch layout, optimizer, vocabulary and text.

    Of the optimizer's options only `lr` may change: the others shape the state being restored.
    """
    t, old = config["train"], meta["config"]
    for key in ("data_position", "rng"):
        if meta.get(key) is None:
            raise CheckpointError(f"cannot resume: checkpoint {path} has no {key} in its metadata")
    if t["steps"] is not None and t["steps"] <= meta["step"]:
        raise ConfigError(
            f"train.steps ({t['steps']}) must be beyond the checkpoint's step ({meta['step']}) to resume"
        )
    for section, keys in (("model", None), ("train", ("batch_size", "seq_length")), ("optimizer", None)):
        every = set(old[section]) | set(config[section])
        for key in keys or sorted(every, key=lambda k: (k != "type", k)):  # a new type says so first
            if section == "optimizer" and key == "lr":
                continue  # the one option that may change: it shapes no state
            a, b = old[section].get(key), config[section].get(key)
            if a != b:
                raise CheckpointError(
                    f"cannot resume: {section}.{key} is {b!r} but the checkpoint {path} was trained with {a!r}"
                    + (" (of the optimizer's options only lr may change)" if section == "optimizer" else "")
                )
    if meta["vocab"] != corpus.vocab or meta.get("encoding", "utf-8") != corpus.encoding:
        raise CheckpointError(f"cannot resume: the corpus vocabulary differs from the checkpoint {path}'s")
    if meta.get("corpus", {}).get("train_sha256") != digest:
        raise CheckpointError(f"cannot resume: the training text differs from the one checkpoint {path} used")
