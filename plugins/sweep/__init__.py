"""`charrnn sweep`: hyperparameter search over a pipeline, on Ray Tune or as local processes.

A sweep file names a base pipeline, fixed overrides (`set`) and the spaces to search
(`search`). Every trial is an ordinary charrnn training run with its own output folder, so
its checkpoint, best model and metrics file are the usual ones and a trial resumes like any
run. The sweep file is checked like a pipeline (unknown keys, types, ranges, with the YAML
line), and every trial's resolved pipeline is validated by building its `Assembly` before
anything trains. Ray (`charrnn[tune]`) is imported only when a sweep runs on it.

Modules: `file` (the sweep file, its spaces, drawing trials), `trials` (each trial's pipeline),
`results` (rows, ranking, best.yaml, --resume state), `locks` (one process per output and per
trial), `local` and `raytune` (the backends).

A finished trial stays finished: its row is appended to results.jsonl as it ends, and a trial
whose checkpoint reached train.steps is never trained again. Ctrl+C and SIGTERM stop the
running trials (they save), write the results and exit 130 (143 for SIGTERM).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from typing import Any, TextIO

from charrnn.commands import add_set
from charrnn.errors import ConfigError
from charrnn.hookspecs import hookimpl

from .file import SPACES, SWEEP_FILE, Space, Sweep, SweepFile, Trial, draw_trials, load_sweep, trial_id
from .local import finish_local, run_local
from .locks import release
from .raytune import OPTUNA_HINT, TUNE_HINT, run_ray
from .results import FINISHED, STATUSES, check_output, lock_sweep, ranked, row, start_state, write_results
from .trials import _sets, check_size, check_trials, resolved, run_overrides
from .trials import _value as _value  # tests and callers format values as --set reads them

__all__ = [
    "FINISHED",
    "SPACES",
    "SWEEP_FILE",
    "STATUSES",
    "Space",
    "Sweep",
    "SweepCommand",
    "SweepFile",
    "Trial",
    "check_trials",
    "draw_trials",
    "finish_local",
    "load_sweep",
    "ranked",
    "resolved",
    "row",
    "run_local",
    "run_overrides",
    "start_state",
    "sweep_command",
    "trial_id",
    "write_results",
]


def choose_backend(sweep: Sweep, err: TextIO) -> str:
    """`auto` is Ray when importable, else local processes (said once, with the install hint)."""
    have_ray = importlib.util.find_spec("ray") is not None
    backend = sweep.backend
    if backend == "auto":
        backend = "ray" if have_ray else "local"
        if not have_ray:
            err.write(f"backend: local processes (Ray Tune is not installed; {TUNE_HINT} to run on Ray)\n")
    if backend == "ray" and not have_ray:
        raise ConfigError(f"{sweep.where('backend')}: ray: Ray Tune is not installed ({TUNE_HINT})")
    if backend == "local":
        if sweep.scheduler["type"] == "asha":
            raise ConfigError(
                f"{sweep.where('scheduler')}: asha needs the ray backend ({TUNE_HINT}); "
                "the local backend runs every trial to its end (scheduler: fifo)"
            )
        if sweep.algorithm == "optuna":
            raise ConfigError(
                f"{sweep.where('algorithm')}: optuna needs the ray backend ({TUNE_HINT} {OPTUNA_HINT[12:]}); "
                "the local backend runs grid and random searches"
            )
    return backend


def dry_run(sweep: Sweep, trials: list[Trial], backend: str, out: Any) -> int:
    grid = [s for s in sweep.spaces if s.kind == "grid"]
    if sweep.algorithm == "optuna":
        out.write(f"sweep {sweep.path}: Optuna picks {sweep.samples} trials over:\n")
        for s in sweep.spaces:
            out.write(f"  {s.key}: {s.describe()}\n")
        out.write(f"checked {len(trials)} random draws of these spaces:\n")
    else:
        shape = " x ".join(str(len(s.args)) for s in grid) or "1"
        out.write(
            f"sweep {sweep.path}: {len(trials)} trials ({shape} grid points x {sweep.samples} samples)\n"
        )
    for trial in trials:
        out.write(f"trial {trial.id}: {_sets(trial.values) or '(no searched keys)'}\n")
    scheduler = sweep.scheduler["type"]
    if scheduler == "asha":
        scheduler += (
            f" (grace_period {sweep.scheduler['grace_period'] or sweep.interval}, max_t {sweep.steps})"
        )
    out.write(
        f"backend {backend}, {sweep.metric} {sweep.mode}, scheduler {scheduler}, output {sweep.output}\n"
        f"every trial's pipeline is valid; nothing was run (--dry-run)\n"
    )
    return 0


def sweep_command(args: argparse.Namespace, out: Any, err: TextIO | None = None) -> int:
    """`charrnn sweep`: check everything, run the trials on a backend, write the results."""
    err = err if err is not None else sys.stderr
    sweep = load_sweep(args.sweep, args.overrides)
    if args.backend:
        sweep.backend = args.backend
    if args.max_concurrent is not None:
        if args.max_concurrent < 1:
            raise ConfigError(f"--max-concurrent must be >= 1, got {args.max_concurrent}")
        sweep.max_concurrent = args.max_concurrent
    check_size(sweep)
    trials = draw_trials(sweep)
    check_trials(sweep, trials)
    backend = choose_backend(sweep, err)
    if args.address and backend != "ray":
        raise ConfigError("--address joins a Ray cluster: it needs the ray backend")
    check_output(sweep, create=not (args.dry_run or args.resume))
    if args.dry_run:
        return dry_run(sweep, trials, backend, out)
    lock = lock_sweep(sweep, args.resume)
    try:
        done = start_state(sweep, trials, backend, args.resume)
        err.write(
            f"sweep {sweep.path}: {len(trials) if sweep.algorithm == 'random' else sweep.samples} trials on {backend}, output {sweep.output}\n"
        )
        err.flush()
        if backend == "local":
            stopped = run_local(sweep, trials, done, err)
            ran = [t for t in trials if t.status]
        else:
            ran, stopped = run_ray(sweep, trials, done, err, args.address, args.resume)
        code = write_results(sweep, ran, err)
    finally:
        release(lock)
    if stopped:
        err.write(
            f"interrupted: results so far in {sweep.output}; charrnn sweep {args.sweep} --resume continues\n"
        )
        return stopped
    return code


class SweepCommand:
    help = "search hyperparameters: many trials of a pipeline, on Ray Tune or as local processes"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("sweep", help="the sweep YAML file")
        add_set(parser)
        parser.add_argument("--backend", choices=("auto", "ray", "local"), help="override the file's backend")
        parser.add_argument(
            "--max-concurrent", type=int, help="trials at once (default: CPUs // cpus_per_trial)"
        )
        parser.add_argument("--address", help="join this Ray cluster (ray start --head prints it)")
        parser.add_argument(
            "--resume", action="store_true", help="continue an interrupted sweep in its output"
        )
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="print the trials and validate their pipelines; run nothing",
        )

    def __call__(self, args: argparse.Namespace, out: Any) -> int:
        return sweep_command(args, out)


@hookimpl
def charrnn_command(register):
    register("sweep", SweepCommand)
