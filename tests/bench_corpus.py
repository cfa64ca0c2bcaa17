"""Time and memory of loading a large corpus: in memory vs. the memory-mapped ids cache.

Run as `python tests/bench_corpus.py [SIZE_MB]` (default 200; not collected by pytest). Builds a
SIZE_MB corpus by repeating tiny-shakespeare in a temporary folder and measures each step in a
fresh subprocess (best of 3): peak RSS is `ru_maxrss`; "private" is the peak of `RssAnon` (memory that must
fit in RAM), sampled while reading. Pages of a memory-mapped file count towards RSS once read but
are page cache the kernel drops under memory pressure; the last row shows RSS when the reader
releases them itself.
"""

from __future__ import annotations

import json
import mmap
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SHAKESPEARE = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "tinyshakespeare.txt"
MiB = 1 << 20
SLICE = 1 << 20  # ids read per slice in the pass over the corpus


def peak_rss() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / MiB if sys.platform == "darwin" else kb / 1024  # bytes on macOS, KiB elsewhere


def private_mib() -> float | None:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("RssAnon:"))
    except (OSError, StopIteration):
        return None


def child(mode: str, path: str) -> dict[str, Any]:
    """One measurement; runs in its own process."""
    import numpy as np

    from charrnn import Corpus
    from charrnn_plugins.text import load_text

    base = peak_rss()
    t0 = time.perf_counter()
    if mode == "text":
        corpus = load_text(path)
    elif mode == "bytes":
        corpus = load_text(path, encoding="bytes")
    elif mode == "from_utf8":
        corpus = Corpus.from_utf8(Path(path).read_bytes())
    else:
        corpus = load_text(path, cache=True)
    seconds = time.perf_counter() - t0
    result = {"seconds": seconds, "rss": peak_rss(), "private": None, "base": base}
    result.update(chars=len(corpus.ids), vocab=len(corpus.vocab), nbytes=corpus.ids.nbytes)
    if mode.startswith("pass"):
        ids, counts, top = corpus.ids, np.zeros(len(corpus.vocab), np.int64), private_mib() or 0.0
        released = 0
        t0 = time.perf_counter()
        for i in range(0, len(ids), SLICE):
            counts += np.bincount(ids[i : i + SLICE], minlength=len(counts))  # a training read
            top = max(top, private_mib() or 0.0)
            if mode == "pass-release" and i + SLICE - released >= 64 * MiB:
                released = release(ids, i + SLICE)
        assert counts.sum() == len(ids)
        result.update(seconds=time.perf_counter() - t0, rss=peak_rss(), private=top, load=seconds)
    return result


def release(ids: object, upto: int) -> int:
    """Drop the mapped pages of `ids[:upto]` from this process (they stay in the page cache)."""
    m = ids._mmap  # type: ignore[attr-defined]  # numpy.memmap's mapping; bench only
    skip = ids.offset % mmap.ALLOCATIONGRANULARITY  # type: ignore[attr-defined]
    end = (skip + upto) // mmap.PAGESIZE * mmap.PAGESIZE
    m.madvise(mmap.MADV_DONTNEED, 0, end)
    return upto


def run(mode: str, path: Path, env: dict[str, str], repeat: int = 3) -> dict[str, Any]:
    """The fastest of `repeat` runs, each in a fresh process (a build starts from an empty cache)."""
    results = []
    for _ in range(repeat):
        if mode == "build":
            shutil.rmtree(env["CHARRNN_CACHE"], ignore_errors=True)
        out = subprocess.run(
            [sys.executable, __file__, "--child", mode, str(path)], env=env, capture_output=True, text=True
        )
        if out.returncode:
            sys.exit(f"{mode} failed:\n{out.stderr}")
        results.append(json.loads(out.stdout))
    return min(results, key=lambda r: r["seconds"] + r.get("load", 0.0))


def main(argv: list[str]) -> int:
    if argv[:1] == ["--child"]:
        print(json.dumps(child(argv[1], argv[2])))
        return 0
    size_mb = int(argv[0]) if argv else 200
    if not SHAKESPEARE.exists():
        print(f"skipped: {SHAKESPEARE} not found")
        return 0
    text = SHAKESPEARE.read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        path, accented = Path(tmp) / "corpus.txt", Path(tmp) / "accented.txt"
        for file, content in ((path, text), (accented, text.decode().replace("e", "é").encode())):
            with open(file, "wb") as f:
                for _ in range(-(-size_mb * MiB // len(content))):
                    f.write(content)
        env = dict(os.environ, CHARRNN_CACHE=str(Path(tmp) / "cache"), CHARRNN_LOAD_PLUGINS="")
        size = path.stat().st_size / MiB
        steps = [
            ("text: in memory", "text", path),
            ("text: in memory, encoding bytes", "bytes", path),
            ("Corpus.from_utf8 (for comparison)", "from_utf8", path),
            ("text: in memory, 'e' -> 'é'", "text", accented),
            ("cache: build (first load)", "build", path),
            ("cache: build, 'e' -> 'é'", "build", accented),
            ("cache: load + pass over ids", "pass", path),
            ("cache: load + pass, pages released", "pass-release", path),
        ]
        results = [(label, run(mode, file, env)) for label, mode, file in steps]
        first = results[0][1]
        print(f"corpus: {size:.0f} MiB, {first['chars']:,} characters, vocabulary {first['vocab']}")
        print(f"python + numpy + charrnn alone: {first['base']:.0f} MiB RSS\n")
        print(f"| {'step':<36} | {'seconds':>11} | {'peak RSS MiB':>12} | {'private MiB':>11} |")
        print(f"| {'-' * 36} | {'-' * 10}: | {'-' * 11}: | {'-' * 10}: |")
        for label, r in results:
            seconds = f"{r['load']:.2f}+{r['seconds']:.2f}" if "load" in r else f"{r['seconds']:.2f}"
            private = "-" if r["private"] is None else f"{r['private']:.0f}"
            print(f"| {label:<36} | {seconds:>11} | {r['rss']:>12.0f} | {private:>11} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
