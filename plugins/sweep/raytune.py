"""The Ray backend: each trial in-process in a Ray Tune worker (imported only when a sweep runs on Ray)."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from charrnn.errors import CharrnnError, ConfigError
from charrnn.files import atomic_write
from charrnn.hookspecs import hookimpl

from . import locks
from .file import Sweep, Trial, trial_id
from .results import _metrics, read_results, record, row
from .trials import finished_at, run_overrides

TUNE_HINT = "pip install 'charrnn[tune]'"
OPTUNA_HINT = "pip install 'charrnn[optuna]'"


class TuneReporter:
    """Hands each report that carries the metric to Ray Tune (`step` is ASHA's time)."""

    def __init__(self, metric: str) -> None:
        self.metric = metric

    @hookimpl
    def charrnn_train_report(self, step: int, metrics: dict[str, Any]) -> None:
        if metrics.get(self.metric) is None:
            return
        from ray import tune

        tune.report(
            {
                "step": step,
                **{k: metrics[k] for k in ("train_loss", "val_loss") if metrics.get(k) is not None},
            }
        )


def ray_trial(config: dict[str, Any], spec: dict[str, Any]) -> None:
    """One trial in a Ray worker: back to the launch folder, then an ordinary in-process run.

    The trial's folder is locked while it runs, and a trial whose checkpoint already reached
    train.steps (it finished before a killed sweep could record it) reports its last result
    and trains nothing: a restored experiment may start it again.
    """
    from ray import tune

    os.chdir(spec["launch"])  # Ray moved us to the trial's folder; relative paths mean the user's
    sweep: Sweep = spec["sweep"]
    if "trial" in config:
        trial = Trial(config["trial"], spec["trials"][config["trial"]])
    else:  # Optuna: the values are the config; the id follows Ray's trial index
        trial = _optuna_trial(sweep, tune.get_context().get_trial_id(), config)
    folder = trial.folder(sweep)
    folder.mkdir(parents=True, exist_ok=True)
    lock = locks.take(folder / ".lock", wait=locks.ORPHAN_WAIT)
    try:
        with open(folder / "train.log", "a", encoding="utf-8") as log:
            if lock is None:
                _failed(
                    folder,
                    log,
                    f"trial {trial.id} is already running in process {locks.holder(folder / '.lock')}",
                )
                return
            meta = finished_at(sweep, trial)
            if meta is not None:
                log.write(f"step {meta['step']} reached before the sweep stopped: nothing to train\n")
                reported = [r for r in _metrics(sweep, trial) if r.get(sweep.metric) is not None]
                if reported:
                    TuneReporter(sweep.metric).charrnn_train_report(reported[-1]["step"], reported[-1])
                return
            _train(sweep, trial, folder, log)
    finally:
        locks.release(lock)


def _train(sweep: Sweep, trial: Trial, folder: Path, log: TextIO) -> None:
    from charrnn.interrupts import NoInterrupts
    from charrnn.pipeline import Pipeline

    (folder / "error.txt").unlink(missing_ok=True)
    (folder / "values.json").write_text(json.dumps(trial.values) + "\n", encoding="utf-8")
    began = time.monotonic()
    try:
        overrides = run_overrides(sweep, trial, sweep.interval)
        Pipeline(sweep.pipeline, plugins=[TuneReporter(sweep.metric)], overrides=overrides).run(
            stdout=log, stderr=log, interrupts=NoInterrupts()
        )
    except Exception as exc:  # one line for the table, as `charrnn run` would print it
        message = " ".join(str(exc).split())
        if not isinstance(exc, CharrnnError) and type(exc).__name__ != "PluginFailure":
            message = f"internal error: {type(exc).__name__}: {message}"
        _failed(folder, log, message)
    finally:
        with atomic_write(folder / "seconds.txt", "trial time", ConfigError) as f:
            f.write(f"{time.monotonic() - began}\n".encode())


def _failed(folder: Path, log: TextIO, message: str) -> None:
    log.write(f"error: {message}\n")
    (folder / "error.txt").write_text(f"error: {message}\n", encoding="utf-8")


def _optuna_trial(sweep: Sweep, ray_id: str, config: dict[str, Any]) -> Trial:
    index = str(ray_id).rsplit("_", 1)[-1]
    values = {s.key: config.get(s.key) for s in sweep.spaces}
    return Trial(trial_id(int(index)) if index.isdigit() else index, values)


def _trial_of(spec: dict[str, Any], ray_trial_: Any) -> Trial:
    config = ray_trial_.config or {}
    if "trial" in config:
        return Trial(config["trial"], spec["trials"][config["trial"]])
    return _optuna_trial(spec["sweep"], ray_trial_.trial_id, config)


def _recorder(spec: dict[str, Any]) -> Any:
    """A Tune callback that records each trial's row in results.jsonl as the trial ends.

    Tune calls it when a trial returns, fails or is stopped by the scheduler, and never for the
    trials it stops because the sweep was interrupted: so a row says how a trial really ended.
    It keeps nothing in memory, since a restored experiment brings back its own pickled copy.
    """
    from ray import tune

    class Recorder(tune.Callback):
        def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            self.record(trial, None)

        def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            self.record(trial, f"error: trial failed in Ray; see {trial.path}")

        def record(self, ray_trial_: Any, failure: str | None) -> None:
            sweep: Sweep = spec["sweep"]
            trial = _trial_of(spec, ray_trial_)
            folder = trial.folder(sweep)
            trial.seconds = read_seconds(folder / "seconds.txt")
            error = folder / "error.txt"
            if error.exists():
                trial.status, trial.error = "error", error.read_text(encoding="utf-8").strip()
            elif failure:
                trial.status, trial.error = "error", failure
            else:
                steps = row(sweep, trial)["steps"]
                trial.status = "done" if steps >= sweep.steps else "stopped early"  # by the scheduler
            record(sweep, row(sweep, trial), sys.stderr)

    return Recorder()


def run_ray(
    sweep: Sweep, trials: list[Trial], done: dict[str, Trial], err: TextIO, address: str | None, resume: bool
) -> tuple[list[Trial], int]:
    """The sweep on Ray Tune: the trials that ran (or ran before), and 0 or the exit status of the
    signal that stopped it (130 for Ctrl+C, 143 for SIGTERM, which means what Ctrl+C means)."""
    # Ray's newer console output ignores `verbose=0`; the older reporter honours it (stdout stays ours)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    try:
        import ray
        from ray import tune
    except ImportError:
        raise ConfigError(f"backend ray: Ray Tune is not installed ({TUNE_HINT})") from None
    if sweep.algorithm == "optuna" and importlib.util.find_spec("optuna") is None:
        raise ConfigError(f"algorithm: optuna needs Optuna ({OPTUNA_HINT})")
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"address": address} if address else {"include_dashboard": False}
        try:
            ray.init(log_to_driver=False, configure_logging=False, **kwargs)
        except ConnectionError as exc:  # no cluster there, or it wants a token this process lacks
            raise ConfigError(
                f"--address {address}: cannot join the Ray cluster: {exc} (is `ray start --head` running "
                "there, and is its auth token in RAY_AUTH_TOKEN?)"
            ) from None
    spec = {"launch": os.getcwd(), "sweep": sweep, "trials": {t.id: t.values for t in trials}}
    trainable = tune.with_resources(tune.with_parameters(ray_trial, spec=spec), {"cpu": sweep.cpus_per_trial})
    experiment = sweep.output / "ray"
    if resume and tune.Tuner.can_restore(str(experiment)):
        tuner = tune.Tuner.restore(
            str(experiment), trainable=trainable, resume_unfinished=True, resume_errored=True
        )
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(sweep, trials),
            tune_config=tune_config(sweep),
            run_config=tune.RunConfig(
                name="ray", storage_path=str(sweep.output), verbose=0, callbacks=[_recorder(spec)]
            ),
        )
    grid, signals = _fit(tuner)
    stopped = (143 if signal.SIGTERM in signals else 130) if signals else 0
    ids = set(spec["trials"]) if sweep.algorithm == "random" else None
    rows = read_results(sweep, ids)  # this run's ends, as the recorder wrote them, and the earlier ones
    ran: dict[str, Trial] = {}
    # ResultGrid's own source of truth: the trials with their Ray status (TERMINATED, ERROR, ...)
    for ray_trial_ in grid._experiment_analysis.trials:  # noqa: SLF001 - no public per-trial status
        trial = _trial_of(spec, ray_trial_)
        folder = trial.folder(sweep)
        trial.seconds = read_seconds(folder / "seconds.txt")
        if trial.id in rows:
            trial.status, trial.error = rows[trial.id]["status"], rows[trial.id].get("error") or ""
        elif stopped or ray_trial_.status not in ("TERMINATED", "ERROR"):
            trial.status = "interrupted"  # Tune stopped it because the sweep was: not the scheduler
        elif ray_trial_.status == "ERROR":
            trial.status, trial.error = "error", f"error: trial failed in Ray; see {ray_trial_.path}"
        else:  # ended in an earlier run whose row was lost
            trial.status = "done" if row(sweep, trial)["steps"] >= sweep.steps else "stopped early"
        ran[trial.id] = trial
    for tid, trial in done.items():  # finished earlier, not (yet) started again by this run's Tune
        ran.setdefault(tid, trial)
    planned = len(trials) if sweep.algorithm == "random" else sweep.samples
    if len(ran) < planned and not stopped:
        stopped = 130
    return sorted(ran.values(), key=lambda t: t.id), stopped


