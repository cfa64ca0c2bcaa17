"""Batched generation for the server: one worker thread per model steps every admitted request at once.

A request becomes a `Job` of one `Group` per prompt; a group is `n` rows (the choices) that share
a sampler and an rng, as in `charrnn.generate.generate`. The worker keeps the rows of all
admitted groups in one batch state and runs one model step per character for all of them; each
group's sampler then draws its rows' ids from its slice of the logits with its own rng, so a
group's text depends on its seed only, not on what else runs in the batch (up to the rounding of
the batched product). Rows join and leave between chunks of `chunk` characters, which is also
when text is handed to the request threads and when a cancelled (disconnected) job is dropped.

A sampler that searches (`search`, beam) needs the model to itself: its group runs alone, whole,
between chunks.
"""

from __future__ import annotations

import collections
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from charrnn.errors import CharrnnError, PluginFailure
from charrnn.generate import TextStream, start_ids, stepper
from charrnn.loaded import LoadedModel
from charrnn.plugins import calling

Arrays = dict[str, np.ndarray]


class QueueFull(Exception):
    """The waiting queue is full: the client should retry later (429)."""


class Stopping(Exception):
    """The server is shutting down and takes no new work (503)."""


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities (k, V) in float64, stable (the max subtracted first)."""
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)  # (k, V)
    z -= np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return z


def top(logp: np.ndarray, n: int) -> list[tuple[int, float]]:
    """The `n` most likely ids of one distribution (V,), most likely first."""
    n = min(n, len(logp))
    ids = np.argpartition(-logp, n - 1)[:n] if n < len(logp) else np.arange(len(logp))
    ids = ids[np.argsort(-logp[ids], kind="stable")]
    return [(int(i), float(logp[i])) for i in ids]


@dataclass
class Scores:
    """The logprobs of one row: chosen id and its log-probability, and the top-N, per position."""

    ids: list[int] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)
    tops: list[list[tuple[int, float]] | None] = field(default_factory=list)
    next_top: list[tuple[int, float]] | None = None  # the distribution after the last id

    def add(self, logp: np.ndarray | None, chosen: int, n: int) -> None:
        self.ids.append(chosen)
        self.logprobs.append(None if logp is None else float(logp[chosen]))
        self.tops.append(None if logp is None else top(logp, n))


@dataclass
class Group:
    """One prompt of a request: `n` rows from one primed state, one sampler, one rng."""

    prompt: str
    sampler: Any
    rng: np.random.Generator
    n: int
    num_chars: int
    stop: list[str]
    logprobs: int | None  # top-N per position, or None
    echo: bool
    first_index: int  # the choice index of row 0
    labels: dict[str, str]
    streams: list[TextStream] = field(default_factory=list)
    scores: list[Scores] = field(default_factory=list)
    prompt_scores: Scores | None = None
    done: int = 0  # characters generated so far
    state: Arrays | None = None  # primed state (n rows) until the group joins the batch
    x: np.ndarray | None = None  # (n,) next inputs
    start: int = 0  # its first row in the batch


@dataclass
class Event:
    """What a job hands its request thread: text of a choice, a finished choice, the end or an error."""

    kind: str  # "text", "finish", "done", "error"
    index: int = 0
    text: str = ""
    reason: str | None = None
    scores: Scores | None = None
    prompt_scores: Scores | None = None
    error: BaseException | None = None


class Job:
    """One request: its groups, the events for its request thread, and a cancel flag."""

    def __init__(self, groups: list[Group], stream: bool) -> None:
        self.groups, self.stream = groups, stream
        self.events: queue.SimpleQueue[Event] = queue.SimpleQueue()  # C put/get: no Condition per event
        self.cancelled = threading.Event()
        self.rows = sum(g.n for g in groups)
        self.remaining = len(groups)

    def put(self, event: Event) -> None:
        self.events.put(event)


class Engine:
    """The worker thread of one model: admits queued jobs into the batch and steps it."""

    def __init__(
        self, loaded: LoadedModel, *, max_batch: int = 64, queue_size: int = 64, chunk: int = 16
    ) -> None:
        self.loaded, self.max_batch, self.queue_size, self.chunk = loaded, max_batch, queue_size, chunk
        self.vocab = loaded.vocab
        self.V = len(loaded.vocab.vocab)
        self.model_label = loaded.model_label
        self.waiting: collections.deque[Job] = collections.deque()
        self.cond = threading.Condition()
        self.stopping = False
        self.groups: list[Group] = []  # in the batch, in row order
        self.jobs: dict[int, Job] = {}  # id(group) -> its job
        self.step: Callable[[np.ndarray], np.ndarray] | None = None
        self.x = np.zeros(0, np.int64)
        self.steps = 0  # model steps run (for tests and the benchmark)
        # noise is float32 (as the samplers draw it): batch a model's rows only if its logits are too
        self.dtype = np.dtype(getattr(loaded.model, "dtype", None) or np.float64)
        self.thread = threading.Thread(target=self._run, name=f"charrnn-serve-{loaded.path}", daemon=True)
        self.thread.start()

    # -- the request side ------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        """Queue a job; `QueueFull` when `queue_size` jobs already wait, `Stopping` at shutdown."""
        with self.cond:
            if self.stopping:
                raise Stopping("the server is shutting down")
            if len(self.waiting) >= self.queue_size:
                raise QueueFull(f"{len(self.waiting)} requests are waiting for this model")
            self.waiting.append(job)
            self.cond.notify()

    def stop(self) -> None:
        """Take no more jobs; the worker cuts the running ones at the next chunk and ends."""
        with self.cond:
            self.stopping = True
            self.cond.notify()

    def busy_rows(self) -> int:
        return sum(g.n for g in self.groups)

    # -- the worker ------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.groups and not self.waiting and not self.stopping:
                    self.cond.wait()
                admitted = self._admit() if not self.stopping else []
                stopping, refused = self.stopping, []
                if stopping:
                    refused, self.waiting = list(self.waiting), collections.deque()
            for job in refused:
                job.put(Event("error", error=Stopping("the server is shutting down")))
            if stopping:  # a cut text is not a finished one: its request is told why it ends
                for group in list(self.groups):
                    self._fail(
                        group, Stopping("the server is shutting down: the text was cut before its end")
                    )
                self.groups = []
                return
            changed = self._join(admitted)
            changed |= self._leave(lambda g: self.jobs[id(g)].cancelled.is_set(), cancelled=True)
            if changed:
                self._rebuild()
            if self.groups:
                self._chunk()

    def _admit(self) -> list[Job]:
        """Jobs that fit in the batch now (one at least, however big, when the batch is empty)."""
        out, rows = [], self.busy_rows()
        while self.waiting and (rows == 0 or rows + self.waiting[0].rows <= self.max_batch):
            job = self.waiting.popleft()
            out.append(job)
            rows += job.rows
        return out

    def _join(self, jobs: list[Job]) -> bool:
        """Prime the groups of new jobs; searching samplers run whole now, the rest join the batch."""
        changed = False
        for job in jobs:
            for group in job.groups:
                self.jobs[id(group)] = job
                try:
                    self._prime(group)
                    if group.num_chars == 0 or job.cancelled.is_set():
                        self._finish(group)
                    elif hasattr(group.sampler, "search"):
                        self._search(group)
                        self._finish(group)
                    else:
                        self.groups.append(group)
                        changed = True
                except BaseException as exc:  # noqa: BLE001 - the job's error, not the worker's end
                    self._fail(group, exc)
        return changed

    def _prime(self, group: Group) -> None:
        """Feed the prompt to one stream (scoring it when echoed with logprobs), copy it n times."""
        model, n = self.loaded.model, group.n
        ids = start_ids(self.vocab, group.prompt)
        observe = getattr(group.sampler, "observe", None)
        if hasattr(group.sampler, "reset"):
            with calling(group.labels["sampler"]):
                group.sampler.reset(n)
        want = group.logprobs is not None
        scored = want and group.echo and bool(group.prompt)
        if scored:
            group.prompt_scores = Scores()
            group.prompt_scores.add(None, int(ids[0]), 0)
        with calling(group.labels["model"]):
            step = stepper(model, model.init_state(1))
            for i, row in enumerate(np.asarray(ids[:-1]).reshape(-1, 1)):
                logits = step(row)
                if scored:
                    group.prompt_scores.add(log_softmax(logits)[0], int(ids[i + 1]), group.logprobs)
            state = step.state()
            if want and group.num_chars == 0:  # the distribution after the prompt, for the page
                after = log_softmax(stepper(model, state)(ids[-1:]))[0]
                group.prompt_scores = group.prompt_scores or Scores()
                group.prompt_scores.next_top = top(after, group.logprobs)
        if observe is not None:
            with calling(group.labels["sampler"]):
                for i in ids:
                    observe(np.full(n, i))
        group.state = {name: np.repeat(a, n, axis=0) for name, a in state.items()}
        group.x = np.repeat(ids[-1:], n)
        job = self.jobs[id(group)]
        group.streams = [TextStream(group.stop, self.vocab) for _ in range(n)]
        group.scores = [Scores() for _ in range(n)]
        if job.stream:
            for r, stream in enumerate(group.streams):
                stream.emit = self._emitter(job, group.first_index + r)

    @staticmethod
    def _emitter(job: Job, index: int) -> Callable[[str], None]:
        return lambda text: job.put(Event("text", index, text))

    def _search(self, group: Group) -> None:
        with calling(group.labels["sampler"]):
            out = group.sampler.search(self.loaded.model, group.state, group.x, group.num_chars, group.rng)
        out = np.asarray(out)
        if out.shape != (group.n, group.num_chars) or out.dtype.kind not in "iu":
            raise PluginFailure(group.labels["sampler"], f"search returned shape {out.shape}")
        for stream, row in zip(group.streams, out, strict=True):
            stream.add(row)
        group.done = group.num_chars

    def _leave(self, gone: Callable[[Group], bool], cancelled: bool = False) -> bool:
        out = [g for g in self.groups if gone(g)]
        for group in out:
            self.groups.remove(group)
            if cancelled:
                self._end(group)
            else:
                self._finish(group)
        return bool(out)

    def _rebuild(self) -> None:
        """One stepper over the rows of every group in the batch (states taken out, joined)."""
        if not self.groups:
            self.step = None
            return
        current = self.step.state() if self.step is not None else None  # type: ignore[attr-defined]
        parts: list[Arrays] = []
        xs = []
        for group in self.groups:
            if group.state is None:  # already in the batch: its rows of the current state
                assert current is not None
                group.state = {k: a[group.start : group.start + group.n] for k, a in current.items()}
                group.x = self.x[group.start : group.start + group.n]
            parts.append(group.state)
            xs.append(group.x)
        start = 0
        for group in self.groups:
            group.start, group.state = start, None
            start += group.n
        state = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        self.x = np.concatenate(xs).astype(np.int64)
        with calling(self.model_label):
            self.step = stepper(self.loaded.model, state)

    def _chunk(self) -> None:
        """Up to `chunk` model steps for the whole batch; each group samples its own rows.

        Groups whose sampler states its noise (`perturb`: plain temperature, greedy) and want no
        logprobs are sampled together: their noise for the whole chunk is drawn once, and each
        step adds it to the shared logits and takes one argmax over the batch, so a step costs
        the same few calls however many requests run. Other groups call their sampler (and
        `observe`) per step, and a group whose sampler raises or returns ids outside the
        vocabulary fails alone.
        """
        assert self.step is not None
        n_steps = min(self.chunk, max(g.num_chars - g.done for g in self.groups))
        K, V = len(self.x), self.V
        out = np.empty((n_steps, K), np.int64)
        failed: list[tuple[Group, BaseException]] = []
        noise: np.ndarray | None = None  # (n_steps, K, V): the batched groups' noise
        called: list[list[Any]] = []  # [group, rows, sampler, rng, observe, characters left]
        for g in self.groups:
            rows = slice(g.start, g.start + g.n)
            perturb = getattr(g.sampler, "perturb", None)
            if perturb is not None and g.logprobs is None and self.dtype == np.float32:
                try:
                    p = perturb(g.rng, g.n, V, n_steps)
                    if p is not None:
                        if noise is None:
                            noise = np.zeros((n_steps, K, V), np.float32)
                        noise[:, rows] = p
                        continue
                except BaseException as exc:  # noqa: BLE001 - this group's job fails, others go on
                    failed.append((g, exc))
                    continue
            called.append(
                [g, rows, g.sampler, g.rng, getattr(g.sampler, "observe", None), g.num_chars - g.done]
            )
        x, step = self.x, self.step
        for t in range(n_steps):
            try:
                logits = step(x)  # (K, V), overwritten by the next call
            except BaseException as exc:  # noqa: BLE001 - every job in the batch fails with it
                failure = exc if isinstance(exc, CharrnnError) else PluginFailure(self.model_label, exc)
                for group in list(self.groups):
                    self._fail(group, failure)
                self.groups, self.step = [], None
                return
            new = out[t]
            if noise is not None:
                z = noise[t]
                z += logits
                z.argmax(1, out=new)  # rows of called groups: overwritten below
            else:
                new.fill(0)  # rows of failed groups feed id 0 until they leave
            if called:
                self._sample(called, logits, new, t, failed)
            x = new
        self.x = out[n_steps - 1].copy()
        self.steps += n_steps
        for group, exc in failed:
            if group in self.groups:
                self.groups.remove(group)
                self._fail(
                    group,
                    exc if isinstance(exc, CharrnnError) else PluginFailure(group.labels["sampler"], exc),
                )
        for group in self.groups:
            take = min(n_steps, group.num_chars - group.done)
            rows = out[:take, group.start : group.start + group.n].T  # (n, take)
            for stream, row in zip(group.streams, rows, strict=True):
                stream.add(row)
            group.done += take
        if self._leave(self._complete) or failed:
            self._rebuild()

    def _sample(
        self, called: list[list[Any]], logits: np.ndarray, new: np.ndarray, t: int, failed: list
    ) -> None:
        """One step of the groups that call their sampler: ids into `new`, scores, `observe`."""
        V = self.V
        for entry in called:
            group, rows, sampler, rng, observe, left = entry
            if t >= left:  # this group has its characters (or failed): its rows idle
                new[rows] = 0
                continue
            try:
                new[rows] = sampler(logits[rows], rng)  # (n,)
            except BaseException as exc:  # noqa: BLE001 - this group's job fails, others go on
                failed.append((group, exc))
                entry[5] = 0  # its rows idle from now on
                new[rows] = 0
        if new.min() < 0 or new.max() >= V:  # one check for all; then find whose ids they are
            for entry in called:
                ids = new[entry[1]]
                if ids.min() < 0 or ids.max() >= V:
                    failed.append((entry[0], ValueError(f"returned ids {ids!r} outside [0, {V})")))
                    entry[5] = 0
                    new[entry[1]] = 0
        for entry in called:
            group, rows, _, _, observe, left = entry
            if t >= left:  # done, or failed above
                continue
            ids = new[rows]
            try:
                if observe is not None:
                    observe(ids)
            except BaseException as exc:  # noqa: BLE001 - this group's job fails, others go on
                failed.append((group, exc))
                entry[5] = 0
                continue
            if group.logprobs is not None:
                logp = log_softmax(logits[rows])
                for r in range(group.n):
                    group.scores[r].add(logp[r], int(ids[r]), group.logprobs)

    @staticmethod
    def _complete(group: Group) -> bool:
        return group.done >= group.num_chars or all(s.stopped for s in group.streams)

    def _finish(self, group: Group) -> None:
        """Hand over each row's last text and its finish reason; the job ends with its last group."""
        job = self.jobs[id(group)]
        for r, stream in enumerate(group.streams):
            text = stream.finish()
            reason = "stop" if stream.stopped else "length"
            scores = group.scores[r] if group.logprobs is not None else None
            job.put(Event("finish", group.first_index + r, text, reason, scores, group.prompt_scores))
        self._end(group)

    def _end(self, group: Group) -> None:
        job = self.jobs.pop(id(group))
        job.remaining -= 1
        if job.remaining == 0:
            job.put(Event("done"))

    def _fail(self, group: Group, exc: BaseException) -> None:
        job = self.jobs.pop(id(group), None)
        if job is not None:
            job.remaining = -1  # the job is over: no "done"; its other groups leave
            job.cancelled.set()
            job.put(Event("error", error=exc))
