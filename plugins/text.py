"""The `text` corpus loader: one UTF-8 text file, vocabulary = its sorted set of characters."""

from __future__ import annotations

from pathlib import Path

from charrnn import Corpus, CorpusError, hookimpl


def load_text(path: str) -> Corpus:
    """Read and encode the UTF-8 file at `path` (relative to the working directory)."""
    file = Path(path)
    if not file.exists():
        raise CorpusError(f"corpus file not found: {path}")
    if not file.is_file():
        raise CorpusError(f"corpus path is not a file: {path}")
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise CorpusError(f"cannot read corpus file {path}: {exc.strerror}") from None
    return Corpus.from_utf8(raw, source=str(file))


@hookimpl
def charrnn_corpus_loader(register):
    register("text", load_text)
