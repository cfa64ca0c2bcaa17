"""Reading text files the one way: the corpus loaders and `evaluate.path` share it.

A file is read in chunks, as UTF-8 (a leading byte-order mark dropped) or as raw bytes, after
checking that it is a regular file: a FIFO or a device would block or never end, so it is
refused with a one-line CorpusError before it is opened.
"""

from __future__ import annotations

import codecs
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from charrnn.encoding import NotUTF8
from charrnn.encoding import utf8_codes as decode_utf8
from charrnn.errors import CorpusError

CHUNK_SIZE = 1 << 20  # bytes read at a time while streaming


def check_regular(path: str | Path, what: str = "corpus file") -> None:
    """CorpusError unless `path` is an existing regular file (symlinks followed); never opens it."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise CorpusError(f"{what} not found: {path}") from None
    except OSError as exc:
        raise CorpusError(f"cannot read {what} {path}: {exc.strerror}") from None
    if not stat.S_ISREG(mode):
        kind = (
            "a folder"
            if stat.S_ISDIR(mode)
            else "a FIFO"
            if stat.S_ISFIFO(mode)
            else "a device"
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "not a regular file"
        )
        raise CorpusError(f"{what} {path} is {kind}; a regular file is needed")


def chunks(
    path: str | Path, chunk_size: int = CHUNK_SIZE, skip_bom: bool = False, what: str = "corpus file"
) -> Iterator[tuple[int, bytes]]:
    """(offset, bytes) of a regular file, `chunk_size` at a time; the last chunk is empty."""
    check_regular(path, what)
    try:
        with open(path, "rb") as f:
            offset = 3 if skip_bom and f.read(3) == codecs.BOM_UTF8 else 0
            f.seek(offset)
            while True:
                chunk = f.read(chunk_size)
                yield offset, chunk
                if not chunk:
                    return
                offset += len(chunk)
    except OSError as exc:
        raise CorpusError(f"cannot read {what} {path}: {exc.strerror}") from None


def utf8_codes(
    path: str | Path, chunk_size: int = CHUNK_SIZE, what: str = "corpus file"
) -> Iterator[np.ndarray]:
    """Code points of a UTF-8 file, chunk by chunk (see `charrnn.encoding.utf8_codes`), BOM dropped."""
    return decode_utf8(chunks(path, chunk_size, skip_bom=True, what=what), str(path))


def byte_codes(
    path: str | Path, chunk_size: int = CHUNK_SIZE, what: str = "corpus file"
) -> Iterator[np.ndarray]:
    """The bytes of a file, chunk by chunk, as (n,) uint8."""
    for _, chunk in chunks(path, chunk_size, what=what):
        if chunk:
            yield np.frombuffer(chunk, dtype=np.uint8)


def encode_file(
    path: str | Path,
    vocab: list[str],
    encoding: str,
    what: str = "corpus file",
    chunk_size: int = CHUNK_SIZE,
) -> np.ndarray:
    """The ids (N,) of a file in an existing vocabulary, read as a loader reads it.

    `encoding` is `utf-8` (a character outside `vocab` is a CorpusError naming it) or `bytes`
    (ids are the bytes themselves).
    """
    if encoding == "bytes":
        parts = list(byte_codes(path, chunk_size, what))
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
    codes = np.fromiter((ord(ch) for ch in vocab), dtype=np.int64, count=len(vocab))
    lut = np.full(int(codes.max()) + 1 if len(codes) else 0, -1, np.int64)  # code point -> id, -1: absent
    lut[codes] = np.arange(len(vocab))
    out, parts = [], utf8_codes(path, chunk_size, what)
    while True:
        try:
            part = next(parts, None)
        except NotUTF8 as exc:
            raise NotUTF8(f"{what} {path}", exc.detail) from None
        if part is None:
            break
        part = part.astype(np.int64)
        ids = np.take(lut, np.minimum(part, len(lut) - 1)) if len(lut) else np.full(len(part), -1)
        bad = np.flatnonzero((ids < 0) | (part >= len(lut)))
        if len(bad):
            ch = chr(int(part[bad[0]]))
            raise CorpusError(
                f"{what} {path}: character {ch!r} (U+{ord(ch):04X}) is not in the model's vocabulary"
            )
        out.append(ids)
    return np.concatenate(out) if out else np.zeros(0, np.int64)
