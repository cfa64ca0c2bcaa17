"""What happens around the training step: progress, evaluation, checkpoints, reports.

Each is a `charrnn.loop.Callback`. Side effects (the progress bar, log lines, samples, the
metrics file, report hooks, checkpoint files) happen on rank 0 only; decisions (best, patience)
are taken from numbers every rank shares, so all ranks stop at the same step.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

import numpy as np
from tqdm import tqdm

from charrnn import checkpoint as ckpt_io
from charrnn.errors import TrainingError
from charrnn.evaluation import EVAL_STREAMS, evaluate
from charrnn.generate import generate
from charrnn.loop import Callback, Loop
from charrnn.types import Corpus, Sampler

LN2 = math.log(2)


class Console:
    """Log lines on stderr that do not tear a progress bar."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.bar: tqdm | None = None

    def log(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)


class ProgressBar(Callback):
    """A tqdm bar with the smoothed loss and chars/s, on a terminal only."""

    def __init__(self, console: Console) -> None:
        self.console, self.last_post = console, 0.0

    def on_train_begin(self, loop: Loop) -> None:
        if self.console.stream.isatty():
            self.console.bar = tqdm(
                total=loop.steps,
                initial=loop.state.step,
                unit="step",
                file=self.console.stream,
                dynamic_ncols=True,
            )

    def on_step_end(self, loop: Loop) -> None:
        bar = self.console.bar
        if bar is not None:
            bar.update(1)
            if (now := time.perf_counter()) - self.last_post > 0.5:
                self.last_post = now
                bar.set_postfix_str(
                    f"loss {loop.state.smooth_loss:.3f} | {loop.speed():,.0f} chars/s", refresh=False
                )

    def on_train_end(self, loop: Loop) -> None:
        if self.console.bar is not None:
            self.console.bar.close()
            self.console.bar = None


class Evaluator(Callback):
    """Validation loss every `every` steps and at the end; keeps the best model; early stopping.

    Rank 0 evaluates the whole split and shares the number, so every rank decides alike.
    """

    def __init__(
        self,
        val_ids: np.ndarray,
        every: int | None,
        batch_size: int,
        seq_length: int,
        patience: int | None = None,
        save_best: Callable[[Loop], None] | None = None,
        log: Callable[[str], None] = lambda message: None,
    ) -> None:
        self.val_ids, self.every, self.patience = val_ids, every, patience
        self.batch_size, self.seq_length = max(batch_size, EVAL_STREAMS), seq_length
        self.save_best, self.log = save_best, log
        self.at: int | None = None  # the step of the last evaluation
        self.value: float | None = None
        self.best = False  # whether the last evaluation was the best so far

    def on_step_end(self, loop: Loop) -> None:
        st = loop.state
        if not ((self.every and st.step % self.every == 0) or loop.ending):
            return
        with loop.paused():
            val = (
                evaluate(loop.model, self.val_ids, self.batch_size, self.seq_length)
                if loop.world.rank == 0
                else 0.0
            )
            val = loop.world.broadcast(val)
            self.at, self.value, self.best = st.step, val, False
            loop.result.val_loss = val
            if not math.isfinite(val):
                raise TrainingError(loop.diverged(val, st.step))
            if st.best_val is None or val < st.best_val:
                st.best_val, st.bad_evals, self.best = val, 0, True
                if self.save_best is not None:
                    self.save_best(loop)
            else:
                st.bad_evals += 1
        if self.patience is not None and st.bad_evals >= self.patience:
            self.log(f"early stopping: no better validation loss in {self.patience} evaluations")
            loop.control.stop("early stopping")