def _fit(tuner: Any) -> tuple[Any, list[int]]:
    """`tuner.fit()`, noting the signals that stopped it.

    Tune handles Ctrl+C itself (it stops the trials, saves its state and returns); it installs its
    SIGINT handler during `fit`, which is wrapped here to learn that it came. SIGTERM is handed to
    that handler: it means what Ctrl+C means.
    """
    signals: list[int] = []
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    real_signal = signal.signal

    def noting(signum: int, handler: Any) -> Any:
        if signum == signal.SIGINT and callable(handler) and handler not in (signal.default_int_handler,):
            inner = handler

            def handler(sig: int, frame: Any) -> Any:
                signals.append(sig)
                return inner(signal.SIGINT, frame)

        return real_signal(signum, handler)

    def terminate(sig: int, frame: Any) -> None:
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler):
            handler(sig, frame)
        if not signals or signals[-1] != sig:
            signals.append(sig)

    real_signal(signal.SIGTERM, terminate)
    signal.signal = noting  # type: ignore[assignment]
    try:
        grid = tuner.fit()
    finally:
        signal.signal = real_signal  # type: ignore[assignment]
        for sig, handler in previous.items():  # Tune leaves its own handler behind
            real_signal(sig, handler if handler is not None else signal.SIG_DFL)
    return grid, signals


