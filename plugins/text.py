"""The `text` corpus loader: one text file, as UTF-8 characters or as raw bytes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from charrnn import Corpus, hookimpl
from charrnn.options import FilePath
from charrnn_plugins.cache import Cache, Encoding, read_file


def load_text(
    path: Annotated[str, FilePath(), "the text file"], encoding: Encoding = "utf-8", cache: Cache = False
) -> Corpus:
    """Read and encode the file at `path` (relative to the working directory).

    `encoding`: `utf-8` (the vocabulary is the file's sorted set of characters; a leading byte-order
    mark is dropped) or `bytes` (the 256 byte values: any file loads). `cache: true` keeps the encoded
    ids in the cache folder and memory-maps them, for corpora too large to hold in memory; the cache
    is rebuilt when the file's size or mtime changes (see `charrnn_plugins.cache`).
    """
    file = Path(path)  # not found, a folder, a FIFO or a device: `read_file` says so before opening it
    return read_file(file, source=str(file), encoding=encoding, cache=cache)


@hookimpl
def charrnn_corpus_loader(register):
    register("text", load_text)
