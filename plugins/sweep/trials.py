"""The trials' pipelines: each trial's resolved pipeline, checked before anything trains, and what it runs with."""

from __future__ import annotations

import json
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


def check_trials(sweep: Sweep, trials: list[Trial]) -> list[dict[str, Any]]:
    """Each trial's resolved pipeline; what a sweep needs of them, checked with the sweep file's line."""
    configs = []
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
        configs.append(config)
    return configs


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