class Checkpointer(Callback):
    """Writes the checkpoint every `every` steps, at the run's last step (before its report),
    and when the run is aborted. Rank 0 writes what all ranks hold (state rows gathered)."""

    def __init__(
        self,
        path: str,
        meta: dict[str, Any],
        every: int | None = None,
        saved: Callable[[str, int], None] = lambda path, step: None,
    ) -> None:
        self.path, self.meta, self.every, self.saved = path, meta, every, saved
        self.saved_at: list[int] = []
        self.started = time.time()

    def kept(self) -> str | None:
        if not self.saved_at:
            return None
        return f"the checkpoint of step {self.saved_at[-1]} in {self.path} is kept"

    def on_step_end(self, loop: Loop) -> None:
        step = loop.state.step
        if (self.every and step % self.every == 0) or loop.ending:
            self.save(loop)

    def on_abort(self, loop: Loop) -> None:
        if not self.saved_at or self.saved_at[-1] != loop.state.step:
            self.save(loop)

    def save(self, loop: Loop, path: str | None = None) -> None:
        """Write `loop`'s model and state to `path` (default: the checkpoint)."""
        path = path or self.path
        with loop.paused():
            st, world = loop.state, loop.world
            st.rng_state = loop.rng.bit_generator.state
            state_rows = world.gather(st.state)
            rng_states = world.gather(st.rng_state)
            if world.rank == 0:
                assert state_rows is not None and rng_states is not None
                state = {k: np.concatenate([rows[k] for rows in state_rows]) for k in state_rows[0]}
                params = loop.model.params
                if not all(np.isfinite(p).all() for p in params.values()):
                    raise TrainingError(
                        f"the parameters became non-finite at step {st.step}; nothing was saved over "
                        f"{path}; try a lower learning rate or tighter clipping"
                    )
                meta = {
                    **self.meta,
                    "step": st.step,
                    "data_position": st.position,
                    "smooth_loss": st.smooth_loss,
                    "rng": st.rng_state,
                    "best_val_loss": st.best_val,
                    "bad_evals": st.bad_evals,
                    "world_size": world.size,
                    "saved_at": time.time(),
                    "elapsed_seconds": time.time() - self.started,
                    "chars_per_sec": loop.speed(),
                    "val_loss": loop.result.val_loss,
                }
                if world.size > 1:
                    meta["rng_ranks"] = rng_states
                ckpt_io.save(
                    path,
                    ckpt_io.Checkpoint(
                        params=params, meta=meta, optim=loop.optimizer.state_dict(), state=state
                    ),
                )
                self.saved(path, st.step)
        if path == self.path:
            self.saved_at.append(st.step)


class Reporter(Callback):
    """A line (and a sample) every `every` steps and at the end: log, metrics file, report hook."""

    def __init__(
        self,
        every: int | None,
        console: Console,
        *,
        evaluator: Evaluator | None = None,
        sampler: Sampler | None = None,
        vocab: Corpus | None = None,
        sample_length: int = 0,
        metrics_path: str | None = None,
        report: Callable[[int, dict[str, Any]], None] = lambda step, metrics: None,
        show_lr: bool = False,
    ) -> None:
        self.every, self.console, self.evaluator = every, console, evaluator
        self.sampler, self.vocab, self.sample_length = sampler, vocab, sample_length
        self.metrics_path, self.report, self.show_lr = metrics_path, report, show_lr

    def on_step_end(self, loop: Loop) -> None:
        step = loop.state.step
        with_sample = bool(self.every) and step % self.every == 0
        evaluated = self.evaluator is not None and self.evaluator.at == step
        if with_sample or evaluated or (loop.ending and loop.window_steps):
            self.emit(loop, with_sample)

    def emit(self, loop: Loop, with_sample: bool) -> None:
        st, speed = loop.state, loop.speed()
        ev = self.evaluator
        val = ev.value if ev is not None and ev.at == st.step else None
        text = None
        if with_sample and self.sample_length and self.sampler is not None and self.vocab is not None:
            rng = np.random.default_rng([loop.seed, 3, st.step])
            text = generate(loop.model, self.sampler, self.vocab, rng, "", self.sample_length)[0]
        smooth = st.smooth_loss
        parts = [f"step {st.step}" + (f"/{loop.steps}" if loop.steps else "")]
        if smooth is not None:
            parts.append(f"loss {smooth:.4f} nats/char ({smooth / LN2:.3f} bits/char)")
        if val is not None:
            parts.append(
                f"val {val:.4f} ({val / LN2:.3f} bits)" + (" best" if ev is not None and ev.best else "")
            )
        if loop.lr is not None and self.show_lr:
            parts.append(f"lr {loop.lr:.3g}")
        parts.append(f"{speed:,.0f} chars/s")
        self.console.log(" | ".join(parts))
        if text is not None:
            self.console.log("----\n" + text + "\n----")
        record = {
            "step": st.step,
            "train_loss": smooth,
            "val_loss": val,
            "lr": loop.lr,
            "chars_per_sec": speed,
        }
        loop.result.history.append(record)
        if self.metrics_path:
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps({**record, "time": time.time()}) + "\n")
        self.report(st.step, {**record, "sample": text})
        loop.new_window()
