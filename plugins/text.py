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
        text = file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorpusError(f"corpus file {path} is not valid UTF-8 (byte {exc.start}: {exc.reason})") from None
    except OSError as exc:
        raise CorpusError(f"cannot read corpus file {path}: {exc.strerror}") from None
    if text.startswith("\ufeff"):
        text = text[1:]  # a byte-order mark is not part of the text
    return Corpus.from_text(text, source=str(file))


@hookimpl
def charrnn_corpus_loader(register):
    register("text", load_text)
