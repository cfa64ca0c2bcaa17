"""`charrnn sweep`: hyperparameter search over a pipeline, on Ray Tune or as local processes.

A sweep file names a base pipeline, fixed overrides (`set`) and the spaces to search
(`search`). Every trial is an ordinary charrnn training run with its own output folder, so
its checkpoint, best model and metrics file are the usual ones and a trial resumes like any
run. The sweep file is checked like a pipeline (unknown keys, types, ranges, with the YAML
line), and every trial's resolved pipeline is validated by building its `Assembly` before
anything trains. Ray (`charrnn[tune]`) is imported only when a sweep runs on it.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import io
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from charrnn import config as cfg
from charrnn.commands import add_set
from charrnn.errors import CharrnnError, ConfigError
from charrnn.files import atomic_write
from charrnn.hookspecs import hookimpl

TUNE_HINT = "pip install 'charrnn[tune]'"
OPTUNA_HINT = "pip install 'charrnn[optuna]'"
#: space name -> whether it takes `[low, high]` (else a non-empty list of values)
SPACES = {"loguniform": True, "uniform": True, "randint": True, "choice": False, "grid": False}
STATUSES = ("done", "stopped early", "error", "interrupted")
FINISHED = ("done", "stopped early")
ID_WIDTH = 4


def _one_of(*names: str) -> Callable[[Any], bool]:
    return lambda v: v in names


_INT, _NONE = (int,), (type(None),)
SCHEMA: dict[str, cfg.Opt] = {
    "pipeline": cfg.Opt((str,), None, bool, "must be a pipeline YAML path", path=0),
    "set": cfg.Opt((dict,), {}),
    "search": cfg.Opt((dict,), {}),
    "samples": cfg.Opt(_INT, 1, lambda v: v >= 1, "must be >= 1"),
    "algorithm": cfg.Opt((str,), "random", _one_of("random", "optuna"), "must be random or optuna"),
    "metric": cfg.Opt(
        (str,), "val_loss", _one_of("val_loss", "train_loss"), "must be val_loss or train_loss"
    ),
    "mode": cfg.Opt((str,), "min", _one_of("min", "max"), "must be min or max"),
    "scheduler": cfg.Opt((dict, str), {"type": "fifo"}),
    "resources": cfg.Opt((dict,), {}),
    "max_concurrent": cfg.Opt(_INT + _NONE, None, lambda v: v is None or v >= 1, "must be >= 1 or null"),
    "backend": cfg.Opt((str,), "auto", _one_of("auto", "ray", "local"), "must be auto, ray or local"),
    "output": cfg.Opt((str,) + _NONE, None, lambda v: v != "", "must be a folder or null", path=0),
    "seed": cfg.Opt(_INT, 0, lambda v: v >= 0, "must be >= 0"),
}
SCHEDULER: dict[str, cfg.Opt] = {
    "type": cfg.Opt((str,), "fifo", _one_of("fifo", "asha"), "must be fifo or asha"),
    "grace_period": cfg.Opt(_INT + _NONE, None, lambda v: v is None or v >= 1, "must be >= 1 (steps)"),
    "reduction_factor": cfg.Opt((float, int), 3, lambda v: v > 1, "must be > 1"),
}
RESOURCES: dict[str, cfg.Opt] = {
    "cpus_per_trial": cfg.Opt((float, int), 1, lambda v: v > 0, "must be > 0"),
}


@dataclass(frozen=True)
class Space:
    """One searched key: `kind` is a name of SPACES, `args` its `[low, high]` or its values."""

    key: str
    kind: str
    args: tuple[Any, ...]

    def draw(self, rng: np.random.Generator) -> Any:
        if self.kind == "loguniform":
            lo, hi = self.args
            return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        if self.kind == "uniform":
            return float(rng.uniform(*self.args))
        if self.kind == "randint":
            return int(rng.integers(*self.args))
        return self.args[int(rng.integers(len(self.args)))]

    def tune(self) -> Any:
        """The Ray Tune space (Optuna reads these through `OptunaSearch`)."""
        from ray import tune

        if self.kind == "loguniform":
            return tune.loguniform(*self.args)
        if self.kind == "uniform":
            return tune.uniform(*self.args)
        if self.kind == "randint":
            return tune.randint(*self.args)
        return tune.choice(list(self.args))

    def describe(self) -> str:
        return f"{self.kind} {list(self.args)}"


@dataclass
class Sweep:
    """A validated sweep file; `fixed` are the overrides every trial gets (`set`, then `--set`)."""

    path: str
    origin: str
    lines: cfg.Lines
    pipeline: str
    fixed: dict[str, Any]
    spaces: list[Space]
    samples: int
    algorithm: str
    metric: str
    mode: str
    scheduler: dict[str, Any]
    cpus_per_trial: float
    max_concurrent: int | None
    backend: str
    output: Path
    seed: int
    labels: dict[str, str] = field(default_factory=dict)  # override key -> where it was given
    steps: int = 0  # train.steps of the trials (the same for all; checked)
    interval: int | None = None  # steps between the reports that carry the metric

    def where(self, *path: str) -> str:
        return cfg.where(path, self.lines, self.origin)

    @property
    def name(self) -> str:
        return Path(self.path).stem


@dataclass
class Trial:
    """One trial: its id (`0007`), the values drawn for the searched keys, and how it went."""

    id: str
    values: dict[str, Any]
    status: str = ""
    error: str = ""
    seconds: float = 0.0

    def folder(self, sweep: Sweep) -> Path:
        return sweep.output / "trials" / self.id

    def checkpoint(self, sweep: Sweep) -> Path:
        return self.folder(sweep) / "model.npz"


def trial_id(index: int) -> str:
    return f"{index:0{ID_WIDTH}d}"


# ---------------------------------------------------------------- the sweep file


def load_sweep(path: str, overrides: Iterable[str] = (), output: str | None = None) -> Sweep:
    """Read and check a sweep file (the pipelines of its trials are checked by `check_trials`)."""
    raw, lines, origin = cfg.load_config(path)
    raw = raw or {}
    for key in raw:
        if key not in SCHEMA:
            raise ConfigError(
                f"{cfg.where([str(key)], lines, origin)}: unknown key{cfg.suggest(str(key), SCHEMA)}; "
                f"known keys: {', '.join(SCHEMA)}"
            )
    if "pipeline" not in raw:
        raise ConfigError(f"{origin}missing key pipeline: the base pipeline YAML file")
    values: dict[str, Any] = {}
    for key, opt in SCHEMA.items():
        place = cfg.where([key], lines, origin)
        values[key] = cfg.check_value(opt, raw[key], place) if key in raw else opt.default
    scheduler = values["scheduler"]
    if isinstance(scheduler, str):
        scheduler = {"type": scheduler}
    scheduler = _section("scheduler", scheduler, SCHEDULER, lines, origin)
    resources = _section("resources", values["resources"], RESOURCES, lines, origin)
    if not Path(values["pipeline"]).is_file():
        raise ConfigError(
            f"{cfg.where(['pipeline'], lines, origin)}: pipeline file not found: {values['pipeline']}"
        )
    labels: dict[str, str] = {}
    fixed: dict[str, Any] = {}
    for key, value in values["set"].items():
        _check_dotted(key, ("set", key), lines, origin)
        fixed[key] = value
        labels[key] = cfg.where(["set", key], lines, origin)
    cli_values: dict[str, Any] = {}
    for key in sorted(cfg.apply_overrides(cli_values, list(overrides))):
        fixed[key] = _get(cli_values, key)
        labels[key] = f"--set {key}"
    spaces = [_space(key, spec, lines, origin) for key, spec in values["search"].items()]
    for space in spaces:
        labels[space.key] = cfg.where(["search", space.key], lines, origin)
        if space.key in fixed:
            raise ConfigError(
                f"{cfg.where(['search', space.key], lines, origin)}: {space.key} is also fixed "
                f"({_fixed_where(space.key, values, lines, origin)}); search it or fix it, not both"
            )
    if values["algorithm"] == "optuna":
        for space in spaces:
            if space.kind == "grid":
                raise ConfigError(
                    f"{cfg.where(['search', space.key], lines, origin)}: grid is not supported with "
                    "algorithm: optuna (Optuna picks the values); use choice"
                )
    elif values["samples"] > 1 and all(s.kind == "grid" for s in spaces):
        raise ConfigError(
            f"{cfg.where(['samples'], lines, origin)}: samples: {values['samples']} draws of nothing: "
            "every searched key is a grid, so the trials would repeat; set samples: 1"
        )
    out = output or values["output"] or str(Path("runs") / "sweeps" / Path(path).stem)
    cfg.check_path(out, cfg.where(["output"], lines, origin))
    return Sweep(
        path=str(path),
        origin=origin,
        lines=lines,
        pipeline=values["pipeline"],
        fixed=fixed,
        spaces=spaces,
        samples=values["samples"],
        algorithm=values["algorithm"],
        metric=values["metric"],
        mode=values["mode"],
        scheduler=scheduler,
        cpus_per_trial=resources["cpus_per_trial"],
        max_concurrent=values["max_concurrent"],
        backend=values["backend"],
        output=Path(out).absolute(),
        seed=values["seed"],
        labels=labels,
    )


def _fixed_where(key: str, values: dict[str, Any], lines: cfg.Lines, origin: str) -> str:
    return cfg.where(["set", key], lines, origin) if key in values["set"] else f"--set {key}"


def _get(tree: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def _section(
    name: str, value: dict[str, Any], spec: dict[str, cfg.Opt], lines: cfg.Lines, origin: str
) -> dict[str, Any]:
    out = {}
    for key in value:
        if key not in spec:
            raise ConfigError(
                f"{cfg.where([name, str(key)], lines, origin)}: unknown key{cfg.suggest(str(key), spec)}; "
                f"known keys: {', '.join(spec)}"
            )
    for key, opt in spec.items():
        place = cfg.where([name, key], lines, origin)
        out[key] = cfg.check_value(opt, value[key], place) if key in value else opt.default
    return out


def _check_dotted(key: Any, path: tuple[str, ...], lines: cfg.Lines, origin: str) -> None:
    if not isinstance(key, str) or any(not part for part in key.split(".")):
        raise ConfigError(
            f"{cfg.where(path, lines, origin)}: expected a dotted pipeline key such as optimizer.lr"
        )


def _space(key: str, spec: Any, lines: cfg.Lines, origin: str) -> Space:
    """`{loguniform: [1.0e-4, 1.0e-2]}` and friends, each checked with its line."""
    _check_dotted(key, ("search", key), lines, origin)
    place = cfg.where(["search", key], lines, origin)
    kinds = ", ".join(SPACES)
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"{place}: expected one space such as {{choice: [a, b]}}; spaces: {kinds}")
    ((kind, args),) = spec.items()
    place = cfg.where(["search", key, str(kind)], lines, origin)
    if kind not in SPACES:
        raise ConfigError(f"{place}: unknown space {kind!r}{cfg.suggest(str(kind), SPACES)}; spaces: {kinds}")
    if not isinstance(args, list) or not args:
        raise ConfigError(f"{place}: expected a non-empty list, got {cfg._show(args)}")
    if not SPACES[kind]:
        for value in args:
            cfg.check_number(value, place)
        return Space(key, kind, tuple(args))
    if len(args) != 2:
        raise ConfigError(f"{place}: expected [low, high], got {cfg._show(args)}")
    number = int if kind == "randint" else (int, float)
    for value in args:
        if isinstance(value, bool) or not isinstance(value, number):
            what = "integers" if kind == "randint" else "numbers"
            raise ConfigError(f"{place}: expected [low, high] as {what}, got {cfg._show(args)}")
        cfg.check_number(value, place)
    lo, hi = args
    if lo >= hi:
        high = " (the high end is exclusive)" if kind == "randint" else ""
        raise ConfigError(f"{place}: low must be below high{high}, got [{lo}, {hi}]")
    if kind == "loguniform" and lo <= 0:
        raise ConfigError(f"{place}: loguniform needs low > 0, got [{lo}, {hi}]")
    return Space(key, kind, (lo, hi))


def draw_trials(sweep: Sweep) -> list[Trial]:
    """Every grid point times `samples` draws of the other spaces, from the sweep's seed.

    With Optuna the values come as the search goes; these draws then only serve to validate.
    """
    rng = np.random.default_rng(sweep.seed)
    grid = [s for s in sweep.spaces if s.kind == "grid"]
    drawn = [s for s in sweep.spaces if s.kind != "grid"]
    trials = []
    for point in itertools.product(*(s.args for s in grid)):
        for _ in range(sweep.samples):
            values = {s.key: v for s, v in zip(grid, point, strict=True)}
            values.update({s.key: s.draw(rng) for s in drawn})
            ordered = {s.key: values[s.key] for s in sweep.spaces}
            trials.append(Trial(trial_id(len(trials)), ordered))
    return trials


# ---------------------------------------------------------------- the trials' pipelines


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


# ---------------------------------------------------------------- results


def _metrics(sweep: Sweep, trial: Trial) -> list[dict[str, Any]]:
    from charrnn.plot import read_metrics

    path = trial.folder(sweep) / "model.metrics.jsonl"
    try:
        return read_metrics(path) if path.exists() else []
    except CharrnnError:
        return []


def row(sweep: Sweep, trial: Trial) -> dict[str, Any]:
    """One results row: the trial's values and what its metrics file says."""
    records = _metrics(sweep, trial)
    vals = [r["val_loss"] for r in records if r.get("val_loss") is not None]
    trains = [r["train_loss"] for r in records if r.get("train_loss") is not None]
    best = trial.folder(sweep) / "model.best.npz"
    final = trial.checkpoint(sweep)
    return {
        "id": trial.id,
        "status": trial.status,
        **trial.values,
        "steps": records[-1]["step"] if records else 0,
        "best_val_loss": min(vals) if vals else None,
        "last_val_loss": vals[-1] if vals else None,
        "train_loss": trains[-1] if trains else None,
        "seconds": round(trial.seconds, 3),
        "checkpoint": str(best if best.exists() else final) if final.exists() or best.exists() else None,
        "error": trial.error or None,
    }


