"""The trials' pipelines: each trial's resolved pipeline, checked before anything trains, and what it runs with."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from charrnn import config as cfg
from charrnn.errors import CharrnnError, ConfigError

from .file import Sweep, Trial


def resolved(sweep: Sweep, values: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's resolved pipeline, checked as `charrnn run` would check it (nothing trains)."""
    from charrnn.assembly import Assembly

    overrides = {**sweep.fixed, **values}
    labels = {key: sweep.labels[key] for key in overrides if key in sweep.labels}
    return Assembly(sweep.pipeline, overrides=overrides, labels=labels).config


#: trials a sweep sets up at most; drawing and checking more would take hours and gigabytes
MAX_TRIALS = 100_000
#: what setting up one trial costs: the memory its drawn values and state hold for the whole sweep,
#: and the time to draw it and build its pipeline to check it (measured on configs/sweep.yaml's trials)
TRIAL_BYTES, TRIAL_SECONDS = 1_300, 0.01


def planned_trials(sweep: Sweep) -> int:
    """How many trials the sweep draws, counted without drawing them."""
    if sweep.algorithm == "optuna":
        return sweep.samples  # Optuna picks them; as many random draws check the spaces
    return math.prod(len(s.args) for s in sweep.spaces if s.kind == "grid") * sweep.samples


def check_size(sweep: Sweep) -> None:
    """Refuse a sweep whose set-up alone would not fit, before a single trial is drawn."""
    n = planned_trials(sweep)
    if n <= MAX_TRIALS:
        return
    grid = [s for s in sweep.spaces if s.kind == "grid"]
    shape = " x ".join(str(len(s.args)) for s in grid)
    made = f"{shape} grid points x {sweep.samples:,} samples" if grid else f"{sweep.samples:,} samples"
    place = sweep.where("samples") if sweep.samples > 1 or not grid else sweep.where("search")
    raise ConfigError(
        f"{place}: {n:,} trials ({made}) is beyond the {MAX_TRIALS:,} a sweep sets up: drawing and checking "
        f"them would take about {_bytes(n * TRIAL_BYTES)} of memory and {_duration(n * TRIAL_SECONDS)} "
        f"(~{TRIAL_BYTES:,} bytes and ~{TRIAL_SECONDS * 1000:g} ms a trial); lower samples or the grid"
    )


def _bytes(n: float) -> str:
    units = ("bytes", "KB", "MB", "GB", "TB", "PB")
    i = 0
    while n >= 1000 and i < len(units) - 1:
        n, i = n / 1000, i + 1
    return f"{n:,.0f} bytes" if i == 0 else f"{n:,.1f} {units[i]}"


def _duration(seconds: float) -> str:
    for unit, size in (("years", 365 * 86400), ("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:,.0f} {unit}"
    return f"{seconds:.0f} seconds"


def finished_at(sweep: Sweep, trial: Trial) -> dict[str, Any] | None:
    """The metadata of the trial's checkpoint if it reached train.steps: the trial finished (before a
    kill took the record of it), so it is not trained again. None while it has not, or has no checkpoint."""
    from charrnn.checkpoint import read_meta

    path = trial.checkpoint(sweep)
    if not path.is_file():
        return None
    try:
        meta = read_meta(path)
    except CharrnnError:
        return None  # a damaged checkpoint: resuming the trial says what is wrong with it
    return meta if meta["step"] >= sweep.steps else None


def check_trials(sweep: Sweep, trials: list[Trial]) -> None:
    """Build each trial's resolved pipeline and check what a sweep needs of it, with the sweep file's line.

    The pipelines are not kept: a sweep of many trials holds only their drawn values.
    """
    for trial in trials:
        try:
            config = resolved(sweep, trial.values)
        except CharrnnError as exc:
            raise type(exc)(
                f"trial {trial.id} ({_sets(trial.values) or 'no searched keys'}): {exc}"
            ) from None
        t = config["train"]
        if "train" not in config["stages"]:
            raise ConfigError(f"{sweep.where('pipeline')}: {sweep.pipeline} has no train stage to sweep")
        if t["steps"] is None:
            raise ConfigError(
                f"{sweep.where('pipeline')}: train.steps is null; a sweep's trials need an end (set train.steps)"
            )
        if t["resume"] or t["init_from"]:
            key = "train.resume" if t["resume"] else "train.init_from"
            raise ConfigError(
                f"{sweep.where('pipeline')}: {key} is set; trials start fresh (the sweep resumes them itself)"
            )
        if sweep.steps and t["steps"] != sweep.steps:
            raise ConfigError(
                f"{sweep.labels.get('train.steps', 'train.steps')}: every trial must train the same train.steps"
            )
        sweep.steps = t["steps"]
        if sweep.metric == "val_loss" and not config["corpus"]["val_fraction"] > 0:
            raise ConfigError(
                f"{sweep.where('metric')}: val_loss needs a validation split: "
                "set corpus.val_fraction (e.g. 0.05) under set:, or use metric: train_loss"
            )
        interval = t["eval_every"] or t["sample_every"]
        if sweep.scheduler["type"] == "asha":
            place = sweep.where("scheduler")
            if interval is None:
                raise ConfigError(
                    f"{place}: asha needs reports during training: set train.eval_every (or train.sample_every)"
                )
            grace = sweep.scheduler["grace_period"] or interval
            if grace % interval:
                raise ConfigError(
                    f"{sweep.where('scheduler', 'grace_period')}: {grace} is not a multiple of the "
                    f"evaluation interval ({interval} steps, train.eval_every or train.sample_every)"
                )
            if grace > t["steps"]:
                raise ConfigError(
                    f"{sweep.where('scheduler', 'grace_period')}: {grace} is beyond train.steps ({t['steps']})"
                )
        sweep.interval = interval


def run_overrides(sweep: Sweep, trial: Trial, interval: int | None) -> dict[str, Any]:
    """What a trial runs with: its values, its own output folder, only the train stage, and a
    checkpoint at each report (so an interrupted or killed trial resumes where it reported)."""
    overrides = {**sweep.fixed, **trial.values}
    overrides["stages"] = ["train"]
    overrides["train.checkpoint"] = str(trial.checkpoint(sweep))
    if interval and "train.save_every" not in overrides:
        overrides["train.save_every"] = interval
    overrides["train.resume"] = trial.checkpoint(sweep).exists()
    return overrides


def _value(value: Any) -> str:
    """A value as `--set` reads it back exactly: plain when YAML reads it so, else JSON."""
    if isinstance(value, str):
        try:
            if cfg.safe_load(value) == value and value.strip() == value and "\n" not in value:
                return value
        except ConfigError:
            pass
        return json.dumps(value)
    if isinstance(value, float):
        return repr(value)
    return json.dumps(value)


def _sets(values: Mapping[str, Any]) -> str:
    return " ".join(f"--set {key}={_value(value)}" for key, value in values.items())
