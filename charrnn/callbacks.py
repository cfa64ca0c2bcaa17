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
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from tqdm import tqdm

from charrnn import checkpoint as ckpt_io
from charrnn.errors import CharrnnError, ConfigError, PluginFailure
from charrnn.evaluation import EVAL_STREAMS, evaluate
from charrnn.files import atomic_write
from charrnn.generate import generate
from charrnn.loop import Callback, Diverged, Loop
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
        check_finite(loop, {**loop.model.params, **(st.state or {})})  # a NaN model is never "best"
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
                raise Diverged(loop.diverged(f"the validation loss became {val}", st.step))
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
    and when the run is aborted. Rank 0 writes what all ranks hold (state rows gathered); the
    other ranks wait until it has, so none leaves the job while the file is half-written."""

    def __init__(
        self,
        path: str,
        meta: dict[str, Any],
        every: int | None = None,
        saved: Callable[[str, int], None] = lambda path, step: None,
        log: Callable[[str], None] = lambda message: None,
    ) -> None:
        self.path, self.meta, self.every, self.saved, self.log = path, meta, every, saved, log
        self.saved_at: list[int] = []
        self.started = time.time()
        self.saving = False  # a save that raised half-way leaves nothing to retry

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

    def on_exception(self, loop: Loop, exc: Exception) -> None:
        step = loop.state.step
        if self.saving or self.saved_at[-1:] == [step]:
            return
        try:
            self.save(loop)
        except Exception as failure:  # the error being raised matters more; say why nothing was saved
            self.log(f"could not save step {step} before the error: {failure}")
        else:
            self.log(f"saved step {step} to {self.path} before the error")

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
                check_finite(loop, {**params, **state})  # non-finite parameters are never saved
                self.saving = True
                meta = ckpt_io.run_meta(
                    self.meta,
                    step=st.step,
                    data_position=st.position,
                    smooth_loss=st.smooth_loss,
                    rng=st.rng_state,
                    rng_ranks=rng_states if world.size > 1 else None,
                    best_val_loss=st.best_val,
                    bad_evals=st.bad_evals,
                    world_size=world.size,
                    saved_at=time.time(),
                    elapsed_seconds=time.time() - self.started,
                    chars_per_sec=loop.speed(),
                    val_loss=loop.result.val_loss,
                )
                optim = optimizer_state(loop)
                ckpt_io.save(path, ckpt_io.Checkpoint(params=params, meta=meta, optim=optim, state=state))
                self.saving = False
                self.saved(path, st.step)
            if world.size > 1:
                world.broadcast(st.step)  # the other ranks go on once rank 0's file is complete
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
        plot_path: str | None = None,
        name: str = "",
    ) -> None:
        """`name` is the run's (`RunFiles.name`), the label of its loss picture."""
        self.every, self.console, self.evaluator = every, console, evaluator
        self.sampler, self.vocab, self.sample_length = sampler, vocab, sample_length
        self.metrics_path, self.report, self.show_lr = metrics_path, report, show_lr
        self.plot_path, self.name = plot_path, name

    def on_train_begin(self, loop: Loop) -> None:
        """A fresh run starts the metrics file anew; a resumed one keeps the lines up to its step.

        Lines a later run wrote beyond the resumed step, the end-of-run report of the stopped
        run (unless it fell on a regular report step) and lines torn by a crash are dropped, so
        the file reads as if the run had never stopped.
        """
        path, start = self.metrics_path, loop.state.step
        if not path:
            return
        kept: list[str] = []
        if start > 0:
            try:
                lines = Path(path).read_text(encoding="utf-8").splitlines()
            except FileNotFoundError:
                lines = []
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"train.metrics: cannot read {path} to resume it: {exc}") from None
            regular = [n for n in (self.every, self.evaluator.every if self.evaluator else None) if n]
            for line in lines:
                try:
                    step = json.loads(line)["step"]
                except (ValueError, KeyError, TypeError):
                    continue
                if not isinstance(step, int) or isinstance(step, bool):
                    continue
                if step < start or (step == start and any(step % n == 0 for n in regular)):
                    kept.append(line)
        with atomic_write(path, "metrics file", ConfigError) as f:
            f.write("".join(line + "\n" for line in kept).encode("utf-8"))

    def on_step_end(self, loop: Loop) -> None:
        step = loop.state.step
        with_sample = bool(self.every) and step % self.every == 0
        evaluated = self.evaluator is not None and self.evaluator.at == step
        if with_sample or evaluated or (loop.ending and loop.window_steps):
            self.emit(loop, with_sample)

    def emit(self, loop: Loop, with_sample: bool) -> None:
        st, speed = loop.state, loop.speed()
        if loop.lr is not None and not math.isfinite(loop.lr):
            raise Diverged(loop.diverged(f"the learning rate became {loop.lr}", st.step))
        check_finite(loop, {**loop.model.params, **(st.state or {})})
        ev = self.evaluator
        val = ev.value if ev is not None and ev.at == st.step else None
        text = None
        if with_sample and self.sample_length and self.sampler is not None and self.vocab is not None:
            rng = np.random.default_rng([loop.seed, 3, st.step])
            labels = {k: v for k, v in loop.labels.items() if k in ("model", "sampler")}
            text = generate(loop.model, self.sampler, self.vocab, rng, "", self.sample_length, labels=labels)[
                0
            ]
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
        self.write_metrics(record)
        self.write_plot(loop)
        self.report(st.step, {**record, "sample": text})
        loop.new_window()

    def write_metrics(self, record: dict[str, Any]) -> None:
        """Append one strict-JSON line; a failed write (full disk) warns once and training goes on."""
        if not self.metrics_path:
            return
        line = json.dumps({**record, "time": time.time()}, allow_nan=False)
        try:
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write(line + "\n")
        except OSError as exc:
            self.console.log(
                f"warning: cannot write the metrics file {self.metrics_path}: {exc.strerror or exc}; "
                "training goes on without it"
            )
            self.metrics_path = None

    def write_plot(self, loop: Loop) -> None:
        """Redraw `<checkpoint>.loss.svg` from the metrics file (the whole run, resumes included)
        or this run's history; a failed write warns once and training goes on."""
        if not self.plot_path:
            return
        from charrnn.plot import write_loss_svg

        try:
            write_loss_svg(
                self.metrics_path or loop.result.history,
                self.plot_path,
                labels=[self.name],
            )
        except (OSError, CharrnnError) as exc:
            self.console.log(f"warning: cannot draw {self.plot_path}: {exc}; training goes on without it")
            self.plot_path = None


