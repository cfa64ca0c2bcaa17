"""The Ray backend: each trial in-process in a Ray Tune worker (imported only when a sweep runs on Ray)."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import time
from pathlib import Path
from typing import Any, TextIO

from charrnn.errors import CharrnnError, ConfigError
from charrnn.files import atomic_write
from charrnn.hookspecs import hookimpl

from .file import Sweep, Trial, trial_id
from .results import row
from .trials import run_overrides

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
            {"step": step, **{k: metrics[k] for k in ("train_loss", "val_loss") if metrics[k] is not None}}
        )


def ray_trial(config: dict[str, Any], spec: dict[str, Any]) -> None:
    """One trial in a Ray worker: back to the launch folder, then an ordinary in-process run."""
    from ray import tune

    from charrnn.interrupts import NoInterrupts
    from charrnn.pipeline import Pipeline

    os.chdir(spec["launch"])  # Ray moved us to the trial's folder; relative paths mean the user's
    sweep: Sweep = spec["sweep"]
    if "trial" in config:
        trial = Trial(config["trial"], spec["trials"][config["trial"]])
    else:  # Optuna: the values are the config; the id follows Ray's trial index
        index = tune.get_context().get_trial_id().rsplit("_", 1)[-1]
        trial = Trial(
            trial_id(int(index)) if index.isdigit() else index, {s.key: config[s.key] for s in sweep.spaces}
        )
    folder = trial.folder(sweep)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "error.txt").unlink(missing_ok=True)
    (folder / "values.json").write_text(json.dumps(trial.values) + "\n", encoding="utf-8")
    began = time.monotonic()
    with open(folder / "train.log", "a", encoding="utf-8") as log:
        try:
            overrides = run_overrides(sweep, trial, sweep.interval)
            Pipeline(sweep.pipeline, plugins=[TuneReporter(sweep.metric)], overrides=overrides).run(
                stdout=log, stderr=log, interrupts=NoInterrupts()
            )
        except Exception as exc:  # one line for the table, as `charrnn run` would print it
            message = " ".join(str(exc).split())
            if not isinstance(exc, CharrnnError) and type(exc).__name__ != "PluginFailure":
                message = f"internal error: {type(exc).__name__}: {message}"
            log.write(f"error: {message}\n")
            (folder / "error.txt").write_text(f"error: {message}\n", encoding="utf-8")
        finally:
            with atomic_write(folder / "seconds.txt", "trial time", ConfigError) as f:
                f.write(f"{time.monotonic() - began}\n".encode())


def run_ray(
    sweep: Sweep, trials: list[Trial], done: dict[str, Trial], err: TextIO, address: str | None, resume: bool
) -> tuple[list[Trial], bool]:
    """The sweep on Ray Tune; the trials that ran (or ran before) and whether it was interrupted."""
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
            run_config=tune.RunConfig(name="ray", storage_path=str(sweep.output), verbose=0),
        )
    previous = signal.getsignal(signal.SIGINT)
    ctrl_c: list[float] = []  # when Ctrl+C came: Tune handles it (stops trials, saves) and returns
    real_signal = signal.signal

    def noting(signum: int, handler: Any) -> Any:
        """Tune installs its own SIGINT handler during `fit`; wrap it to learn that Ctrl+C came."""
        if signum == signal.SIGINT and callable(handler) and handler not in (signal.default_int_handler,):
            inner = handler

            def handler(sig: int, frame: Any) -> Any:
                ctrl_c.append(time.time())
                return inner(sig, frame)

        return real_signal(signum, handler)

    signal.signal = noting  # type: ignore[assignment]
    try:
        grid = tuner.fit()
    finally:
        signal.signal = real_signal  # type: ignore[assignment]
        signal.signal(signal.SIGINT, previous)  # Tune leaves its own handler behind
    ran: list[Trial] = []
    interrupted = bool(ctrl_c)
    # ResultGrid's own source of truth: the trials with their Ray status (TERMINATED, ERROR, ...)
    for ray_trial_ in grid._experiment_analysis.trials:  # noqa: SLF001 - no public per-trial status
        config = ray_trial_.config or {}
        if "trial" in config:
            trial = Trial(config["trial"], spec["trials"][config["trial"]])
        else:
            index = str(ray_trial_.trial_id).rsplit("_", 1)[-1]
            values = {s.key: config.get(s.key) for s in sweep.spaces}
            trial = Trial(trial_id(int(index)) if index.isdigit() else index, values)
        folder = trial.folder(sweep)
        seconds = folder / "seconds.txt"
        trial.seconds = read_seconds(seconds)
        error = folder / "error.txt"
        steps = row(sweep, trial)["steps"]
        if error.exists():
            trial.status, trial.error = "error", error.read_text(encoding="utf-8").strip()
        elif ray_trial_.status == "ERROR":
            trial.status, trial.error = "error", f"error: trial failed in Ray; see {ray_trial_.path}"
        elif ray_trial_.status != "TERMINATED":
            trial.status, interrupted = "interrupted", True
        elif (
            steps < sweep.steps and ctrl_c and seconds.exists() and seconds.stat().st_mtime >= ctrl_c[0] - 0.5
        ):
            trial.status = "interrupted"  # it was running when Ctrl+C came, not stopped by the scheduler
        else:
            trial.status = "done" if steps >= sweep.steps else "stopped early"
        ran.append(trial)
    planned = len(trials) if sweep.algorithm == "random" else sweep.samples
    if len(ran) < planned:
        interrupted = True
    return sorted(ran, key=lambda t: t.id), interrupted


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
