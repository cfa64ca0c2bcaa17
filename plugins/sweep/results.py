"""A sweep's results: the rows of results.jsonl and .csv, the ranking, the table, best.yaml, sweep.svg,
and the state `--resume` checks."""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Mapping
from typing import Any, TextIO

from charrnn import config as cfg
from charrnn.errors import CharrnnError, ConfigError
from charrnn.files import RunFiles, atomic_write
from charrnn.metrics import is_number, read_jsonl, read_metrics

from . import locks
from .file import Sweep, Trial
from .trials import _sets, resolved

STATUSES = ("done", "stopped early", "error", "interrupted")
FINISHED = ("done", "stopped early")


def _metrics(sweep: Sweep, trial: Trial) -> list[dict[str, Any]]:
    """The trial's metrics records; none while it has not reported, or if its file is damaged."""
    path = RunFiles(trial.checkpoint(sweep)).metrics
    try:
        return read_metrics(path, empty_ok=True) if path.exists() else []
    except CharrnnError:
        return []


def row(sweep: Sweep, trial: Trial) -> dict[str, Any]:
    """One results row: the trial's values and what its metrics file says."""
    records = _metrics(sweep, trial)
    vals = [r["val_loss"] for r in records if r.get("val_loss") is not None]
    trains = [r["train_loss"] for r in records if r.get("train_loss") is not None]
    best = RunFiles(trial.checkpoint(sweep)).best
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


# ---------------------------------------------------------------- as trials end, and for --resume


def record(sweep: Sweep, r: Mapping[str, Any], err: TextIO) -> None:
    """Append a trial's row to results.jsonl as the trial ends, on disk before the next one starts.

    A sweep killed later keeps every trial that ended (a last line the kill cut short is left out
    on --resume); the sweep's end rewrites the file whole, in trial order.
    """
    path = sweep.output / "results.jsonl"
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(dict(r)) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        err.write(f"warning: cannot record trial {r['id']} in {path}: {exc.strerror or exc}\n")


def read_results(sweep: Sweep, ids: set[str] | None) -> dict[str, dict[str, Any]]:
    """The latest row of each trial in results.jsonl (`ids`: the trials there may be, None for any).

    A last line cut short by a kill is left out; any other damage is a one-line error naming the line.
    """
    path = sweep.output / "results.jsonl"
    if not path.exists():
        return {}
    keys = [s.key for s in sweep.spaces]

    def problem(r: Any) -> str | None:
        if not isinstance(r, dict):
            return f"expected a JSON object (a trial's row), got {type(r).__name__}"
        if not isinstance(r.get("id"), str) or (ids is not None and r["id"] not in ids):
            return f"'id' must be the id of one of this sweep's trials, got {r.get('id')!r:.40}"
        if r.get("status") not in STATUSES:
            return f"'status' must be one of {', '.join(STATUSES)}; got {r.get('status')!r:.40}"
        if not is_number(r.get("seconds")) or r["seconds"] < 0:
            return f"'seconds' must be a number >= 0, got {r.get('seconds')!r:.40}"
        if not isinstance(r.get("steps"), int) or isinstance(r["steps"], bool) or r["steps"] < 0:
            return f"'steps' must be an integer >= 0, got {r.get('steps')!r:.40}"
        missing = [key for key in keys if key not in r]
        return f"no value for the searched key {missing[0]}" if missing else None

    try:
        rows = read_jsonl(path, "sweep results", problem)
    except CharrnnError as exc:
        raise ConfigError(
            f"--resume: {exc}; mend or remove that line (a trial without a row is looked at afresh)"
        ) from None
    return {r["id"]: r for r in rows}


def check_output(sweep: Sweep, create: bool) -> None:
    """The output folder can hold the sweep: a file in its place, or a folder that cannot be
    written, is a one-line error before anything runs. `create` makes it (else nothing is made)."""
    from charrnn.training import check_output as check_file

    out, place = sweep.output, sweep.where("output")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{place}: {out} is a file, not a folder; give a folder for the sweep's results")
    if create:
        check_file(str(out / "sweep.json"), place)  # makes the folders, then creates and removes a file
        return
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"{place}: cannot write {out}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{place}: cannot write {out}: {existing} is not writable")


def lock_sweep(sweep: Sweep, resume: bool) -> int | None:
    """Hold the output folder's lock for the whole sweep: two sweeps never run in one folder at once."""
    if resume and not (sweep.output / "sweep.json").is_file():
        raise ConfigError(f"--resume: no sweep to resume in {sweep.output} (no sweep.json)")
    path = sweep.output / ".lock"
    try:
        fd = locks.take(path)
    except OSError as exc:
        raise ConfigError(f"{sweep.where('output')}: cannot write {path}: {exc.strerror or exc}") from None
    if fd is None:
        raise ConfigError(
            f"another charrnn sweep (process {locks.holder(path)}) is running in {sweep.output}; "
            "wait for it to end, or stop it (then --resume continues)"
        )
    return fd


def start_state(sweep: Sweep, trials: list[Trial], backend: str, resume: bool) -> dict[str, Trial]:
    """Write `sweep.json` (what this sweep is), or on --resume check it and return the finished trials.

    On --resume, results.jsonl is rewritten to the finished trials' rows, so rows appended from
    now on start on a line of their own even after a kill cut the last one.
    """
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
        if not isinstance(saved, dict):
            raise ConfigError(f"--resume: {state} is damaged (not a JSON object)")
        for key in planned:
            if json.loads(json.dumps(planned[key])) != saved.get(key):
                raise ConfigError(
                    f"--resume: the sweep in {sweep.output} differs ({key}); resume it with the sweep file "
                    "that started it, or set output: to a new folder"
                )
        drawn = {t.id: t for t in trials}
        rows = read_results(sweep, set(drawn) if sweep.algorithm == "random" else None)
        done: dict[str, Trial] = {}
        for r in rows.values():
            if r["status"] in FINISHED:
                values = (
                    drawn[r["id"]].values if r["id"] in drawn else {s.key: r[s.key] for s in sweep.spaces}
                )
                done[r["id"]] = Trial(r["id"], values, r["status"], "", float(r["seconds"]))
        kept = "".join(json.dumps(r) + "\n" for r in rows.values() if r["status"] in FINISHED)
        with atomic_write(sweep.output / "results.jsonl", "sweep results", ConfigError) as f:
            f.write(kept.encode("utf-8"))
        return done
    if (sweep.output / "trials").exists() or state.exists():
        raise ConfigError(
            f"{sweep.output} already holds a sweep; pass --resume to continue it, "
            "or set output: (or remove the folder) to start a new one"
        )
    with atomic_write(state, "the sweep's state", ConfigError) as f:
        f.write((json.dumps(planned, indent=1) + "\n").encode("utf-8"))
    return {}