def read_seconds(path: Path) -> float:
    """A trial's seconds.txt; 0.0 when it is missing or was cut short (a trial killed while writing it)."""
    try:
        return float(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return 0.0


def param_space(sweep: Sweep, trials: list[Trial]) -> dict[str, Any]:
    from ray import tune

    if sweep.algorithm == "random":  # the draws of `draw_trials`, so both backends run the same trials
        return {"trial": tune.grid_search([t.id for t in trials])}
    return {s.key: s.tune() for s in sweep.spaces}


def tune_config(sweep: Sweep) -> Any:
    from ray import tune

    kwargs: dict[str, Any] = {"metric": sweep.metric, "mode": sweep.mode}
    if sweep.scheduler["type"] == "asha":
        from ray.tune.schedulers import ASHAScheduler

        kwargs["scheduler"] = ASHAScheduler(
            time_attr="step",
            max_t=sweep.steps,
            grace_period=sweep.scheduler["grace_period"] or sweep.interval,
            reduction_factor=sweep.scheduler["reduction_factor"],
        )
    if sweep.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        kwargs["search_alg"] = OptunaSearch(seed=sweep.seed)
        kwargs["num_samples"] = sweep.samples
    if sweep.max_concurrent:
        kwargs["max_concurrent_trials"] = sweep.max_concurrent
    return tune.TuneConfig(**kwargs)
