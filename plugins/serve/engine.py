"""The server's worker: one thread per model admits requests into charrnn's generation engine.

The engine (`charrnn.engine.Batch`) steps the rows of every admitted request together, one model
call per character, exactly as `charrnn generate` runs one request, so a seed gives the same text
through the API as on the command line. What is the server's own is here: a waiting queue with a
bound (429 beyond it), admission between chunks up to `max_batch` rows, the events each HTTP
request's thread reads (text as it is made, a finished choice, the end, an error), cancellation
when a client goes away, and a shutdown that cuts the open generations at their next chunk.
"""

from __future__ import annotations

import collections
import queue
import threading
from dataclasses import dataclass

from charrnn.engine import Batch, Request, Scores
from charrnn.loaded import LoadedModel


class QueueFull(Exception):
    """The waiting queue is full: the client should retry later (429)."""


class Stopping(Exception):
    """The server is shutting down and takes no new work (503)."""


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
    """One HTTP request: an engine request per prompt, the events for its thread, a cancel flag.

    Choice indexes run over the prompts' rows in order (prompt i's row r is choice i * n + r).
    """

    def __init__(self, requests: list[Request], stream: bool) -> None:
        self.requests, self.stream = requests, stream
        self.events: queue.SimpleQueue[Event] = queue.SimpleQueue()  # C put/get: no Condition per event
        self.cancelled = threading.Event()
        self.rows = sum(r.n for r in requests)
        self.remaining = len(requests)
        self.first: dict[int, int] = {}  # id(request) -> the choice index of its row 0
        index = 0
        for r in requests:
            self.first[id(r)] = index
            r.cancelled = self.cancelled.is_set
            if stream:
                r.on_text = self._emitter(index)
            index += r.n

    def _emitter(self, first: int):
        return lambda row, text: self.events.put(Event("text", first + row, text))

    def put(self, event: Event) -> None:
        self.events.put(event)


class Engine:
    """The worker thread of one model: admits queued jobs into the batch and steps it."""

    def __init__(
        self, loaded: LoadedModel, *, max_batch: int = 64, queue_size: int = 64, chunk: int = 16
    ) -> None:
        self.loaded, self.max_batch, self.queue_size = loaded, max_batch, queue_size
        self.batch = Batch(loaded.model, loaded.vocab, chunk=chunk, model_label=loaded.model_label)
        self.waiting: collections.deque[Job] = collections.deque()
        self.cond = threading.Condition()
        self.stopping = False
        self.jobs: dict[int, Job] = {}  # id(request) -> its job
        self.thread = threading.Thread(target=self._run, name=f"charrnn-serve-{loaded.path}", daemon=True)
        self.thread.start()

    @property
    def groups(self) -> list[Request]:
        """The requests generating now (in row order)."""
        return self.batch.requests

    @property
    def steps(self) -> int:
        """Model steps run so far (tests and the benchmark count them)."""
        return self.batch.steps

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
        return self.batch.rows

    # -- the worker ------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.batch.requests and not self.waiting and not self.stopping:
                    self.cond.wait()
                admitted = self._admit() if not self.stopping else []
                stopping, refused = self.stopping, []
                if stopping:
                    refused, self.waiting = list(self.waiting), collections.deque()
            for job in refused:
                job.put(Event("error", error=Stopping("the server is shutting down")))
            if stopping:  # a cut text is not a finished one: its request is told why it ends
                cut = Stopping("the server is shutting down: the text was cut before its end")
                for request in self.batch.drop(lambda r: True):
                    request.error = cut
                    self._ended(request)
                return
            for job in admitted:
                self.jobs.update({id(r): job for r in job.requests})
                for request in self.batch.add(job.requests):
                    self._ended(request)
            for request in self.batch.drop(lambda r: self.jobs[id(r)].cancelled.is_set()):
                self._ended(request, gone=True)
            if self.batch.requests:
                for request in self.batch.step():
                    self._ended(request)

    def _admit(self) -> list[Job]:
        """Jobs that fit in the batch now (one at least, however big, when the batch is empty)."""
        out, rows = [], self.batch.rows
        while self.waiting and (rows == 0 or rows + self.waiting[0].rows <= self.max_batch):
            job = self.waiting.popleft()
            out.append(job)
            rows += job.rows
        return out

    def _ended(self, request: Request, gone: bool = False) -> None:
        """Hand over a request's outcome; its job ends with its last request (or its first error)."""
        job = self.jobs.pop(id(request), None)
        if job is None or job.remaining < 0:  # its job failed already: nobody waits for this one
            return
        if request.error is not None:
            job.remaining = -1  # the job is over: no "done"; its other requests leave
            job.cancelled.set()
            job.put(Event("error", error=request.error))
            return
        if not gone:
            first, cut = job.first[id(request)], len(request.seed_text)
            for row, (text, reason) in enumerate(zip(request.texts, request.reasons, strict=True)):
                scores = request.scores[row] if request.logprobs is not None else None
                job.put(Event("finish", first + row, text[cut:], reason, scores, request.prompt_scores))
        job.remaining -= 1
        if job.remaining == 0:
            job.put(Event("done"))