class RunHooks(Callback):
    """The `charrnn_train_start` and `charrnn_train_end` hooks, for loggers (rank 0)."""

    def __init__(self, call: Callable[..., Any], config: dict[str, Any], checkpoint: str) -> None:
        self.call, self.config, self.checkpoint = call, config, checkpoint
        self.started = False

    def on_train_begin(self, loop: Loop) -> None:
        self.call("charrnn_train_start", config=self.config, checkpoint=self.checkpoint, step=loop.state.step)
        self.started = True

    def on_train_end(self, loop: Loop) -> None:
        if not self.started:
            return
        st, result = loop.state, loop.result
        finished = loop.steps is not None and st.step >= loop.steps
        reason = (
            "error" if loop.error is not None else loop.control.reason or ("steps" if finished else "error")
        )
        metrics = {"train_loss": st.smooth_loss, "val_loss": result.val_loss, "best_val_loss": st.best_val}
        try:
            self.call(
                "charrnn_train_end", checkpoint=self.checkpoint, step=st.step, metrics=metrics, reason=reason
            )
        except Exception:
            if reason != "error":
                raise  # during an error, that error is the one to report


def check_finite(loop: Loop, arrays: dict[str, np.ndarray]) -> None:
    """Raise Diverged if a parameter or the carried state holds NaN or inf (at saves and reports)."""
    bad = [name for name, value in arrays.items() if not np.isfinite(value).all()]
    if bad:
        raise Diverged(loop.diverged(f"{', '.join(sorted(bad))} became non-finite", loop.state.step))


def optimizer_state(loop: Loop) -> dict[str, np.ndarray]:
    """The optimizer's `state_dict()`, checked: arrays of numbers only, so the checkpoint loads."""
    label = loop.labels.get("optimizer", "optimizer")
    try:
        state = loop.optimizer.state_dict()
    except Exception as exc:
        raise PluginFailure(label, exc) from exc
    if not isinstance(state, dict):
        raise PluginFailure(label, f"state_dict() returned {type(state).__name__}, not a dict of arrays")
    for name, value in state.items():
        kind = (
            np.asarray(value).dtype.kind if isinstance(value, (np.ndarray, np.generic, int, float)) else "O"
        )
        if not isinstance(name, str) or kind not in "fiub":
            raise PluginFailure(
                label, f"state_dict() holds {name!r}: {type(value).__name__}, not an array of numbers"
            )
    return state
