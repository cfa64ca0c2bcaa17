"""The training loop's core: batch, `train_step`, gradient transforms, `optimizer.step`.

Everything around the step (progress bar, evaluation, checkpoints, reports, early stopping)
is a `Callback` called after each step; a callback asks the loop to stop through
`loop.control`, never by raising. Interrupt handling is injected (`charrnn.interrupts`), so a
caller that is not the CLI decides what Ctrl+C means, and a `World` makes the run span several
processes: gradients are averaged by a transform, and the loss and stop requests are shared by
one tiny allreduce per step, so every rank takes the same decisions at the same step.

The corpus is cut into `batch_size` contiguous streams; each step trains on the next
`seq_length` characters of every stream, carrying the hidden state from chunk to chunk (as
char-rnn does), and resets it when the streams wrap around (a new epoch).
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from charrnn.errors import CharrnnError, PluginFailure, TrainingError
from charrnn.interrupts import Aborted, Interrupts, NoInterrupts
from charrnn.transforms import Transform
from charrnn.types import Model, Optimizer, Schedule, State
from charrnn.world import LocalWorld, World, rows


class Diverged(TrainingError):
    """The loss, the validation loss or the parameters became non-finite: nothing is saved."""


@dataclass
class TrainState:
    """Everything besides parameters and optimizer state that exact resume needs.

    `state` holds this process's rows of the carried hidden state.
    """

    step: int = 0
    position: int = 0
    smooth_loss: float | None = None
    rng_state: dict[str, Any] | None = None
    state: State | None = None
    best_val: float | None = None
    bad_evals: int = 0


@dataclass
class Control:
    """How callbacks talk back to the loop: `stop(reason)` ends the run after this step."""

    should_stop: bool = False
    reason: str = ""

    def stop(self, reason: str) -> None:
        if not self.should_stop:
            self.should_stop, self.reason = True, reason


@dataclass
class TrainResult:
    """What a training run hands back."""

    steps: int
    train_loss: float | None
    val_loss: float | None
    best_val_loss: float | None = None
    stopped_early: bool = False  # by Ctrl+C or early stopping
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0  # wall time of the loop, reports and checkpoints included
    chars: int = 0  # characters trained on in this run, all processes together


class Callback:
    """Something that happens around the step; override what you need (all are no-ops).

    `on_step_end` runs after every step, so keep it cheap: check your own interval first. At
    the step that ends the run (`loop.ending`), callbacks run in list order: evaluate, then
    save, then report, so an engine that stops the run at its last report keeps the model.
    """

    def on_train_begin(self, loop: Loop) -> None:
        """Before the first step (after resume)."""

    def on_step_end(self, loop: Loop) -> None:
        """After each step's update."""

    def on_abort(self, loop: Loop) -> None:
        """After a second Ctrl+C or SIGTERM, before the loop raises `Aborted`: save now."""

    def on_exception(self, loop: Loop, exc: Exception) -> None:
        """A plugin failed inside the loop (one process, parameters intact): keep what is good."""

    def on_train_end(self, loop: Loop) -> None:
        """After the last step, or after an error or abort: release what you hold."""


class Batches:
    """One process's view of the corpus: its rows of the (B, L) layout that one process uses."""

    def __init__(self, ids: np.ndarray, batch_size: int, seq_length: int, world: World) -> None:
        self.batch_size, self.seq_length = batch_size, seq_length
        self.stream_len = L = (len(ids) - 1) // batch_size
        mine = rows(world, batch_size)
        self.inputs = ids[: batch_size * L].reshape(batch_size, L)[mine]  # (B/W, L) views, no copy
        self.targets = ids[1 : batch_size * L + 1].reshape(batch_size, L)[mine]
        self.local_batch = mine.stop - mine.start


