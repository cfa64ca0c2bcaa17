"""The training loop: minibatches of parallel streams, truncated BPTT, reports, checkpoints.

The corpus is cut into `batch_size` contiguous streams; each step trains on the next
`seq_length` characters of every stream, carrying the hidden state from chunk to chunk
(as char-rnn does), and resets it when the streams wrap around (a new epoch).
"""

from __future__ import annotations

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
from charrnn.generate import sample
from charrnn.types import Corpus, Model, Optimizer, Sampler

LN2 = math.log(2)


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
    seed_text: str = "\n"


@dataclass
class Progress:
    """Everything besides parameters and optimizer state that exact resume needs."""

    step: int = 0
    position: int = 0
    smooth_loss: float | None = None
    rng_state: dict[str, Any] | None = None
    state: dict[str, np.ndarray] | None = None


@dataclass
class TrainResult:
    steps: int
    train_loss: float | None
    val_loss: float | None
    stopped_early: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0  # wall time of the loop, reports and checkpoints included
    chars: int = 0  # characters trained on in this run


class Trainer:
    """Owns one training run; `save` is called by the loop at checkpoint times."""

    def __init__(
        self,
        model: Model,
        optimizer: Optimizer,
        sampler: Sampler,
        vocab: Corpus,
        train_ids: np.ndarray,
        val_ids: np.ndarray | None,
        settings: TrainSettings,
        save: Callable[[Progress, dict[str, Any]], None],
        report: Callable[[int, dict[str, Any]], None] = lambda step, metrics: None,
        stderr: TextIO | None = None,
    ) -> None:
        self.model, self.optimizer, self.sampler = model, optimizer, sampler
        self.vocab, self.settings = vocab, settings
        self.save_fn, self.report_fn = save, report
        self.stderr = stderr if stderr is not None else sys.stderr
        B = settings.batch_size
        self.stream_len = (len(train_ids) - 1) // B
        L = self.stream_len
        self.inputs = train_ids[: B * L].reshape(B, L)  # (B, L) views, no copy
        self.targets = train_ids[1 : B * L + 1].reshape(B, L)
        self.val_ids = val_ids
        self._bar: tqdm | None = None

    def log(self, message: str) -> None:
        if self._bar is not None:
            self._bar.write(message, file=self.stderr)
        else:
            print(message, file=self.stderr, flush=True)

    def run(self, progress: Progress) -> TrainResult:
        s = self.settings
        T = s.seq_length
        rng = np.random.default_rng([s.seed, 1])
        if progress.rng_state is not None:
            rng.bit_generator.state = progress.rng_state
        state = progress.state if progress.state is not None else self.model.init_state(s.batch_size)
        step, pos, smooth = progress.step, progress.position, progress.smooth_loss
        result = TrainResult(step, smooth, None)
        started = time.perf_counter()
        tty = self.stderr.isatty()
        self._bar = (
            tqdm(
                total=s.steps,
                initial=step,
                unit="step",
                file=self.stderr,
                disable=not tty,
                dynamic_ncols=True,
                desc="train",
            )
            if tty
            else None
        )
        chars_per_step = s.batch_size * T
        train_time, window_steps, last_post = 0.0, 0, 0.0
        speed = 0.0

        saved_at: list[int] = []

        def checkpoint(extra: dict[str, Any]) -> None:
            saved_at.append(step)
            self.save_fn(
                Progress(step, pos, smooth, rng.bit_generator.state, state),
                {"chars_per_sec": speed, "val_loss": result.val_loss, **extra},
            )

        # overflow shows up as a non-finite loss, which stops training with a clear message
        with (
            Interrupts(self.log) as interrupts,
            np.errstate(over="ignore", invalid="ignore", divide="ignore"),
        ):
            try:
                while s.steps is None or step < s.steps:
                    if interrupts.stop:
                        break
                    if pos + T > self.stream_len:
                        pos, state = 0, self.model.init_state(s.batch_size)  # new epoch
                    t0 = time.perf_counter()
                    interrupts.critical = True
                    loss, grads, new_state = self.model.train_step(
                        self.inputs[:, pos : pos + T], self.targets[:, pos : pos + T], state
                    )
                    if not math.isfinite(loss):
                        interrupts.critical = False
                        kept = (
                            f"the checkpoint of step {saved_at[-1]} in {s.checkpoint} is kept"
                            if saved_at
                            else "no checkpoint was saved before it (train.save_every keeps regular ones)"
                        )
                        raise TrainingError(
                            f"loss became {loss} at step {step + 1}; training stopped and {kept}; "
                            "try a lower learning rate or tighter clipping"
                        )
                    self.optimizer.step(self.model.params, grads)
                    state, pos, step = new_state, pos + T, step + 1
                    smooth = loss if smooth is None else 0.99 * smooth + 0.01 * loss
                    interrupts.critical = False
                    dt = time.perf_counter() - t0
                    train_time += dt
                    window_steps += 1
                    if interrupts.abort is not None:
                        break
                    if self._bar is not None:
                        self._bar.update(1)
                        if t0 - last_post > 0.5:
                            last_post = t0
                            speed = window_steps * chars_per_step / max(train_time, 1e-9)
                            self._bar.set_postfix_str(
                                f"loss {smooth:.3f} | {speed:,.0f} chars/s", refresh=False
                            )
                    if s.sample_every and step % s.sample_every == 0:
                        speed = window_steps * chars_per_step / max(train_time, 1e-9)
                        train_time, window_steps = 0.0, 0
                        result.val_loss = self._report(step, smooth, speed, result)
                    if s.save_every and step % s.save_every == 0:
                        checkpoint({})
                if window_steps:
                    speed = window_steps * chars_per_step / max(train_time, 1e-9)
                result.steps, result.train_loss = step, smooth
                if interrupts.abort is None and (not s.sample_every or step % s.sample_every != 0):
                    if step > progress.step:
                        result.val_loss = self._report(step, smooth, speed, result, with_sample=False)
                if not saved_at or saved_at[-1] != step:
                    checkpoint({})
            except Aborted as exc:
                if interrupts.critical:  # cannot happen (handler defers), kept for safety
                    raise
                result.steps, result.train_loss = step, smooth
                checkpoint({})
                self._close()
                raise Aborted(exc.code, f"interrupted: saved step {step} to {s.checkpoint}") from None
            finally:
                self._close()
            if interrupts.abort is not None:
                raise Aborted(interrupts.abort, f"interrupted: saved step {step} to {s.checkpoint}")
            result.stopped_early = interrupts.stop
            result.seconds = time.perf_counter() - started
            result.chars = (step - progress.step) * chars_per_step
            if interrupts.stop:
                self.log(f"stopped at step {step}; saved {s.checkpoint}")
        return result

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _report(
        self, step: int, smooth: float | None, speed: float, result: TrainResult, with_sample: bool = True
    ) -> float | None:
        val = self.evaluate() if self.val_ids is not None else None
        text = None
        if with_sample and self.settings.sample_length:
            rng = np.random.default_rng([self.settings.seed, 3, step])
            text = sample(self.model, self.sampler, self.vocab, rng, "", self.settings.sample_length)
        loss_txt = f"loss {smooth:.4f} nats/char ({smooth / LN2:.3f} bits/char)" if smooth is not None else ""
        val_txt = f" | val {val:.4f} ({val / LN2:.3f} bits)" if val is not None else ""
        total = f"/{self.settings.steps}" if self.settings.steps else ""
        self.log(f"step {step}{total} | {loss_txt}{val_txt} | {speed:,.0f} chars/s")
        if text is not None:
            self.log("----\n" + text + "\n----")
        metrics = {"train_loss": smooth, "val_loss": val, "chars_per_sec": speed, "sample": text}
        result.history.append({"step": step, **{k: v for k, v in metrics.items() if k != "sample"}})
        self.report_fn(step, metrics)
        return val

    def evaluate(self) -> float:
        """Mean loss over the whole validation split, in parallel streams with carried state."""
        return evaluate(self.model, self.val_ids, self.settings.batch_size, self.settings.seq_length)


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