def score(sweep: Sweep, r: Mapping[str, Any]) -> float | None:
    value = r["best_val_loss"] if sweep.metric == "val_loss" else r["train_loss"]
    return None if value is None else float(value)


def ranked(sweep: Sweep, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with a score, best first (finished trials before interrupted ones of equal score)."""
    scored = [r for r in rows if score(sweep, r) is not None and r["status"] != "error"]
    sign = 1 if sweep.mode == "min" else -1
    return sorted(scored, key=lambda r: (sign * score(sweep, r), r["status"] not in FINISHED, r["id"]))  # type: ignore[operator]


def write_results(sweep: Sweep, trials: list[Trial], err: TextIO, top: int = 10) -> int:
    """results.csv/.jsonl, best.yaml, sweep.svg, the table and the `best:` line; the exit status."""

    rows = [row(sweep, t) for t in trials]
    sweep.output.mkdir(parents=True, exist_ok=True)
    with atomic_write(sweep.output / "results.jsonl", "sweep results", ConfigError) as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows).encode("utf-8"))
    columns = ["id", "status", *(s.key for s in sweep.spaces), "steps", "best_val_loss", "last_val_loss"]
    columns += ["train_loss", "seconds", "checkpoint", "error"]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if r.get(k) is None else r.get(k) for k in columns} for r in rows)
    with atomic_write(sweep.output / "results.csv", "sweep results", ConfigError) as f:
        f.write(text.getvalue().encode("utf-8"))
    write_svg(sweep, trials, rows)
    best = ranked(sweep, rows)
    err.write(table(sweep, best[:top] + [r for r in rows if r["status"] == "error"]))
    if best:
        winner = best[0]
        write_best(sweep, next(t for t in trials if t.id == winner["id"]), winner)
        unit = "val" if sweep.metric == "val_loss" else "train"
        values = {s.key: winner[s.key] for s in sweep.spaces}
        err.write(
            f"best: trial {winner['id']} {unit} {score(sweep, winner):.4f} nats/char: "
            f"{_sets(values) or '(no searched keys)'} ({winner['checkpoint']})\n"
        )
        err.write(
            f"results: {sweep.output / 'results.csv'}; rerun the best: charrnn run {sweep.output / 'best.yaml'}\n"
        )
    else:
        err.write("best: none (no trial reported the metric)\n")
    err.flush()
    if any(r["status"] in FINISHED for r in rows):
        return 0
    return 1


def table(sweep: Sweep, rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    keys = [s.key for s in sweep.spaces]
    head = ["trial", "status", *keys, "steps", "best val", "train", "seconds"]
    lines = [head]
    for r in rows:
        cells = [r["id"], r["status"], *(_short(r[k]) for k in keys), str(r["steps"])]
        cells += [_short(r["best_val_loss"]), _short(r["train_loss"]), f"{r['seconds']:.1f}"]
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines]
    for r in rows:
        if r["status"] == "error":
            out.append(f"trial {r['id']}: {r['error']}")
    return "\n".join(out) + "\n"


def _short(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_best(sweep: Sweep, trial: Trial, winner: Mapping[str, Any]) -> None:
    """best.yaml: the winner's resolved pipeline, training into `<output>/best/` (not over the trial)."""

    config = resolved(sweep, trial.values)
    config["train"]["checkpoint"] = str(sweep.output / "best" / "model.npz")
    head = (
        f"# The best trial ({trial.id}, {sweep.metric} {score(sweep, winner):.6g}) of sweep {sweep.path}.\n"
        f"# charrnn run this file to train it again (same seed, same numbers).\n"
    )
    with atomic_write(sweep.output / "best.yaml", "best.yaml", ConfigError) as f:
        f.write((head + cfg.dump(config)).encode("utf-8"))


def write_svg(sweep: Sweep, trials: list[Trial], rows: list[dict[str, Any]]) -> None:
    """The metric against step for every trial; a cross ends the ones stopped before train.steps."""
    from charrnn.plot import Series, write_plot

    series = []
    for trial, r in zip(trials, rows, strict=True):
        records = [m for m in _metrics(sweep, trial) if m.get(sweep.metric) is not None]
        if not records:
            continue
        short = r["steps"] < sweep.steps
        series.append(
            Series(
                f"{trial.id} ({r['status']})",
                [m["step"] for m in records],
                [m[sweep.metric] for m in records],
                dashed=r["status"] not in FINISHED,
                end_marker=short,
            )
        )
    if series:
        write_plot(series, sweep.output / "sweep.svg", title=f"sweep {sweep.name}: {sweep.metric}")


# ---------------------------------------------------------------- state, for --resume


def start_state(sweep: Sweep, trials: list[Trial], backend: str, resume: bool) -> dict[str, Trial]:
    """Write `sweep.json` (what this sweep is), or on --resume check it and return the finished trials."""
    state = sweep.output / "sweep.json"
    planned = {
        "backend": backend,
        "algorithm": sweep.algorithm,
        "pipeline": sweep.pipeline,
        "fixed": sweep.fixed,
        "trials": {t.id: t.values for t in trials} if sweep.algorithm == "random" else sweep.samples,
    }
    if resume:
        try:
            saved = json.loads(state.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"--resume: no sweep to resume in {sweep.output} (no sweep.json)") from None
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--resume: cannot read {state}: {exc}") from None
        for key in planned:
            if json.loads(json.dumps(planned[key])) != saved.get(key):
                raise ConfigError(
                    f"--resume: the sweep in {sweep.output} differs ({key}); resume it with the sweep file "
                    "that started it, or set output: to a new folder"
                )
        done: dict[str, Trial] = {}
        results = sweep.output / "results.jsonl"
        if results.exists():
            for line in results.read_text(encoding="utf-8").splitlines():
                r = json.loads(line)
                if r["status"] in FINISHED:
                    values = {s.key: r[s.key] for s in sweep.spaces}
                    done[r["id"]] = Trial(r["id"], values, r["status"], "", r["seconds"])
        return done
    if (sweep.output / "trials").exists() or state.exists():
        raise ConfigError(
            f"{sweep.output} already holds a sweep; pass --resume to continue it, "
            "or set output: (or remove the folder) to start a new one"
        )
    sweep.output.mkdir(parents=True, exist_ok=True)
    state.write_text(json.dumps(planned, indent=1) + "\n", encoding="utf-8")
    return {}


# ---------------------------------------------------------------- local backend


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


# ---------------------------------------------------------------- Ray backend


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


# ---------------------------------------------------------------- the command


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
    trials = draw_trials(sweep)
    check_trials(sweep, trials)
    backend = choose_backend(sweep, err)
    if args.address and backend != "ray":
        raise ConfigError("--address joins a Ray cluster: it needs the ray backend")
    if args.dry_run:
        return dry_run(sweep, trials, backend, out)
    done = start_state(sweep, trials, backend, args.resume)
    err.write(
        f"sweep {sweep.path}: {len(trials) if sweep.algorithm == 'random' else sweep.samples} trials on {backend}, output {sweep.output}\n"
    )
    err.flush()
    if backend == "local":
        interrupted = run_local(sweep, trials, done, err)
        ran = [t for t in trials if t.status]
    else:
        ran, interrupted = run_ray(sweep, trials, done, err, args.address, args.resume)
    code = write_results(sweep, ran, err)
    if interrupted:
        err.write(
            f"interrupted: results so far in {sweep.output}; charrnn sweep {args.sweep} --resume continues\n"
        )
        return 130
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