class Loop:
    """One training run of `model` with `optimizer` over `batches`, until `steps` (None: until stopped)."""

    def __init__(
        self,
        model: Model,
        optimizer: Optimizer,
        batches: Batches,
        *,
        steps: int | None,
        seed: int,
        transform: Transform | None = None,
        schedule: Schedule | None = None,
        callbacks: Sequence[Callback] = (),
        world: World | None = None,
        interrupts: Interrupts | None = None,
        labels: dict[str, str] | None = None,
    ) -> None:
        """`labels` name the plugin behind each component (`model`, `optimizer`, `schedule`,
        `sampler`) in failure messages: `plugin 'p' (model 'rnn')`."""
        self.model, self.optimizer, self.batches = model, optimizer, batches
        self.labels = labels or {}
        self.steps, self.seed = steps, seed
        self.transform, self.schedule = transform, schedule
        self.callbacks = list(callbacks)
        self.world = world or LocalWorld()
        self.interrupts = interrupts or NoInterrupts()
        self.control = Control()
        self.state = TrainState()
        self.base_lr = getattr(optimizer, "lr", None)
        self.lr = self.base_lr
        self.chars_per_step = batches.batch_size * batches.seq_length  # all processes together
        self.result = TrainResult(0, None, None)
        self.stderr: Any = None  # where the caller's console writes
        self.torn = False  # an optimizer update raised half-way
        self.error: BaseException | None = None  # what ended the run, if something did
        # the clock of the current speed window; time spent saving or evaluating is left out
        self.window_start, self.window_steps, self._paused = time.perf_counter(), 0, 0.0
        self._pausing = False

    # -- what callbacks read ------------------------------------------------------------------

    @property
    def ending(self) -> bool:
        """Whether this step is the run's last (train.steps reached, or a stop was asked for)."""
        return self.control.should_stop or (self.steps is not None and self.state.step >= self.steps)

    def speed(self) -> float:
        """Training chars/s since the last report (the time of saves and evaluations left out)."""
        seconds = time.perf_counter() - self.window_start - self._paused
        return self.window_steps * self.chars_per_step / seconds if seconds > 0 else 0.0

    def new_window(self) -> None:
        self.window_start, self.window_steps, self._paused = time.perf_counter(), 0, 0.0

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside does not count as training time (nested pauses count once)."""
        if self._pausing:
            yield
            return
        start, self._pausing = time.perf_counter(), True
        try:
            yield
        finally:
            self._paused += time.perf_counter() - start
            self._pausing = False

    # -- the loop ------------------------------------------------------------------------------

    def run(self, state: TrainState | None = None) -> TrainResult:
        st = self.state = state or TrainState()
        model, optimizer, world, b = self.model, self.optimizer, self.world, self.batches
        T, B, L = b.seq_length, b.local_batch, b.stream_len
        rng = np.random.default_rng([self.seed, 1] if world.rank == 0 else [self.seed, 1, world.rank])
        if st.rng_state is not None:
            rng.bit_generator.state = st.rng_state
        self.rng = rng
        if st.state is None:
            st.state = model.init_state(B)
        start_step = st.step
        result = self.result = TrainResult(st.step, st.smooth_loss, None, st.best_val)
        # a model that uses randomness in training (dropout) takes the loop's generator
        step_kwargs = {"rng": rng} if "rng" in inspect.signature(model.train_step).parameters else {}
        schedule, base_lr, transform, params = self.schedule, self.base_lr, self.transform, model.params
        inputs, targets, interrupts = b.inputs, b.targets, self.interrupts
        # only the callbacks that act after a step are called after each step
        step_callbacks = [
            cb.on_step_end for cb in self.callbacks if type(cb).on_step_end is not Callback.on_step_end
        ]
        shared = np.zeros(3) if world.size > 1 else None  # [loss, stop asked, abort asked], summed
        started = time.perf_counter()
        self.new_window()
        try:
            with interrupts, np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                for cb in self.callbacks:
                    cb.on_train_begin(self)
                while not self.ending:
                    if shared is None and interrupts.abort is not None:  # asked during the callbacks
                        self._abort(interrupts.abort)
                    if st.position + T > L:
                        st.position, st.state = 0, model.init_state(B)  # new epoch
                    if schedule is not None:
                        try:
                            self.lr = optimizer.lr = base_lr * schedule(st.step, self.steps)  # type: ignore[attr-defined]
                        except Exception as exc:
                            raise self.failure("schedule", exc) from exc
                    chunk = slice(st.position, st.position + T)
                    try:  # zero-cost unless it raises (Python 3.11+)
                        loss, grads, new_state = model.train_step(
                            inputs[:, chunk], targets[:, chunk], st.state, **step_kwargs
                        )
                        loss = float(loss)
                    except Exception as exc:
                        raise self.failure("model", exc) from exc
                    stop, abort = interrupts.stop, interrupts.abort
                    if shared is not None:  # one decision for all ranks, taken from the same numbers
                        shared[:] = loss, stop, abort is not None
                        world.allreduce(shared)
                        loss, stop = float(shared[0]) / world.size, bool(shared[1])
                        abort = self._shared_abort(abort) if shared[2] else None
                    if not math.isfinite(loss):
                        raise Diverged(self.diverged(f"loss became {loss}", st.step + 1))
                    if transform is not None:
                        grads = transform(grads)
                    try:
                        optimizer.step(params, grads)
                    except BaseException as exc:
                        self.torn = True  # parameters half-updated: never saved
                        if isinstance(exc, Exception):
                            raise self.failure("optimizer", exc) from exc
                        raise
                    st.state, st.position, st.step = new_state, st.position + T, st.step + 1
                    st.smooth_loss = loss if st.smooth_loss is None else 0.99 * st.smooth_loss + 0.01 * loss
                    self.window_steps += 1
                    if abort is not None:
                        self._abort(abort)
                    if stop:
                        self.control.stop("interrupted")
                    for on_step_end in step_callbacks:
                        on_step_end(self)
        except TrainingError as exc:
            self.error = exc
            raise  # the loss or the parameters are bad: the last saved checkpoint stays as it was
        except Exception as exc:
            self.error = exc
            # a plugin (model, schedule, sampler, report hook) failed: keep the last good state
            if world.size == 1 and not self.torn and st.step > start_step:
                for cb in self.callbacks:
                    cb.on_exception(self, exc)
            raise
        finally:
            for cb in self.callbacks:
                cb.on_train_end(self)
        abort = interrupts.abort  # a second Ctrl+C or SIGTERM during the last step's saves
        if world.size > 1:  # on some rank: every rank leaves alike
            asked = world.allreduce(np.array([float(abort is not None)]))
            abort = self._shared_abort(abort) if asked[0] else None
        if abort is not None:
            raise Aborted(abort, f"interrupted at step {st.step}")
        result.stopped_early = self.control.should_stop
        result.steps, result.train_loss, result.best_val_loss = st.step, st.smooth_loss, st.best_val
        result.seconds = time.perf_counter() - started
        result.chars = (st.step - start_step) * self.chars_per_step
        return result

    def failure(self, kind: str, exc: Exception) -> Exception:
        """`exc`, raised by the `kind` component, as the failure of the plugin that provides it."""
        if isinstance(exc, (CharrnnError, PluginFailure)):
            return exc
        return PluginFailure(self.labels.get(kind, kind), exc)

    def _shared_abort(self, code: int | None) -> int:
        """The exit status of an abort that some ranks asked for: the largest asked (SIGTERM's 143
        over Ctrl+C's 130), on every rank; a collective, called by all ranks at once."""
        codes = self.world.broadcast(self.world.gather(code))
        return max(c for c in codes if c is not None)

    def _abort(self, code: int) -> None:
        self.control.stop("interrupted")
        for cb in self.callbacks:
            cb.on_abort(self)
        raise Aborted(code, f"interrupted at step {self.state.step}")

    def diverged(self, what: str, step: int) -> str:
        """`what` happened at `step`: the one-line message, saying which checkpoint is kept."""
        kept = next(
            (k for cb in self.callbacks if (k := getattr(cb, "kept", lambda: None)()) is not None), None
        )
        return (
            f"{what} at step {step}; training stopped and "
            f"{kept or 'no checkpoint was saved before it (train.save_every keeps regular ones)'}; "
            "try a lower learning rate or tighter clipping"
        )
