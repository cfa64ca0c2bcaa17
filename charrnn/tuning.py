"""Machine-specific speed tricks, in one place: each is on only where it was measured, and can be turned off.

A trick that pays on one CPU and BLAS kernel can cost on another, so each names the machine
classes (CPU vendor and family, and the model where it matters) on which it was measured to pay,
and is off elsewhere unless asked for. `CHARRNN_TUNING` overrides the table:

- `off` (or `0`, `none`): every trick off, on every machine (the plain NumPy path);
- `on` (or `all`): every trick on, whatever the machine (to measure a new class);
- a comma-separated list of trick names (`pad_gemv,blas_threads`): exactly those on;
- names with a minus (`-blas_threads`): the table's choice, without those.

The tricks (see README, Performance, for the measurements):

- `pad_gemv`: OpenBLAS runs a matrix-vector product on several threads only above a size
  threshold; a generation matrix just below it gets zero rows up to it, so both cores share the
  product (`padded_rows`).
- `blas_threads`: training watches its step time and moves BLAS to one thread while another
  process holds a core (`charrnn.threads.ThreadChooser`; `charrnn.threads` decides every count). It
  measures itself on every machine, so it is on everywhere.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from charrnn.errors import CharrnnError
from charrnn.machine import blas_threads, numpy_blas_name

TRICKS = ("pad_gemv", "blas_threads")

#: trick -> machine classes measured to gain: (vendor, family, model), model None for any model;
#: None for a trick that is on everywhere.
MEASURED: dict[str, set[tuple[str, int, int | None]] | None] = {
    # Zen 5 (2 cores): 12.4 -> 9.5 us per character at hidden 512. Zen 3 (EPYC 25/1): 21.9 -> 22.4
    # in one interleaved run and 30.0 -> 27.7 in another, within its host's noise: off. Zen 4 (25/17)
    # not measured.
    "pad_gemv": {("AuthenticAMD", 26, None)},
    "blas_threads": None,
}

# OpenBLAS runs a matrix-vector product on more than one thread only from this many matrix
# entries on: 115200 * GEMM_MULTITHREAD_THRESHOLD (4 unless built otherwise), interface/gemv.c.
OPENBLAS_THREADED_GEMV = 115_200 * 4


@functools.cache
def machine_class() -> tuple[str, int, int] | None:
    """(vendor, family, model) from /proc/cpuinfo on Linux x86; None elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            first = f.read().split("\n\n")[0]
        fields = {
            k.strip(): v.strip()
            for k, v in (line.split(":", 1) for line in first.splitlines() if ":" in line)
        }
        return fields["vendor_id"], int(fields["cpu family"]), int(fields["model"])
    except (OSError, KeyError, ValueError):
        return None


def _setting() -> str:
    return os.environ.get("CHARRNN_TUNING", "").strip().lower()


def enabled(trick: str) -> bool:
    """Whether `trick` is on here: `CHARRNN_TUNING` if set, else the table of measured classes."""
    if trick not in TRICKS:
        raise ValueError(f"unknown tuning trick {trick!r}; known: {', '.join(TRICKS)}")
    setting = _setting()
    if setting in ("off", "0", "none", "false", "no"):
        return False
    if setting in ("on", "all", "1", "true", "yes"):
        return True
    names = {s.strip() for s in setting.split(",") if s.strip()}
    unknown = sorted(n for n in names if n.lstrip("-") not in TRICKS)
    if unknown:
        raise CharrnnError(
            f"CHARRNN_TUNING names an unknown trick {unknown[0]!r}; use off, on, or names from "
            f"{', '.join(TRICKS)} (a leading - turns one off)"
        )
    if names and all(n.startswith("-") for n in names):
        if "-" + trick in names:
            return False
    elif names:
        return trick in names
    classes = MEASURED[trick]
    if classes is None:
        return True
    cls = machine_class()
    if cls is None:
        return False
    vendor, family, model = cls
    return any(v == vendor and f == family and m in (None, model) for v, f, m in classes)


def state() -> dict[str, Any]:
    """What `charrnn bench` reports: the machine class and which tricks are on."""
    return {
        "machine_class": machine_class(),
        "setting": _setting() or None,
        **{t: enabled(t) for t in TRICKS},
    }


# -- pad_gemv ---------------------------------------------------------------------------------


def _openblas_on_several_threads() -> bool:
    """Whether NumPy's BLAS is OpenBLAS and may use more than one thread right now."""
    if "openblas" not in (numpy_blas_name() or "").lower():
        return False
    threads = blas_threads()
    return threads is not None and threads > 1


def padded_rows(rows: int, cols: int) -> int:
    """Rows to allocate for a one-stream generation matrix of `rows` x `cols` entries (`pad_gemv`).

    Just below OpenBLAS's threshold for threading a matrix-vector product (from 60% of it on),
    zero rows up to it make OpenBLAS split the product over two cores, each reading its part
    from its own L2 cache; further below, the extra rows cost more than a second core gives.
    """
    n = rows * cols
    if not 0.6 * OPENBLAS_THREADED_GEMV <= n < OPENBLAS_THREADED_GEMV:
        return rows
    if not enabled("pad_gemv") or not _openblas_on_several_threads():
        return rows
    return -(-OPENBLAS_THREADED_GEMV // cols)
