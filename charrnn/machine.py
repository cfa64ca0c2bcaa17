"""What this machine can do: float32 matrix-product speed at a model's own shapes, and its load.

A model's speed in chars/s says little across machines; its share of what the machine can do
says a lot. The bound used here is the matrix-product bound: a model that states the products
one training step (or one generation step) performs, as `(m, k, n, count)` meaning `count`
products of an (m, k) by a (k, n) matrix (`Model.matmul_shapes`), could at best run them back
to back at the speed this machine's BLAS reaches at exactly those shapes:

    bound (chars/s) = chars per step / sum(count * t(m, k, n))
    flops per char  = sum(2 * m * k * n * count) / chars per step

where t(m, k, n) is the best time of one float32 product of that shape, timed here as NumPy runs
it (its BLAS, its threads, operands warm in cache). Everything else a step does (nonlinearities,
the softmax, the optimizer, Python) is the distance between a model's speed and its bound.
"""

from __future__ import annotations

import functools
import os
import platform
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

Product = tuple[int, int, int, int]  # (m, k, n, count): count products (m, k) @ (k, n)


def flops(products: Iterable[Product]) -> int:
    """Floating-point operations of the products: 2 * m * k * n each (a multiply and an add)."""
    return sum(2 * m * k * n * count for m, k, n, count in products)


def time_product(m: int, k: int, n: int, seconds: float = 0.1, dtype: str = "float32") -> float:
    """Best seconds per (m, k) @ (k, n) product over short timed batches lasting about `seconds` in all.

    Batches of about a millisecond, the best one kept: on a shared machine some batches run while
    other processes hold a CPU (BLAS threads then wait on each other), and the bound is what the
    machine can do, not what it did meanwhile. A side of 1 is a vector (m = 1: vector @ matrix,
    n = 1: matrix @ vector), as a one-stream generation step computes it.
    """
    rng = np.random.default_rng(0)
    a = rng.standard_normal((m, k) if m > 1 else (k,)).astype(dtype)
    b = rng.standard_normal((k, n) if n > 1 else (k,)).astype(dtype)
    out = np.empty(np.dot(a, b).shape, dtype)  # also the warm-up: thread pool, caches
    clock = time.perf_counter
    deadline = clock() + seconds
    best, reps, batches = float("inf"), 1, 0
    while batches < 3 or clock() < deadline:
        start = clock()
        for _ in range(reps):
            np.dot(a, b, out=out)
        elapsed = clock() - start
        best = min(best, elapsed / reps)
        reps = max(1, min(reps * 2, int(1e-3 / max(best, 1e-9))))  # toward ~1 ms per batch
        batches += 1
    return best


def time_products(products: Iterable[Product], seconds: float = 1.5) -> dict[tuple[int, int, int], float]:
    """`time_product` for each distinct shape, sharing `seconds` among them."""
    shapes = sorted({(m, k, n) for m, k, n, _ in products})
    share = seconds / max(len(shapes), 1)
    return {shape: time_product(*shape, seconds=share) for shape in shapes}


def bound(
    products: Sequence[Product], chars: int, times: dict[tuple[int, int, int], float]
) -> dict[str, Any]:
    """The matrix-product bound of a step that handles `chars` characters (module docstring)."""
    seconds = sum(count * times[(m, k, n)] for m, k, n, count in products)
    total = flops(products)
    return {
        "flops_per_char": total / chars,
        "chars_per_sec": chars / seconds if seconds > 0 else None,
        "gflops": total / seconds / 1e9 if seconds > 0 else None,
        "products": [
            {
                "m": m,
                "k": k,
                "n": n,
                "count": count,
                "gflops": 2 * m * k * n / times[(m, k, n)] / 1e9,
                "share_of_time": count * times[(m, k, n)] / seconds if seconds > 0 else None,
            }
            for m, k, n, count in products
        ],
    }


