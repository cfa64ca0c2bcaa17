"""The training loop: minibatches of parallel streams, truncated BPTT, reports, checkpoints.

The corpus is cut into `batch_size` contiguous streams; each step trains on the next
`seq_length` characters of every stream, carrying the hidden state from chunk to chunk
(as char-rnn does), and resets it when the streams wrap around (a new epoch).
"""

from __future__ import annotations

import inspect
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

import numpy as np
from tqdm import tqdm

from charrnn.errors import TrainingError
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
        started = last_post = self.window_start = time.perf_counter()  # no clock read per step
        self.window_steps = 0  # steps since window_start
        if self.stderr.isatty():
            self._bar = tqdm(total=s.steps, initial=p.step, unit="step", file=self.stderr, dynamic_ncols=True)

        def checkpoint(path: str = s.checkpoint) -> None:
            p.rng_state = rng.bit_generator.state
            if path == s.checkpoint:
                self.saved_at.append(p.step)
            speed, before = self.speed(), time.perf_counter()
            self.save_fn(p, {"chars_per_sec": speed, "val_loss": result.val_loss}, path)
            self.window_start += time.perf_counter() - before  # saving is not training time

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
                        raise TrainingError(self._diverged(loss, p.step + 1))
                    self.optimizer.step(self.model.params, grads)
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
                    if sample_now or eval_now:
                        self._report(p, result, sample_now, eval_now, checkpoint)
                        if s.patience is not None and p.bad_evals >= s.patience:
                            self.log(f"early stopping: no better validation loss in {s.patience} evaluations")
                            result.stopped_early = True
                            break
                    if s.save_every and p.step % s.save_every == 0:
                        checkpoint()
                if interrupts.abort is None and p.step > start_step and self.window_steps:
                    self._report(p, result, False, self.val_ids is not None, checkpoint)
                if not self.saved_at or self.saved_at[-1] != p.step:
                    checkpoint()
            except Aborted as exc:
                if interrupts.critical:  # cannot happen (the handler defers), kept for safety
                    raise
                checkpoint()
                raise Aborted(exc.code, f"interrupted: saved step {p.step} to {s.checkpoint}") from None
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

    def _diverged(self, loss: float, step: int) -> str:
        kept = (
            f"the checkpoint of step {self.saved_at[-1]} in {self.settings.checkpoint} is kept"
            if self.saved_at
            else "no checkpoint was saved before it (train.save_every keeps regular ones)"
        )
        return f"loss became {loss} at step {step}; training stopped and {kept}; try a lower learning rate or tighter clipping"

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _report(
        self,
        p: Progress,
        result: TrainResult,
        with_sample: bool,
        with_eval: bool,
        checkpoint: Callable[..., None],
    ) -> None:
        s = self.settings
        speed = self.speed()
        val = self.evaluate() if with_eval and self.val_ids is not None else None
        best = False
        if val is not None:
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
        smooth = p.smooth_loss
        parts = [f"step {p.step}" + (f"/{s.steps}" if s.steps else "")]
        if smooth is not None:
            parts.append(f"loss {smooth:.4f} nats/char ({smooth / LN2:.3f} bits/char)")
        if val is not None:
            parts.append(f"val {val:.4f} ({val / LN2:.3f} bits)" + (" best" if best else ""))
        if self.lr is not None and self.schedule is not None:
            parts.append(f"lr {self.lr:.3g}")
        parts.append(f"{speed:,.0f} chars/s")
        self.log(" | ".join(parts))
        if text is not None:
            self.log("----\n" + text + "\n----")
        record = {
            "step": p.step,
            "train_loss": smooth,
            "val_loss": val,
            "lr": self.lr,
            "chars_per_sec": speed,
        }
        result.history.append(record)
        if s.metrics_path:
            with open(s.metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps({**record, "time": time.time()}) + "\n")
        self.report_fn(p.step, {**record, "sample": text})
        self.window_start, self.window_steps = time.perf_counter(), 0

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
