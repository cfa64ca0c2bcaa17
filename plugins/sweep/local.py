"""The local backend: each trial as a `python -m charrnn run` process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any, TextIO

from .file import Sweep, Trial
from .results import _metrics
from .trials import _sets, _value, run_overrides


def run_local(sweep: Sweep, trials: list[Trial], done: dict[str, Trial], err: TextIO) -> bool:
    """Each trial as `python -m charrnn run`, at most `max_concurrent` at once; True if interrupted.

    Children run in their own process group: a Ctrl+C here is forwarded to them once (each
    stops after its step and saves), a second one again (each saves and exits at once).
    """
    slots = sweep.max_concurrent or max(1, (os.cpu_count() or 1) // max(1, int(sweep.cpus_per_trial)))
    threads = str(max(1, int(sweep.cpus_per_trial)))
    env = {
        **os.environ,
        "OMP_NUM_THREADS": threads,
        "OPENBLAS_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
    }
    queue = [t for t in trials if t.id not in done]
    for t in trials:
        if t.id in done:
            t.status, t.seconds = done[t.id].status, done[t.id].seconds
    running: dict[str, tuple[Trial, subprocess.Popen[bytes], float, Any]] = {}
    interrupts = [0]

    def forward(signum: int, frame: object) -> None:
        interrupts[0] += 1
        for _, proc, _, _ in running.values():
            if proc.poll() is None:
                try:
                    proc.send_signal(signal.SIGINT)
                except OSError:
                    pass

    previous = signal.signal(signal.SIGINT, forward)
    try:
        while queue or running:
            while queue and len(running) < slots and not interrupts[0]:
                trial = queue.pop(0)
                folder = trial.folder(sweep)
                folder.mkdir(parents=True, exist_ok=True)
                args = [sys.executable, "-m", "charrnn", "run", sweep.pipeline]
                for key, value in run_overrides(sweep, trial, sweep.interval).items():
                    args += ["--set", f"{key}={_value(value)}"]
                log = open(folder / "train.log", "ab")  # noqa: SIM115 - closed when the trial ends
                log.write(f"$ {' '.join(args)}\n".encode())
                log.flush()
                proc = subprocess.Popen(
                    args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
                )
                running[trial.id] = (trial, proc, time.monotonic(), log)
                err.write(f"trial {trial.id} started: {_sets(trial.values) or '(no searched keys)'}\n")
            if interrupts[0]:
                queue.clear()
            time.sleep(0.05)
            for tid, (trial, proc, began, log) in list(running.items()):
                code = proc.poll()
                if code is None:
                    continue
                log.close()
                del running[tid]
                trial.seconds += time.monotonic() - began
                finish_local(sweep, trial, code, bool(interrupts[0]))
                err.write(
                    f"trial {trial.id} {trial.status}" + (f": {trial.error}" if trial.error else "") + "\n"
                )
    finally:
        signal.signal(signal.SIGINT, previous)
        for _, proc, _, log in running.values():  # only after an exception of our own
            proc.kill()
            proc.wait()
            log.close()
    return bool(interrupts[0])


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
