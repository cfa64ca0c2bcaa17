"""Encoding text as ids, in chunks: the one UTF-8 encoder behind `Corpus.from_utf8` and the loaders.

Both passes of an encoding stream: the first finds the vocabulary (`mark` each chunk's code
points, then `lookup`), the second maps each chunk through the lookup table. Memory stays near
one chunk's worth besides the ids, so a corpus larger than RAM can be encoded into a file.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Iterator

import numpy as np

from charrnn.errors import CorpusError


class NotUTF8(CorpusError):
    """A corpus is not valid UTF-8; `detail` gives the byte offset and the reason."""

    def __init__(self, name: str, detail: str) -> None:
        super().__init__(f"{name} is not valid UTF-8 ({detail})")
        self.detail = detail


def ids_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that holds ids below `vocab_size`."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dt).max + 1:
            return np.dtype(dt)
    raise CorpusError(f"vocabulary of {vocab_size} symbols is too large")


def utf8_codes(chunks: Iterable[tuple[int, bytes]], name: str) -> Iterator[np.ndarray]:
    """Code points of UTF-8 text given as (byte offset, bytes) chunks, an empty chunk last.

    Yields (n,) uint8 for an ASCII chunk (the bytes themselves, not decoded) and uint32
    otherwise. Characters split between chunks are joined; invalid UTF-8 raises `NotUTF8`
    naming `name` and the byte offset.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    for offset, chunk in chunks:
        pending = len(decoder.getstate()[0])  # bytes of a character split by the last chunk
        data = np.frombuffer(chunk, dtype=np.uint8)
        if not pending and len(data) and int(data.max()) < 0x80:
            yield data
            continue
        try:
            text = decoder.decode(chunk, final=not len(chunk))
        except UnicodeDecodeError as exc:
            raise NotUTF8(name, f"byte {offset - pending + exc.start}: {exc.reason}") from None
        if text:
            yield np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


def mark(seen: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """`seen` (a bool array by code point, grown as needed) with `codes` set."""
    if len(codes) == 0:
        return seen
    top = int(codes.max()) + 1
    if top > len(seen):
        seen = np.concatenate([seen, np.zeros(top - len(seen), dtype=bool)])
    seen[codes] = True
    return seen


def lookup(seen: np.ndarray) -> tuple[list[str], np.ndarray]:
    """The vocabulary (the seen code points, sorted) and the table code point -> id."""
    present = np.flatnonzero(seen)
    lut = np.zeros(len(seen), dtype=ids_dtype(len(present)))
    lut[present] = np.arange(len(present))
    return [chr(c) for c in present], lut
