"""How many BLAS threads NumPy's products use, and who decides: the one home of that policy.

The mechanism (reading and setting the count, through threadpoolctl) is `charrnn.machine`'s; the
decisions are here, and callers ask for theirs. First match wins:

1. The user: a `*_NUM_THREADS` variable (`THREAD_VARS`) is a choice charrnn never overrides.
2. The caller's role: a server runs on one thread (`for_serving`: a batched step is a small
   product, and OpenBLAS's spinning threads would take the cores its HTTP threads need); an MPI
   rank on its share of this node's cores (`for_mpi_rank`: ranks that oversubscribe the cores
   wait on each other); a sweep's trial processes on their `cpus_per_trial` (`environment`); a
   benchmark on the count NumPy started with (no chooser).
3. Training in one process: `ThreadChooser` (`for_training`), unless `CHARRNN_TUNING` turns
   `blas_threads` off. OpenBLAS's threads wait for each other inside every product; when another
   process keeps a core busy, the thread that lands there is descheduled and the others spin, so
   a two-thread product can take several times as long as a one-thread one. The chooser watches
   the step time and trains on one thread while that is faster, going back when the load ends.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Mapping

from charrnn import machine, tuning
from charrnn.loop import Callback, Loop
from charrnn.machine import blas_threads, set_blas_threads, usable_cpus
from charrnn.world import local_size

#: variables by which a user sets BLAS threads; charrnn never overrides them
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS")


def user_pinned(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the user chose a BLAS thread count through the environment."""
    return any(name in environ for name in THREAD_VARS)


def for_serving(environ: Mapping[str, str] = os.environ) -> int | None:
    """Put a server's BLAS on one thread, unless the user chose; the count set, or None."""
    if user_pinned(environ):
        return None
    return 1 if set_blas_threads(1) else None


def for_mpi_rank(environ: Mapping[str, str] = os.environ) -> int | None:
    """Give this MPI rank its share of the node's cores, unless the user chose; the count set, or None."""
    if user_pinned(environ):
        return None
    threads = max(1, usable_cpus() // local_size(environ))
    return threads if set_blas_threads(threads) else None


def for_training(log: Callable[[str], None]) -> ThreadChooser | None:
    """The chooser for a training run in this process, or None: the user chose a count, the
    `blas_threads` trick is off, BLAS is on one thread already, or threadpoolctl finds no BLAS."""
    if user_pinned() or not tuning.enabled("blas_threads"):
        return None
    threads = blas_threads()
    return ThreadChooser(threads, log=log) if threads is not None and threads > 1 else None


def environment(threads: int) -> dict[str, str]:
    """The variables that pin a child process's BLAS to `threads` (what a user's pin would be)."""
    return dict.fromkeys(THREAD_VARS, str(threads))


SHARED = 0.25  # other processes' share of all CPUs from which a first window probes one thread


class OthersLoad:
    """Other processes' share of all CPUs since the last call (Linux /proc/stat), else None."""

    def __init__(self) -> None:
        self.last = machine.load_snapshot()

    def __call__(self) -> float | None:
        now = machine.load_snapshot()
        share = machine.load_between(self.last, now)["others_cpu_share"]
        self.last = now
        return share


class ThreadChooser(Callback):
    """Trains on NumPy's BLAS threads while that is fastest, on one while the machine is shared.

    Step times are collected in windows of at least `window` seconds and `min_steps` steps; a
    window's median is its time (reports and checkpoints are outliers). A probe window on one
    thread follows a window on all threads that took more than `slower` times the best seen on
    them, or the first window when other processes used the CPUs meanwhile (shared from the
    start, "the best seen" is slow already). The probe's count stays only if it was `gain` times
    faster: a noisy host moves step times by 10-20%. On one thread, after `reprobe` windows a
    probe tries all threads again on the same terms, so training goes back to them when the
    other process ends; probes that find the machine still shared come less and less often.
    """

    def __init__(
        self,
        threads: int,
        *,
        log: Callable[[str], None] = lambda message: None,
        clock: Callable[[], float] = time.perf_counter,
        setter: Callable[[int], object] = set_blas_threads,
        window: float = 0.5,
        min_steps: int = 3,
        slower: float = 1.5,
        reprobe: int = 10,
        gain: float = 1.15,
        others: Callable[[], float | None] | None = None,
    ) -> None:
        self.many, self.log, self.clock, self.setter = threads, log, clock, setter
        self.window, self.min_steps, self.slower, self.reprobe = window, min_steps, slower, reprobe
        self.gain = gain
        self.others = others if others is not None else OthersLoad()
        self.current = threads
        self.best: dict[int, float] = {}  # fastest window median seen per thread count
        self.latest: dict[int, float] = {}
        self.probing: int | None = None  # the count a probe window left, to compare with
        self.windows_on_one = 0
        self.switches: list[tuple[int, int, int]] = []  # (step, from, to), for tests and logs
        self.windows = 0
        self.interval = reprobe  # windows on one thread before probing all threads again
        self.times: list[float] = []
        self.last = self.start = 0.0

    def on_train_begin(self, loop: Loop) -> None:
        self.last = self.start = self.clock()

    def on_step_end(self, loop: Loop) -> None:
        now = self.clock()
        self.times.append(now - self.last)
        self.last = now
        if now - self.start < self.window or len(self.times) < self.min_steps:
            return
        median = statistics.median(self.times)
        self.times.clear()
        self.start = now
        self.windows += 1
        shared = self.others()  # other processes' share of the CPUs during this window
        if self.windows > 1:  # the first window warms up (work arrays, caches): not a reference
            self._decide(median, loop.state.step, shared)

    def _decide(self, median: float, step: int, shared: float | None = None) -> None:
        n = self.current
        self.latest[n] = median
        first = n not in self.best
        self.best[n] = min(self.best.get(n, median), median)
        if self.probing is not None:  # this window measured a probe: keep the faster count
            before, self.probing = self.probing, None
            if self.latest[before] <= self.gain * median:  # not clearly faster: noise, go back
                self._set(before)
                if before == 1:  # still shared: probe less often (up to every `reprobe` * 8 windows)
                    self.interval = min(2 * self.interval, 8 * self.reprobe)
            else:
                self.interval = self.reprobe
                self.windows_on_one = 0
                self._say(step, before, median)
            return
        busy = shared is None or shared > SHARED  # unknown (no /proc/stat): assume it may be
        if n == self.many and ((first and busy) or median > self.slower * self.best[n]):
            self._probe(1)
        elif n == 1:
            self.windows_on_one += 1
            if self.windows_on_one >= self.interval:
                self.windows_on_one = 0
                self._probe(self.many)

    def _probe(self, threads: int) -> None:
        self.probing = self.current
        self._set(threads)

    def _say(self, step: int, before: int, median: float) -> None:
        self.switches.append((step, before, self.current))
        if len(self.switches) <= 3:
            self.log(
                f"step {step}: BLAS on {self.current} thread{'s' if self.current > 1 else ''} "
                f"(was {before}): {self.latest[before] / median:.1f}x faster now; another process "
                "may be using a core"
                if self.current == 1
                else f"step {step}: BLAS back on {self.current} threads ({self.latest[before] / median:.1f}x faster)"
            )

    def _set(self, threads: int) -> None:
        self.current = threads
        self.setter(threads)

    def on_train_end(self, loop: Loop) -> None:
        if self.current != self.many:
            self._set(self.many)
