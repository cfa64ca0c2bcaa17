"""Shared by the file-based corpus loaders (`text`, `files`, `url`): encodings, streaming encoding,
the cache folder and the memory-mapped ids cache.

Cache folder: `$CHARRNN_CACHE`, else `$XDG_CACHE_HOME/charrnn`, else `~/.cache/charrnn`. Downloads go
to `downloads/`, encoded corpora to `corpora/`; deleting the folder is always safe.

With `cache: true` a loader keeps the encoded ids in `corpora/<name>-<source>-<stamp>.npy` (vocabulary
and metadata in the `.json` beside it) and returns them memory-mapped, so a corpus larger than RAM
trains in bounded memory. `<source>` hashes what is read and how (resolved path or glob, encoding,
separator, errors); `<stamp>` hashes every file's path, size and mtime_ns, so editing, replacing, adding
or removing a file rebuilds the cache and deletes the stale one (a rewrite that keeps the size within the
file system's timestamp resolution goes unnoticed). A cache that fails to load is rebuilt. Building
reads the files twice in chunks (vocabulary, then ids appended to the `.npy` with plain writes, which,
unlike writes through a memory map, do not count towards the process's resident memory).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, BinaryIO, Literal

import numpy as np

from charrnn import Corpus, CorpusError
from charrnn.encoding import NotUTF8, ids_dtype, lookup, mark
from charrnn.files import atomic_write
from charrnn.textfile import CHUNK_SIZE, byte_codes, check_regular, utf8_codes

ENCODINGS = ("utf-8", "bytes")
#: the options the builtin loaders share, described once (see `charrnn.options`)
Encoding = Annotated[
    Literal["utf-8", "bytes"],
    "utf-8: the text's own characters; bytes: the 256 byte values, so any file loads",
]
Cache = Annotated[bool, "keep the encoded ids in the cache folder, memory-mapped (corpora larger than RAM)"]
FORMAT = "charrnn-ids-1"  # change when the cache layout or the encoding rules change
BYTE_VOCAB = tuple(chr(i) for i in range(256))


def cache_dir(*parts: str) -> Path:
    """The cache folder (or a subfolder of it), created if needed."""
    root = os.environ.get("CHARRNN_CACHE") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "charrnn"
    )
    path = Path(root).expanduser().joinpath(*parts)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CorpusError(
            f"cannot create the cache folder {path}: {exc.strerror} (set CHARRNN_CACHE to a writable folder)"
        ) from None
    return path


def read_file(path: Path, *, source: str, encoding: str, cache: bool = False) -> Corpus:
    """One file as a Corpus, in memory or (`cache`) memory-mapped; errors name it as `source`."""
    check_regular(path)  # before opening: a FIFO or a device would block or never end
    try:
        if cache:
            identity = {"path": str(path.resolve())}
            return cached_corpus([path], source=source, encoding=encoding, identity=identity)
        if encoding == "bytes":
            return Corpus(np.fromfile(path, dtype=np.uint8), list(BYTE_VOCAB), source, "bytes")
        return encode_files([path], source=source, encoding=encoding)
    except NotUTF8 as exc:
        raise NotUTF8(source, exc.detail) from None
    except OSError as exc:
        raise CorpusError(f"cannot read corpus file {source}: {exc.strerror}") from None


# -- streaming (the reading itself is `charrnn.textfile`'s) ---------------------------------


@dataclass
class Plan:
    """What pass one found: the files to read in order, the vocabulary and the total length."""

    files: list[Path]
    separator: np.ndarray  # (S,) code points (or bytes) put between files
    vocab: list[str]
    lut: np.ndarray  # code point -> id
    count: int
    encoding: str
    skipped: list[Path]


def scan(
    files: Sequence[Path],
    *,
    encoding: str,
    separator: str = "",
    errors: str = "strict",
    chunk_size: int = CHUNK_SIZE,
) -> Plan:
    """Pass one: the vocabulary and length of the files joined by `separator`, in bounded memory.

    `errors="skip"` leaves out files that are not valid UTF-8 instead of raising.
    """
    if encoding == "bytes":
        sep = np.frombuffer(separator.encode("utf-8"), dtype=np.uint8)
        try:
            total = sum(os.path.getsize(p) for p in files)
        except OSError as exc:
            raise CorpusError(f"cannot read corpus file {exc.filename}: {exc.strerror}") from None
        count = total + len(sep) * max(len(files) - 1, 0)
        lut = np.arange(256, dtype=np.uint8)
        return Plan(list(files), sep, list(BYTE_VOCAB), lut, count, encoding, [])
    sep = np.frombuffer(separator.encode("utf-32-le"), dtype=np.uint32)
    seen = np.zeros(0x80, dtype=bool)  # code point -> present
    kept, skipped, count = [], [], 0
    for path in files:
        mine, n = np.zeros(0x80, dtype=bool), 0
        try:
            for codes in utf8_codes(path, chunk_size):
                mine = mark(mine, codes)
                n += len(codes)
        except NotUTF8:
            if errors != "skip":
                raise
            skipped.append(path)
            continue
        seen = mark(seen, np.flatnonzero(mine))
        kept.append(path)
        count += n
    if files and not kept:
        raise CorpusError(
            f"none of the {len(files)} corpus files is valid UTF-8 ({_names(skipped)}); "
            "encoding: bytes reads any file"
        )
    if len(kept) > 1:
        seen = mark(seen, sep)
        count += len(sep) * (len(kept) - 1)
    else:
        sep = sep[:0]  # never written, so not in the vocabulary: nothing to look up
    vocab, lut = lookup(seen)
    return Plan(kept, sep, vocab, lut, count, encoding, skipped)


def ids_chunks(plan: Plan, chunk_size: int = CHUNK_SIZE) -> Iterator[np.ndarray]:
    """Pass two: the ids of the joined files, chunk by chunk, in the dtype of `plan.lut`."""
    read = byte_codes if plan.encoding == "bytes" else utf8_codes
    sep = plan.lut[plan.separator]
    for i, path in enumerate(plan.files):
        if i and len(sep):
            yield sep
        for codes in read(path, chunk_size):
            if int(codes.max()) >= len(plan.lut):
                raise CorpusError(f"corpus file {path} changed while being read; try again")
            yield np.take(plan.lut, codes)


def _fill(plan: Plan, chunks: Iterator[np.ndarray], write: Callable[[int, np.ndarray], Any]) -> None:
    """Hand each chunk of ids to `write(offset, ids)`, checking that they add up to `plan.count`."""
    changed = CorpusError(f"corpus file(s) {_names(plan.files)} changed while being read; try again")
    n = 0
    for ids in chunks:
        if n + len(ids) > plan.count:
            raise changed
        write(n, ids)
        n += len(ids)
    if n != plan.count:
        raise changed


def _names(files: Sequence[Path], most: int = 3) -> str:
    names = ", ".join(str(p) for p in files[:most])
    return names + (f" and {len(files) - most} more" if len(files) > most else "")


def _warn_skipped(source: str, skipped: Sequence[Any], total: int) -> None:
    if skipped:
        warnings.warn(
            f"corpus {source}: skipped {len(skipped)} of {total} files that are not valid UTF-8: "
            f"{_names([Path(p) for p in skipped])}",
            stacklevel=2,
        )


def encode_files(
    files: Sequence[Path],
    *,
    source: str,
    encoding: str,
    separator: str = "",
    errors: str = "strict",
    chunk_size: int = CHUNK_SIZE,
) -> Corpus:
    """The files joined by `separator` as one in-memory Corpus; memory: the ids plus a few chunks."""
    plan = scan(files, encoding=encoding, separator=separator, errors=errors, chunk_size=chunk_size)
    _warn_skipped(source, plan.skipped, len(files))
    ids = np.empty(plan.count, dtype=plan.lut.dtype)

    def write(at: int, chunk: np.ndarray) -> None:
        ids[at : at + len(chunk)] = chunk

    _fill(plan, ids_chunks(plan, chunk_size), write)
    return Corpus(ids, plan.vocab, source, encoding)


# -- the ids cache --------------------------------------------------------------------------


def cached_corpus(
    files: Sequence[Path],
    *,
    source: str,
    encoding: str,
    identity: dict[str, Any],
    separator: str = "",
    errors: str = "strict",
    chunk_size: int = CHUNK_SIZE,
) -> Corpus:
    """The files joined by `separator`, encoded once into the cache and returned memory-mapped.

    `identity` names the source independently of its contents (a resolved path, a glob); the
    cache is reused while every file keeps its path, size and mtime_ns.
    """
    try:
        stamp = [[str(p), st.st_size, st.st_mtime_ns] for p in files for st in [os.stat(p)]]
    except OSError as exc:
        raise CorpusError(f"cannot read corpus file {exc.filename}: {exc.strerror}") from None
    what = {**identity, "encoding": encoding, "separator": separator, "errors": errors, "format": FORMAT}
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", files[0].stem if files else "corpus")[:40]
    prefix = f"{stem}-{_digest(what)}-"
    folder = cache_dir("corpora")
    npy, meta_path = folder / f"{prefix}{_digest(stamp)}.npy", folder / f"{prefix}{_digest(stamp)}.json"
    found = _open_cached(npy, meta_path, source)
    if found is None:
        plan = scan(files, encoding=encoding, separator=separator, errors=errors, chunk_size=chunk_size)
        if plan.count == 0:  # nothing to map; the pipeline reports the empty corpus
            return Corpus(np.zeros(0, np.uint8), plan.vocab, source, encoding)
        _build(plan, npy, chunk_size)
        meta = {
            "format": FORMAT,
            "source": what,
            "files": stamp,
            "encoding": encoding,
            "count": plan.count,
            "dtype": plan.lut.dtype.str,
            "vocab": plan.vocab,
            "skipped": [str(p) for p in plan.skipped],
        }
        _atomic_write(meta_path, json.dumps(meta).encode("utf-8"))
        for stale in folder.glob(f"{prefix}*"):  # the same source, before its files changed
            if stale not in (npy, meta_path):
                stale.unlink(missing_ok=True)
        found = _open_cached(npy, meta_path, source)
        if found is None:
            raise CorpusError(f"the corpus cache {npy} cannot be read back after building it")
    corpus, skipped = found
    _warn_skipped(source, skipped, len(files))
    return corpus


def _open_cached(npy: Path, meta_path: Path, source: str) -> tuple[Corpus, list[str]] | None:
    """The cached corpus and its skipped files, or None when the cache is missing or unusable."""
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        ids = np.load(npy, mmap_mode="r")
        ok = (
            meta["format"] == FORMAT
            and ids.shape == (meta["count"],)
            and ids.dtype == np.dtype(meta["dtype"])
            and ids.dtype == ids_dtype(len(meta["vocab"]))
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not ok:
        return None
    return Corpus(ids, list(meta["vocab"]), source, meta["encoding"]), meta.get("skipped", [])


def _build(plan: Plan, npy: Path, chunk_size: int) -> None:
    """Pass two into `npy`: a .npy header, then the ids appended chunk by chunk; atomic."""
    header = {"descr": np.lib.format.dtype_to_descr(plan.lut.dtype), "fortran_order": False}

    def write_to(f: BinaryIO) -> None:
        np.lib.format.write_array_header_1_0(f, {**header, "shape": (plan.count,)})
        _fill(plan, ids_chunks(plan, chunk_size), lambda at, ids: f.write(np.ascontiguousarray(ids)))

    _atomic_write(npy, write_to)


def _atomic_write(path: Path, content: bytes | Callable[[BinaryIO], None]) -> None:
    """Write `path` through `charrnn.files.atomic_write`; `content` may be a writer."""
    with atomic_write(path, "the corpus cache", CorpusError) as f:
        if isinstance(content, bytes):
            f.write(content)
        else:
            content(f)


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode("utf-8")).hexdigest()[:16]
