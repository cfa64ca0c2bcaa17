"""The `url` corpus loader: a text file downloaded once over HTTP(S), then read from the cache.

Downloads land in `downloads/` of the cache folder (see `charrnn_plugins.cache`), named after the
URL, through `charrnn.files.atomic_write`, so a partial download is never taken for the file.
A cached copy is used without touching the network; it is downloaded again only when `sha256`
names a different digest than the copy's.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import re
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Annotated, BinaryIO

import charrnn
from charrnn import Corpus, CorpusError, hookimpl
from charrnn.files import atomic_write
from charrnn.options import Check, Range
from charrnn_plugins.cache import Cache, Encoding, cache_dir, read_file

BLOCK = 1 << 20  # bytes read and hashed at a time


def load_url(
    url: Annotated[
        str,
        Check(
            lambda v: urllib.parse.urlsplit(v).scheme.lower() in ("http", "https"),
            "an http:// or https:// URL",
        ),
        "where to download the text from (once; then read from the cache folder)",
    ],
    sha256: Annotated[
        str | None,
        Check(lambda v: v is None or re.fullmatch(r"[0-9a-fA-F]{64}", v) is not None, "64 hex digits"),
        "the expected digest of the file; a download that differs is discarded",
    ] = None,
    encoding: Encoding = "utf-8",
    timeout: Annotated[
        float, Range(gt=0, le=threading.TIMEOUT_MAX), "seconds to wait for the server on each read"
    ] = 30.0,
    cache: Cache = False,
) -> Corpus:
    """Download `url` (http or https) once into the cache folder and encode it as `text` does.

    `sha256`: the expected hex digest of the file; a download that does not match is discarded and
    is an error naming both digests. `timeout`: seconds to wait for the server on each read.
    `encoding` and `cache` (memory-map the encoded ids) are as for `text`.
    """
    path = fetch(url, sha256.lower() if sha256 else None, float(timeout))
    return read_file(path, source=url, encoding=encoding, cache=cache)


def fetch(url: str, sha256: str | None = None, timeout: float = 30.0) -> Path:
    """The cached copy of `url`, downloaded first if there is none (or its digest is not `sha256`)."""
    folder = cache_dir("downloads")
    tail = Path(urllib.parse.urlsplit(url).path).name
    name = hashlib.sha256(url.encode("utf-8")).hexdigest()[:16] + "-" + re.sub(r"[^\w.-]+", "_", tail)[:60]
    path = folder / name.rstrip("-")
    have = None
    if path.is_file():
        if sha256 is None:
            return path
        have = digest_of(path)
        if have == sha256:
            return path
    note = f" (the cached copy's sha256 is {have})" if have else ""
    with atomic_write(path, f"the download of {url} to", CorpusError) as out:
        got = _download(url, out, timeout, note)
        if sha256 is not None and got != sha256:
            raise CorpusError(f"sha256 mismatch for {url}: expected {sha256}, got {got}; download discarded")
    _record(path, got)
    return path


def _download(url: str, out: BinaryIO, timeout: float, note: str) -> str:
    """Stream `url` into `out`; its sha256. Network failures are one-line CorpusErrors."""
    request = urllib.request.Request(url, headers={"User-Agent": f"charrnn/{charrnn.__version__}"})
    digest, size = hashlib.sha256(), 0
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            expected = response.headers.get("Content-Length")
            while block := response.read(BLOCK):
                out.write(block)
                digest.update(block)
                size += len(block)
    except urllib.error.HTTPError as exc:
        exc.close()
        reason = f"HTTP {exc.code} {exc.reason}"
    except urllib.error.URLError as exc:
        reason = _reason(exc.reason, timeout)
    except (OSError, http.client.HTTPException) as exc:
        reason = _reason(exc, timeout)
    else:
        if expected is None or not expected.isdigit() or int(expected) == size:
            return digest.hexdigest()
        reason = f"the connection closed after {size} of {expected} bytes"
    raise CorpusError(f"cannot download {url}: {reason}{note}")


def _reason(exc: object, timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:g} s (option timeout)"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def digest_of(path: Path) -> str:
    """The sha256 of a cached download: recorded beside it at download time, else computed."""
    record = path.with_name(path.name + ".json")
    st = path.stat()
    try:
        saved = json.loads(record.read_text(encoding="utf-8"))
        if saved["size"] == st.st_size and saved["mtime_ns"] == st.st_mtime_ns:
            return str(saved["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(BLOCK):
            digest.update(block)
    _record(path, digest.hexdigest())
    return digest.hexdigest()


def _record(path: Path, sha256: str) -> None:
    st = path.stat()
    record = {"sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    try:
        path.with_name(path.name + ".json").write_text(json.dumps(record), encoding="utf-8")
    except OSError:
        pass  # only saves re-hashing next time


@hookimpl
def charrnn_corpus_loader(register):
    register("url", load_url)
