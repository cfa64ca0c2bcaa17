"""The `files` corpus loader: every file a glob matches, in sorted order, joined by a separator."""

from __future__ import annotations

import os
from glob import escape
from glob import glob as expand
from pathlib import Path
from typing import Annotated, Literal

from charrnn import Corpus, CorpusError, hookimpl
from charrnn.options import FilePath
from charrnn_plugins.cache import Cache, Encoding, NotUTF8, cached_corpus, encode_files


def load_files(
    glob: Annotated[str, FilePath(), "the files to read, e.g. src/**/*.py (** spans folders); a folder: all"],
    separator: Annotated[str, "put between two files' texts"] = "\n\n",
    encoding: Encoding = "utf-8",
    errors: Annotated[
        Literal["strict", "skip"], "strict: a file that is not UTF-8 is an error; skip: leave it out"
    ] = "strict",
    cache: Cache = False,
) -> Corpus:
    """The files matching `glob` (e.g. `src/**/*.py`; `**` spans folders), joined by `separator`.

    A folder path means every file under it (`folder/**/*`). Files are read in the order of their
    paths as strings; wildcards skip names that start with a dot (`.git`, `.venv`) unless the
    pattern spells the dot. `encoding` is `utf-8` or `bytes` as for `text`. `errors`: `strict`
    (a file that is not valid UTF-8 is an error naming it) or `skip` (leave such files out, with a
    warning that names them). `cache: true` memory-maps the encoded ids as for `text`; the cache is
    rebuilt when a file is added, removed or changed.
    """
    pattern = os.path.join(escape(glob), "**", "*") if os.path.isdir(glob) else glob
    found = sorted(p for p in expand(pattern, recursive=True) if os.path.isfile(p))
    if not found:
        raise CorpusError(f"corpus glob {glob!r} matches no file")
    files = [Path(p) for p in found]
    options = {"source": glob, "encoding": encoding, "separator": separator, "errors": errors}
    try:
        if cache:
            return cached_corpus(files, identity={"glob": os.path.abspath(pattern)}, **options)
        return encode_files(files, **options)
    except NotUTF8 as exc:
        raise CorpusError(
            f"{exc}; `errors: skip` leaves such files out, `encoding: bytes` reads them"
        ) from None


@hookimpl
def charrnn_corpus_loader(register):
    register("files", load_files)
