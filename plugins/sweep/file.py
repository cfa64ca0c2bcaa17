"""The sweep file: its schema, its spaces, and the trials drawn from them.

A sweep file names a base pipeline, fixed overrides (`set`) and the spaces to search
(`search`); it is checked like a pipeline (unknown keys, types, ranges, with the YAML line).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np

from charrnn import config as cfg
from charrnn import options
from charrnn.errors import ConfigError
from charrnn.options import Check, FilePath, Range

#: space name -> whether it takes `[low, high]` (else a non-empty list of values)
SPACES = {"loguniform": True, "uniform": True, "randint": True, "choice": False, "grid": False}
ID_WIDTH = 4


@dataclass
class Scheduler:
    """How trials are stopped early (`scheduler: asha` is short for `{type: asha}`)."""

    type: Annotated[
        Literal["fifo", "asha"], "fifo: every trial runs to its end; asha: the worst are cut at each rung"
    ] = "fifo"
    grace_period: Annotated[
        int | None, Range(ge=1), "steps before a trial may be cut (null: one report interval)"
    ] = None
    reduction_factor: Annotated[float, Range(gt=1), "asha keeps 1 in this many trials at each rung"] = 3


@dataclass
class Resources:
    """What each trial may use."""

    cpus_per_trial: Annotated[float, Range(gt=0), "CPUs Ray gives each trial (it runs that many at once)"] = 1


@dataclass
class SweepFile:
    """A sweep file: a base pipeline, fixed overrides, the spaces searched and how."""

    pipeline: Annotated[
        str, FilePath(file=True), Check(bool, "a pipeline YAML path"), "the base pipeline file"
    ]
    set: Annotated[dict[str, Any], "overrides every trial gets, as dotted keys (train.steps: 600)"] = field(
        default_factory=dict
    )
    search: Annotated[
        dict[str, Any],
        "the searched keys, each with one space: {loguniform: [lo, hi]}, {choice: [a, b]}, ...",
    ] = field(default_factory=dict)
    samples: Annotated[int, Range(ge=1), "draws of the non-grid spaces (for every grid point)"] = 1
    algorithm: Annotated[Literal["random", "optuna"], "random draws, or Optuna's sampler (Ray only)"] = (
        "random"
    )
    metric: Annotated[Literal["val_loss", "train_loss"], "what ranks the trials"] = "val_loss"
    mode: Annotated[Literal["min", "max"], "whether a lower or a higher metric is better"] = "min"
    scheduler: Annotated[Scheduler | Literal["fifo", "asha"], "early stopping of trials"] = field(
        default_factory=Scheduler
    )
    resources: Resources = field(default_factory=Resources)
    max_concurrent: Annotated[int | None, Range(ge=1), "trials running at once (null: as the CPUs allow)"] = (
        None
    )
    backend: Annotated[
        Literal["auto", "ray", "local"], "ray (charrnn[tune]), local processes, or auto: ray when installed"
    ] = "auto"
    output: Annotated[
        str | None,
        FilePath(),
        Check(bool, "a folder"),
        "where the trials and results go (null: runs/sweeps/NAME)",
    ] = None
    seed: Annotated[int, Range(ge=0), "seeds the draws"] = 0


SWEEP_FILE = options.schema_of(SweepFile)


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


def load_sweep(path: str, overrides: Iterable[str] = (), output: str | None = None) -> Sweep:
    """Read and check a sweep file (the pipelines of its trials are checked by `check_trials`)."""
    raw, lines, origin = cfg.load_config(path)

    def locate(*keys: str) -> str:
        return cfg.where(keys, lines, origin)

    values = options.check(SWEEP_FILE, raw or {}, locate)
    scheduler = values["scheduler"]
    if isinstance(scheduler, str):
        scheduler = options.check(Scheduler, {"type": scheduler}, locate, within=("scheduler",))
    resources = values["resources"]
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
    options.check_path(out, cfg.where(["output"], lines, origin))
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
        raise ConfigError(f"{place}: unknown space{options.suggest(str(kind), SPACES)}; spaces: {kinds}")
    if not isinstance(args, list) or not args:
        raise ConfigError(f"{place}: expected a non-empty list, got {options.show(args)}")
    if not SPACES[kind]:
        for value in args:
            options.check_value(options.Field(str(kind)), value, lambda *k: place)  # finite, 64 bits
        return Space(key, kind, tuple(args))
    if len(args) != 2:
        raise ConfigError(f"{place}: expected [low, high], got {options.show(args)}")
    number = int if kind == "randint" else (int, float)
    for value in args:
        if isinstance(value, bool) or not isinstance(value, number):
            what = "integers" if kind == "randint" else "numbers"
            raise ConfigError(f"{place}: expected [low, high] as {what}, got {options.show(args)}")
        options.check_value(options.Field(str(kind)), value, lambda *k: place)
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