def cpu_info() -> dict[str, Any]:
    """CPU model (and family/model numbers on Linux x86), CPUs in total and usable by this process."""
    info: dict[str, Any] = {"model": platform.processor() or platform.machine()}
    try:
        with open("/proc/cpuinfo") as f:
            fields = dict(
                line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines() if ":" in line
            )
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        info["model"] = fields.get("model name", info["model"])
        if "cpu family" in fields:
            info["family"], info["model_number"] = int(fields["cpu family"]), int(fields["model"])
    except (OSError, ValueError):
        pass
    info["cpus"] = os.cpu_count()
    info["usable_cpus"] = usable_cpus()
    return info


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@functools.cache
def _blas() -> Any:
    """threadpoolctl's controller of NumPy's BLAS, or None where it finds none (a BLAS it does not know)."""
    from threadpoolctl import ThreadpoolController

    libs = [lib for lib in ThreadpoolController().lib_controllers if lib.user_api == "blas"]
    libs.sort(key=lambda lib: "numpy" not in str(getattr(lib, "filepath", "")))  # NumPy's own first
    return libs[0] if libs else None


def blas_threads() -> int | None:
    """The BLAS threads NumPy's products may use now; None where threadpoolctl finds no BLAS."""
    lib = _blas()
    return None if lib is None else int(lib.get_num_threads())


def set_blas_threads(n: int) -> bool:
    """Set NumPy's BLAS threads (one ctypes call); False where threadpoolctl finds no BLAS.

    The one way charrnn sets them; how many, and when, `charrnn.threads` decides.
    """
    lib = _blas()
    if lib is None:
        return False
    lib.set_num_threads(n)
    return True


@functools.cache
def numpy_blas_name() -> str | None:
    """The BLAS NumPy was built with (`scipy-openblas`, ...), from its build info; None if unknown."""
    try:
        return str(np.show_config(mode="dicts")["Build Dependencies"]["blas"]["name"])
    except Exception:  # an older NumPy or another layout: say nothing rather than guess
        return None


def blas_info() -> dict[str, Any]:
    """NumPy's BLAS library and kernel, as threadpoolctl sees them."""
    from threadpoolctl import threadpool_info

    libs = [lib for lib in threadpool_info() if lib.get("user_api") == "blas"]
    libs.sort(key=lambda lib: "numpy" not in str(lib.get("filepath", "")))  # NumPy's own first
    if not libs:
        info: dict[str, Any] = {"note": "threadpoolctl found no BLAS library"}
        if numpy_blas_name() is not None:
            info["name"] = numpy_blas_name()
        return info
    return {k: libs[0].get(k) for k in ("internal_api", "version", "architecture", "num_threads")}


@dataclass(frozen=True)
class LoadSnapshot:
    """What `load_between` compares: wall time, busy CPU seconds of the machine and of this process."""

    wall: float
    busy: float | None  # all CPUs, all processes (/proc/stat), None where unreadable
    own: float  # this process, all its threads
    loadavg: tuple[float, float, float] | None


def load_snapshot() -> LoadSnapshot:
    busy: float | None = None
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:9]]
        busy = sum(x for i, x in enumerate(ticks) if i not in (3, 4)) / os.sysconf(
            "SC_CLK_TCK"
        )  # not idle, iowait
    except (OSError, ValueError):
        pass
    try:
        avg: tuple[float, float, float] | None = os.getloadavg()
    except OSError:
        avg = None
    t = os.times()
    return LoadSnapshot(time.perf_counter(), busy, t.user + t.system, avg)


def load_between(before: LoadSnapshot, after: LoadSnapshot) -> dict[str, Any]:
    """The load during a measurement: load averages around it, and the share of all CPUs that
    other processes used meanwhile (None where /proc/stat is unreadable)."""
    wall = after.wall - before.wall
    others = None
    if before.busy is not None and after.busy is not None and wall > 0:
        cpus = os.cpu_count() or 1
        others = max(0.0, ((after.busy - before.busy) - (after.own - before.own)) / (wall * cpus))
    return {
        "loadavg_before": before.loadavg,
        "loadavg_after": after.loadavg,
        "others_cpu_share": others,
        "own_cpu_seconds": after.own - before.own,
        "wall_seconds": wall,
    }
