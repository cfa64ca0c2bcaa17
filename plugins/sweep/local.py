"""The local backend: each trial as a `python -m charrnn run` process.

The trials die with the sweep. Each runs in a process group of its own, so a signal reaches
its whole group and nothing else; Ctrl+C and SIGTERM here are passed on to every running trial
(each saves and stops) and the sweep then writes its results. On Linux a trial also gets
SIGTERM from the kernel when the sweep ends in any other way (SIGKILL included), so it saves
and stops rather than train on as an orphan. Each trial's folder is locked while its process
lives (the lock is passed to it), so a trial never runs twice at once.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import BinaryIO, NamedTuple, TextIO

from charrnn import threads
from charrnn.errors import ConfigError

from . import locks
from .file import Sweep, Trial
from .results import _metrics, record, row
from .trials import _sets, _value, finished_at, run_overrides

#: seconds a trial gets to save and end after SIGTERM when the sweep itself fails
GRACE = 10.0
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class Running(NamedTuple):
    """A trial's process, when it started, its log and the lock on its folder (which it inherits)."""

    trial: Trial
    proc: subprocess.Popen[bytes]
    began: float
    log: BinaryIO
    lock: int


def run_local(sweep: Sweep, trials: list[Trial], done: dict[str, Trial], err: TextIO) -> int:
    """Each trial as `python -m charrnn run`, at most `max_concurrent` at once.

    Returns 0, or the exit status of the signal that stopped the sweep (130 for Ctrl+C, 143
    for SIGTERM). A first Ctrl+C is forwarded to the trials once (each stops after its step
    and saves), a second one again (each saves and exits at once); SIGTERM is forwarded as
    SIGTERM (each saves and exits at once).
    """
    slots = sweep.max_concurrent or max(1, (os.cpu_count() or 1) // max(1, int(sweep.cpus_per_trial)))
    env = {**os.environ, **threads.environment(max(1, int(sweep.cpus_per_trial)))}
    for t in trials:
        if t.id in done:
            t.status, t.seconds = done[t.id].status, done[t.id].seconds
    queue = [t for t in trials if t.id not in done and not _finished_before(sweep, t, err)]
    _wait_for_orphans(sweep, queue, err)
    running: dict[str, Running] = {}
    stopped = [0]  # the exit status of the signal that stopped the sweep (0: none yet)

    def forward(signum: int, frame: object) -> None:
        stopped[0] = 143 if signum == signal.SIGTERM or stopped[0] == 143 else 130
        for r in running.values():
            _signal_group(r.proc, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    preexec = _die_with_sweep()
    try:
        while queue or running:
            while queue and len(running) < slots and not stopped[0]:
                trial = queue.pop(0)
                started = _start(sweep, trial, env, preexec, err)
                if started is None:
                    record(sweep, row(sweep, trial), err)
                    err.write(f"trial {trial.id} {trial.status}: {trial.error}\n")
                    continue
                running[trial.id] = started
                if stopped[0]:  # a signal came while it started
                    _signal_group(started.proc, signal.SIGTERM if stopped[0] == 143 else signal.SIGINT)
            if stopped[0]:
                queue.clear()
            time.sleep(0.05)
            for tid, (trial, proc, began, log, lock) in list(running.items()):
                code = proc.poll()
                if code is None:
                    continue
                log.close()
                del running[tid]
                trial.seconds += time.monotonic() - began
                finish_local(sweep, trial, code, bool(stopped[0]))
                locks.release(lock)  # its process has ended: the trial may run again
                record(sweep, row(sweep, trial), err)
                err.write(
                    f"trial {trial.id} {trial.status}" + (f": {trial.error}" if trial.error else "") + "\n"
                )
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _stop_all(running)  # only after an exception of our own: the trials save and end with us
    return stopped[0]


def _start(
    sweep: Sweep, trial: Trial, env: dict[str, str], preexec: Callable[[], None] | None, err: TextIO
) -> Running | None:
    """Launch one trial, holding its folder's lock, which the trial's process inherits.

    None if another process holds the lock: one nobody here started runs that trial, so it is
    left alone and the trial is an error that says so.
    """
    folder = trial.folder(sweep)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = locks.take(folder / ".lock")
        if lock is None:
            trial.status = "error"
            trial.error = (
                f"error: trial {trial.id} is already running in process {locks.holder(folder / '.lock')}, "
                "which this sweep did not start; stop it, then --resume"
            )
            return None
        log = open(folder / "train.log", "ab")  # noqa: SIM115 - closed when the trial ends
    except OSError as exc:
        raise ConfigError(f"cannot write trial {trial.id}'s folder {folder}: {exc.strerror or exc}") from None
    args = [sys.executable, "-m", "charrnn", "run", sweep.pipeline]
    for key, value in run_overrides(sweep, trial, sweep.interval).items():
        args += ["--set", f"{key}={_value(value)}"]
    log.write(f"$ {' '.join(args)}\n".encode())
    log.flush()
    try:
        proc = subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own process group: a Ctrl+C at the terminal reaches the sweep only
            pass_fds=(lock,),
            preexec_fn=preexec,  # safe here: the sweep's process runs no other Python threads
        )
    except OSError as exc:
        log.close()
        locks.release(lock)
        raise ConfigError(f"cannot start trial {trial.id}: {exc.strerror or exc}") from None
    locks.name(lock, proc.pid)
    err.write(f"trial {trial.id} started: {_sets(trial.values) or '(no searched keys)'}\n")
    return Running(trial, proc, time.monotonic(), log, lock)


def _finished_before(sweep: Sweep, trial: Trial, err: TextIO) -> bool:
    """A trial whose checkpoint reached train.steps finished before a kill lost its row: keep it."""
    meta = finished_at(sweep, trial)
    if meta is None:
        return False
    trial.status = "done"
    trial.seconds = float(meta.get("elapsed_seconds") or 0.0)
    record(sweep, row(sweep, trial), err)
    err.write(
        f"trial {trial.id} done (its checkpoint reached step {meta['step']} before the sweep stopped)\n"
    )
    return True


def _wait_for_orphans(sweep: Sweep, queue: list[Trial], err: TextIO) -> None:
    """Wait (a while) for trials still running from a sweep that was killed: they are saving and ending."""
    for trial in queue:
        path = trial.folder(sweep) / ".lock"
        if not path.exists():
            continue
        lock = locks.take(path)
        if lock is None:
            err.write(f"trial {trial.id}: waiting for its process {locks.holder(path)} from before to end\n")
            err.flush()
            lock = locks.take(path, wait=locks.ORPHAN_WAIT)
        if lock is None:
            raise ConfigError(
                f"trial {trial.id} is still running in process {locks.holder(path)} from an earlier sweep; "
                "stop it, then --resume"
            )
        locks.release(lock)


def _signal_group(proc: subprocess.Popen[bytes], signum: int) -> None:
    if proc.poll() is None:
        with contextlib.suppress(OSError):  # it ended meanwhile
            os.killpg(proc.pid, signum)


def _stop_all(running: dict[str, Running]) -> None:
    """SIGTERM to every running trial's group (each saves), SIGKILL after GRACE seconds."""
    for r in running.values():
        _signal_group(r.proc, signal.SIGTERM)
    end = time.monotonic() + GRACE
    for r in running.values():
        try:
            r.proc.wait(timeout=max(0.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(r.proc, signal.SIGKILL)
            r.proc.wait()
        r.log.close()
        locks.release(r.lock)


def _die_with_sweep() -> Callable[[], None] | None:
    """On Linux, what the trial's process runs before `charrnn run`: SIGTERM to it when the sweep dies."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child only calls it
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the sweep died before the line above
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def finish_local(sweep: Sweep, trial: Trial, code: int, interrupted: bool) -> None:
    """The trial's status from its exit status and how far its metrics file got."""
    records = _metrics(sweep, trial)
    steps = records[-1]["step"] if records else 0
    if code in (130, 143) or (code == 0 and interrupted and steps < sweep.steps):
        trial.status = "interrupted"
    elif code == 0:
        trial.status = "done" if steps >= sweep.steps else "stopped early"
    else:
        trial.status = "error"
        lines = (trial.folder(sweep) / "train.log").read_text(encoding="utf-8", errors="replace").splitlines()
        errors = [line for line in lines if line.startswith("error:")]
        trial.error = errors[-1] if errors else f"exit status {code}: see {trial.folder(sweep) / 'train.log'}"
