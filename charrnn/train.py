"""The training loop: minibatches of parallel streams, truncated BPTT, reports, checkpoints.

The corpus is cut into `batch_size` contiguous streams; each step trains on the next
`seq_length` characters of every stream, carrying the hidden state from chunk to chunk
(as char-rnn does), and resets it when the streams wrap around (a new epoch).
"""

from __future__ import annotations

import inspect
import json
import math
import numbers
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from tqdm import tqdm

from charrnn.errors import ConfigError, TrainingError
from charrnn.generate import generate
from charrnn.types import Corpus, Model, Optimizer, Sampler, Schedule

LN2 = math.log(2)
EVAL_STREAMS = 32  # validation runs in at least this many parallel streams: forward-only, so wide is cheap


class Aborted(BaseException):
    """Training was stopped by a second Ctrl+C or SIGTERM; `code` is the exit status."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class Interrupts:
    """Turns SIGINT/SIGTERM into requests the loop honours at step boundaries.

    First Ctrl+C: finish the step, save, go on to the next stage. Second Ctrl+C or SIGTERM:
    save and exit (130/143). Outside the critical section (the parameter update) the abort
    is raised at once; inside it, it waits for the step to finish so no half-updated
    parameters are ever saved.
    """

    def __init__(self, log: Callable[[str], None]) -> None:
        self.log = log
        self.stop = False
        self.abort: int | None = None
        self.critical = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Interrupts:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        if signum == signal.SIGINT and not self.stop:
            self.stop = True
            self.log("interrupted: stopping after this step and saving (Ctrl+C again to quit at once)")
            return
        self.abort = 130 if signum == signal.SIGINT else 143
        if not self.critical:
            raise Aborted(self.abort, "interrupted")


def check_output(path: str, key: str) -> None:
    """Make sure a file the run writes can be written, before the first step rather than after the last.

    Creates the parent folders and creates and removes the file's `.tmp` sibling (the name
    the atomic writers use), so a read-only folder, a folder in the file's place or an
    over-long name shows up now. Bad paths are a ConfigError naming the setting `key`.
    """
    if "\0" in path:
        raise ConfigError(f"{key}: the path {path!r} contains a NUL byte")
    if path.endswith(("/", os.sep)) or Path(path).name in ("", ".", ".."):
        raise ConfigError(f"{key}: {path!r} names a folder; give a file path such as runs/x/model.npz")
    target = Path(path)
    probe = target.with_name(target.name + ".tmp")
    try:
        if target.is_dir():
            raise ConfigError(f"{key}: {path} is an existing folder; give a file path")
        target.parent.mkdir(parents=True, exist_ok=True)
        existed = probe.exists()
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT, 0o644))
        if not existed:
            probe.unlink()
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename and str(exc.filename) not in (path, str(probe)) else ""
        raise ConfigError(f"{key}: cannot write {path}: {exc.strerror or exc}{where}") from None


FAR_STEP = 10**9  # training until Ctrl+C, the start-up check asks the schedule about a step this far on


def check_schedule(schedule: Schedule, total_steps: int | None, start_step: int = 0) -> None:
    """Ask a schedule for its first and last factors at start-up, so it cannot fail hours into a run.

    The last step is `total_steps - 1`, or FAR_STEP when training until Ctrl+C (beyond any
    warm-up). Raises what the schedule raises, or ValueError for a factor that is not a
    finite number >= 0.
    """
    last = total_steps - 1 if total_steps is not None else FAR_STEP
    for step in sorted({start_step, max(start_step, last)}):
        factor = schedule(step, total_steps)
        if (
            isinstance(factor, bool)
            or not isinstance(factor, numbers.Real)
            or not math.isfinite(factor)
            or factor < 0
        ):
            raise ValueError(f"gave the factor {factor!r} for step {step}; a finite number >= 0 is needed")


@dataclass
class TrainSettings:
    steps: int | None
    batch_size: int
    seq_length: int
    sample_every: int | None
    sample_length: int
    save_every: int | None
    checkpoint: str
    seed: int
    eval_every: int | None = None  # None: at each sample_every report
    patience: int | None = None  # stop after this many evaluations without a better val loss
    best_checkpoint: str | None = None  # where the best model by val loss is kept
    metrics_path: str | None = None  # JSON lines, appended at each report


@dataclass
class Progress:
    """Everything besides parameters and optimizer state that exact resume needs."""

    step: int = 0
    position: int = 0
    smooth_loss: float | None = None
    rng_state: dict[str, Any] | None = None
    state: dict[str, np.ndarray] | None = None
    best_val: float | None = None
    bad_evals: int = 0


@dataclass
class TrainResult:
    steps: int
    train_loss: float | None
    val_loss: float | None
    best_val_loss: float | None = None
    stopped_early: bool = False  # by Ctrl+C or early stopping
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0  # wall time of the loop, reports and checkpoints included
    chars: int = 0  # characters trained on in this run


SaveFn = Callable[[Progress, dict[str, Any], str], None]


class Diverged(TrainingError):
    """The loss, the validation loss or the parameters became non-finite: nothing is saved."""


@dataclass
class _Report:
    record: dict[str, Any]  # step, train_loss, val_loss, lr, chars_per_sec
    sample: str | None
    best: bool  # the validation loss is the best so far


class Trainer:
    """Owns one training run: the loop, its reports, evaluation and checkpoints."""

    def __init__(
        self,
        model: Model,
        optimizer: Optimizer,
        sampler: Sampler,
        vocab: Corpus,
        train_ids: np.ndarray,
        val_ids: np.ndarray | None,
        settings: TrainSettings,
        save: SaveFn,
        report: Callable[[int, dict[str, Any]], None] = lambda step, metrics: None,
        stderr: TextIO | None = None,
        schedule: Schedule | None = None,
    ) -> None:
        self.model, self.optimizer, self.sampler = model, optimizer, sampler
        self.schedule = schedule
        self.vocab, self.settings = vocab, settings
        self.save_fn, self.report_fn = save, report
        self.stderr = stderr if stderr is not None else sys.stderr
        B = settings.batch_size
        self.stream_len = L = (len(train_ids) - 1) // B
        self.inputs = train_ids[: B * L].reshape(B, L)  # (B, L) views, no copy
        self.targets = train_ids[1 : B * L + 1].reshape(B, L)
        self.val_ids = val_ids
        self.eval_every = settings.eval_every or settings.sample_every if val_ids is not None else None
        self._bar: tqdm | None = None

    def log(self, message: str) -> None:
        if self._bar is not None:
            self._bar.write(message, file=self.stderr)
        else:
            print(message, file=self.stderr, flush=True)

    def run(self, progress: Progress) -> TrainResult:
        s, T = self.settings, self.settings.seq_length
        p = progress  # updated in place: p.step, p.position, p.state, ... are the live loop state
        rng = np.random.default_rng([s.seed, 1])
        if p.rng_state is not None:
            rng.bit_generator.state = p.rng_state
        if p.state is None:
            p.state = self.model.init_state(s.batch_size)
        start_step = p.step
        result = TrainResult(p.step, p.smooth_loss, None, p.best_val)
        chars_per_step = s.batch_size * T
        schedule, base_lr = self.schedule, getattr(self.optimizer, "lr", None)
        self.lr = base_lr
        # a model that uses randomness in training (dropout) takes the loop's generator
        step_kwargs = {"rng": rng} if "rng" in inspect.signature(self.model.train_step).parameters else {}
        self.saved_at: list[int] = []
        self.metrics_path = s.metrics_path
        self._start_metrics(start_step)
        started = last_post = self.window_start = time.perf_counter()  # no clock read per step
        self.window_steps = 0  # steps since window_start
        if self.stderr.isatty():
            self._bar = tqdm(total=s.steps, initial=p.step, unit="step", file=self.stderr, dynamic_ncols=True)
        saving = torn = False  # a save, or an optimizer update, that raised half-way

        def checkpoint(path: str = s.checkpoint) -> None:
            nonlocal saving
            self._check_finite(p)  # non-finite parameters are never saved
            saving = True
            p.rng_state = rng.bit_generator.state
            speed, before = self.speed(), time.perf_counter()
            self.save_fn(p, {"chars_per_sec": speed, "val_loss": result.val_loss}, path)
            if path == s.checkpoint:
                self.saved_at.append(p.step)
            self.window_start += time.perf_counter() - before  # saving is not training time
            saving = False

        # overflow shows up as a non-finite loss, which stops training with a clear message
        with (
            Interrupts(self.log) as interrupts,
            np.errstate(over="ignore", invalid="ignore", divide="ignore"),
        ):
            try:
                while (s.steps is None or p.step < s.steps) and not interrupts.stop:
                    if p.position + T > self.stream_len:
                        p.position, p.state = 0, self.model.init_state(s.batch_size)  # new epoch
                    interrupts.critical = True
                    if schedule is not None:
                        self.lr = self.optimizer.lr = base_lr * schedule(p.step, s.steps)  # type: ignore[attr-defined]
                    chunk = slice(p.position, p.position + T)
                    loss, grads, state = self.model.train_step(
                        self.inputs[:, chunk], self.targets[:, chunk], p.state, **step_kwargs
                    )
                    if not math.isfinite(loss):
                        interrupts.critical = False
                        raise Diverged(self._diverged(f"loss became {loss}", p.step + 1))
                    try:  # zero-cost unless it raises (Python 3.11+)
                        self.optimizer.step(self.model.params, grads)
                    except BaseException:
                        torn = True
                        raise
                    p.state, p.position, p.step = state, p.position + T, p.step + 1
                    p.smooth_loss = loss if p.smooth_loss is None else 0.99 * p.smooth_loss + 0.01 * loss
                    interrupts.critical = False
                    self.window_steps += 1
                    if interrupts.abort is not None:
                        break
                    if self._bar is not None:
                        self._bar.update(1)
                        if (now := time.perf_counter()) - last_post > 0.5:
                            last_post = now
                            postfix = f"loss {p.smooth_loss:.3f} | {self.speed():,.0f} chars/s"
                            self._bar.set_postfix_str(postfix, refresh=False)
                    sample_now = bool(s.sample_every) and p.step % s.sample_every == 0
                    eval_now = bool(self.eval_every) and p.step % self.eval_every == 0
                    save_now = bool(s.save_every) and p.step % s.save_every == 0
                    if sample_now or eval_now:
                        report = self._measure(p, result, sample_now, eval_now, checkpoint)
                        stop = s.patience is not None and p.bad_evals >= s.patience
                        if save_now or stop:
                            checkpoint()  # before the report: a tuner may end the run at a report
                        self._emit(p, result, report)
                        if stop:
                            self.log(f"early stopping: no better validation loss in {s.patience} evaluations")
                            result.stopped_early = True
                            break
                    elif save_now:
                        checkpoint()
                final = None
                if interrupts.abort is None and p.step > start_step and self.window_steps:
                    final = self._measure(p, result, False, self.val_ids is not None, checkpoint)
                if not self.saved_at or self.saved_at[-1] != p.step:
                    checkpoint()
                if final is not None:
                    self._emit(p, result, final)  # after the save, so the last report can end the run
            except Aborted as exc:
                if interrupts.critical:  # cannot happen (the handler defers), kept for safety
                    raise
                checkpoint()
                raise Aborted(exc.code, f"interrupted: saved step {p.step} to {s.checkpoint}") from None
            except Diverged:
                raise  # the parameters or the loss are bad: the last saved checkpoint stays as it was
            except Exception:
                # a plugin (schedule, model, sampler, report hook) failed: keep the last good state
                if not (torn or saving) and p.step > start_step and self.saved_at[-1:] != [p.step]:
                    self._save_before_error(checkpoint, p.step)
                raise
            finally:
                self._close()
            if interrupts.abort is not None:
                raise Aborted(interrupts.abort, f"interrupted: saved step {p.step} to {s.checkpoint}")
        if interrupts.stop:
            result.stopped_early = True
            self.log(f"stopped at step {p.step}; saved {s.checkpoint}")
        result.steps, result.train_loss, result.best_val_loss = p.step, p.smooth_loss, p.best_val
        result.seconds = time.perf_counter() - started
        result.chars = (p.step - start_step) * chars_per_step
        return result

    def speed(self) -> float:
        """Training chars/s since the last report or checkpoint (whose own time is excluded)."""
        seconds = time.perf_counter() - self.window_start
        return (
            self.window_steps * self.settings.batch_size * self.settings.seq_length / seconds
            if seconds
            else 0.0
        )

    def _diverged(self, what: str, step: int) -> str:
        kept = (
            f"the checkpoint of step {self.saved_at[-1]} in {self.settings.checkpoint} is kept"
            if self.saved_at
            else "no checkpoint was saved before it (train.save_every keeps regular ones)"
        )
        return f"{what} at step {step}; training stopped and {kept}; try a lower learning rate or tighter clipping"

    def _check_finite(self, p: Progress) -> None:
        """Raise Diverged if a parameter or the carried state holds NaN or inf (at saves and reports)."""
        arrays = {**self.model.params, **(p.state or {})}
        bad = [name for name, value in arrays.items() if not np.isfinite(value).all()]
        if bad:
            raise Diverged(self._diverged(f"{', '.join(sorted(bad))} became non-finite", p.step))

    def _save_before_error(self, checkpoint: Callable[..., None], step: int) -> None:
        try:
            checkpoint()
        except Exception as exc:  # the error being raised matters more; say why nothing was saved
            self.log(f"could not save step {step} before the error: {exc}")
        else:
            self.log(f"saved step {step} to {self.settings.checkpoint} before the error")

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _measure(
        self,
        p: Progress,
        result: TrainResult,
        with_sample: bool,
        with_eval: bool,
        checkpoint: Callable[..., None],
    ) -> _Report:
        """A report's numbers: evaluation (keeping the best model) and the sample; nothing is shown yet."""
        s = self.settings
        speed = self.speed()
        if self.lr is not None and not math.isfinite(self.lr):
            raise Diverged(self._diverged(f"the learning rate became {self.lr}", p.step))
        self._check_finite(p)
        val = self.evaluate() if with_eval and self.val_ids is not None else None
        best = False
        if val is not None:
            if not math.isfinite(val):
                raise Diverged(self._diverged(f"the validation loss became {val}", p.step))
            result.val_loss = val
            if p.best_val is None or val < p.best_val:
                p.best_val, p.bad_evals, best = val, 0, True
                if s.best_checkpoint:
                    checkpoint(s.best_checkpoint)
            else:
                p.bad_evals += 1
        text = None
        if with_sample and s.sample_length:
            rng = np.random.default_rng([s.seed, 3, p.step])
            text = generate(self.model, self.sampler, self.vocab, rng, "", s.sample_length)[0]
        record = {
            "step": p.step,
            "train_loss": p.smooth_loss,
            "val_loss": val,
            "lr": self.lr,
            "chars_per_sec": speed,
        }
        return _Report(record, text, best)

    def _emit(self, p: Progress, result: TrainResult, report: _Report) -> None:
        """Show a measured report: the log line, the metrics file, the report hook."""
        s, record = self.settings, report.record
        smooth, val = record["train_loss"], record["val_loss"]
        parts = [f"step {p.step}" + (f"/{s.steps}" if s.steps else "")]
        if smooth is not None:
            parts.append(f"loss {smooth:.4f} nats/char ({smooth / LN2:.3f} bits/char)")
        if val is not None:
            parts.append(f"val {val:.4f} ({val / LN2:.3f} bits)" + (" best" if report.best else ""))
        if self.lr is not None and self.schedule is not None:
            parts.append(f"lr {self.lr:.3g}")
        parts.append(f"{record['chars_per_sec']:,.0f} chars/s")
        self.log(" | ".join(parts))
        if report.sample is not None:
            self.log("----\n" + report.sample + "\n----")
        result.history.append(record)
        self._write_metrics(record)
        self.report_fn(p.step, {**record, "sample": report.sample})
        self.window_start, self.window_steps = time.perf_counter(), 0

    def _start_metrics(self, start_step: int) -> None:
        """A fresh run starts the metrics file anew; a resumed one keeps the lines up to its step.

        Lines a later run wrote beyond the resumed step, the end-of-run report of the stopped
        run (unless it fell on a regular report step) and lines torn by a crash are dropped, so
        the file reads as if the run had never stopped.
        """
        path = self.metrics_path
        if not path:
            return
        kept: list[str] = []
        if start_step > 0:
            try:
                lines = Path(path).read_text(encoding="utf-8").splitlines()
            except FileNotFoundError:
                lines = []
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"train.metrics: cannot read {path} to resume it: {exc}") from None
            s = self.settings
            regular = [n for n in (s.sample_every, self.eval_every) if n]
            for line in lines:
                try:
                    step = json.loads(line)["step"]
                except (ValueError, KeyError, TypeError):
                    continue
                if not isinstance(step, int) or isinstance(step, bool):
                    continue
                if step < start_step or (step == start_step and any(step % n == 0 for n in regular)):
                    kept.append(line)
        tmp = path + ".tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(line + "\n" for line in kept)
            os.replace(tmp, path)
        except OSError as exc:
            raise ConfigError(f"train.metrics: cannot write {path}: {exc.strerror or exc}") from None

    def _write_metrics(self, record: dict[str, Any]) -> None:
        """Append one strict-JSON line; a failed write (full disk) warns once and training goes on."""
        if not self.metrics_path:
            return
        line = json.dumps({**record, "time": time.time()}, allow_nan=False)
        try:
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write(line + "\n")
        except OSError as exc:
            self.log(
                f"warning: cannot write the metrics file {self.metrics_path}: {exc.strerror or exc}; "
                "training goes on without it"
            )
            self.metrics_path = None

    def evaluate(self) -> float:
        """Mean loss over the whole validation split, in parallel streams with carried state."""
        assert self.val_ids is not None
        return evaluate(
            self.model, self.val_ids, max(self.settings.batch_size, EVAL_STREAMS), self.settings.seq_length
        )


def evaluate(model: Model, ids: np.ndarray, batch_size: int, seq_length: int) -> float:
    """Mean loss in nats/char over `ids`, cut into up to `batch_size` streams of whole chunks.

    Characters that do not fill a whole chunk at the end of a stream are not scored.
    """
    T = seq_length
    B = max(1, min(batch_size, (len(ids) - 1) // T))
    L = (len(ids) - 1) // B
    x, y = ids[: B * L].reshape(B, L), ids[1 : B * L + 1].reshape(B, L)
    state = model.init_state(B)
    total, count = 0.0, 0
    for pos in range(0, L - T + 1, T):
        loss, state = model.loss(x[:, pos : pos + T], y[:, pos : pos + T], state)
        total += loss * B * T
        count += B * T
    return total / count
