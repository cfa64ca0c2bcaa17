"""The one generation engine: the rows of many requests stepped together, one model call per step.

A `Request` is one prompt: `n` rows primed from it that share a sampler and an rng, with their
stop strings, streaming callback and optional log-probabilities. A `Batch` keeps the rows of every
request it holds in one batch state and runs one model step per character for all of them; each
request's sampler then draws its rows' ids from its slice of the logits with its own rng, so a
request's text depends on its seed only, not on what else runs in the batch (up to the rounding
of the batched product). Requests join and leave between chunks of steps.

Everything that generates goes through it: `charrnn.generate.generate` (one request, run to its
end), the training-time samples, `LoadedModel.generate`, `charrnn generate` and the server, whose
worker thread admits requests as they arrive (`charrnn_plugins.serve.engine`). So the id checks,
stop strings, memory estimates and the batched fast path exist once.

Samplers that state their noise (`perturb`: plain temperature, greedy) are sampled together: the
noise of a chunk is drawn once per request and each step is one add and one argmax for all of
them. Other samplers are called per step with their rows; their ids are checked then (shape,
integer type, range), before the model sees them, and a sampler that fails ends its request
alone. A sampler that searches (`search`, beam) needs the model to itself: its request runs whole
when it joins, and may stop early when its client is gone (`cancelled`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from charrnn.errors import CharrnnError, PluginFailure
from charrnn.memory import check as check_memory
from charrnn.plugins import calling
from charrnn.types import Corpus, Model, State

#: floats of sampling noise drawn at once for the requests of a chunk (4 MiB): bounds the steps of a
#: chunk for a wide batch or a large vocabulary
NOISE_FLOATS = 1 << 20


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
    """The log-probabilities of one row: each chosen id and its log-probability, and the top-N."""

    ids: list[int] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)
    tops: list[list[tuple[int, float]] | None] = field(default_factory=list)
    next_top: list[tuple[int, float]] | None = None  # the distribution after the last id

    def add(self, logp: np.ndarray | None, chosen: int, n: int) -> None:
        self.ids.append(chosen)
        self.logprobs.append(None if logp is None else float(logp[chosen]))
        self.tops.append(None if logp is None else top(logp, n))


class Cancelled(CharrnnError):
    """A request's caller went away (a client disconnected, the server stopped)."""


@dataclass
class Request:
    """One prompt: `n` rows primed from `seed_text`, one sampler, one rng, `num_chars` each.

    `on_text(row, text)` receives each row's text as it is made (after the stop strings are
    applied); `logprobs` asks for the top-N log-probabilities at each generated position, and
    `score_prompt` for those of the prompt's characters too (the first has none). `cancelled()`
    says the caller is gone. `labels` name the model's and the sampler's plugins in failures.
    When the request ends, `texts` (seed text and generated text per row), `reasons` ("stop" or
    "length" per row) or `error` are set.
    """

    seed_text: str
    sampler: Any
    rng: np.random.Generator
    num_chars: int
    n: int = 1
    stop: Sequence[str] = ()
    logprobs: int | None = None
    score_prompt: bool = False
    labels: Mapping[str, str] = field(default_factory=dict)
    on_text: Callable[[int, str], None] | None = None
    cancelled: Callable[[], bool] | None = None
    # the outcome
    texts: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    scores: list[Scores] = field(default_factory=list)
    prompt_scores: Scores | None = None
    error: BaseException | None = None
    done: int = 0  # characters generated so far
    # the batch's bookkeeping
    streams: list[Any] = field(default_factory=list)
    state: State | None = None  # the primed state (n rows) until the request joins the batch
    x: np.ndarray | None = None  # (n,) next inputs
    start: int = 0  # its first row in the batch

    @property
    def finished(self) -> bool:
        return bool(self.texts) or self.error is not None

    def is_cancelled(self) -> bool:
        return self.cancelled is not None and self.cancelled()


class Batch:
    """The requests generating together on one model, and the batched stepper over all their rows.

    `add` primes requests and takes them in, `step` runs up to `chunk` model steps for all rows,
    `drop` removes requests (their callers are gone); each returns the requests that ended.
    """

    def __init__(
        self, model: Model, vocab: Corpus, *, chunk: int = 16, model_label: str | None = None
    ) -> None:
        self.model, self.vocab, self.chunk = model, vocab, chunk
        self.V = len(vocab.vocab)
        self.model_label = model_label or f"model {type(model).__name__!r}"
        self.requests: list[Request] = []  # in the batch, in row order
        self.step_fn: Callable[[np.ndarray], np.ndarray] | None = None
        self.x = np.zeros(0, np.int64)
        self.steps = 0  # model steps run (tests, benchmarks)
        # the noise samplers state is float32: batch rows through it only when the logits are too
        self.dtype = np.dtype(getattr(model, "dtype", None) or np.float64)

    @property
    def rows(self) -> int:
        return sum(r.n for r in self.requests)

    def __len__(self) -> int:
        return len(self.requests)

    # -- joining -------------------------------------------------------------------------------

    def add(self, requests: Iterable[Request]) -> list[Request]:
        """Prime the requests; searching samplers run whole now. Returns the requests that ended
        already (nothing to generate, a search, a failure); the others are in the batch."""
        ended, joined = [], False
        for request in requests:
            try:
                self._prime(request)
                if request.num_chars == 0 or request.is_cancelled():
                    self._finish(request)
                elif hasattr(request.sampler, "search"):
                    self._search(request)
                else:
                    self.requests.append(request)
                    joined = True
                    continue
            except Exception as exc:  # noqa: BLE001 - this request's failure, not the batch's
                self._fail(request, exc)
            ended.append(request)
        if joined:
            self._rebuild()
        return ended

    def _prime(self, r: Request) -> None:
        """Feed the prompt to one stream (scoring it if asked), then copy that state to n rows."""
        check_memory(  # the texts are kept whole (and joined, and encoded for output)
            held_text_bytes(self.vocab, r.num_chars, r.n),
            f"generate.num_chars={r.num_chars}" + (f" with num_samples={r.n}" if r.n > 1 else ""),
            "the generated text, kept whole also when streamed",
            "; ask for fewer characters",
        )
        model_label, sampler_label = self._labels(r)
        ids = start_ids(self.vocab, r.seed_text)
        if hasattr(r.sampler, "reset"):
            with calling(sampler_label):
                r.sampler.reset(r.n)
        want = r.logprobs is not None
        scored = want and r.score_prompt and bool(r.seed_text)
        if scored:
            r.prompt_scores = Scores()
            r.prompt_scores.add(None, int(ids[0]), 0)
        with calling(model_label):
            step = stepper(self.model, self.model.init_state(1))
            for i, row in enumerate(np.asarray(ids[:-1]).reshape(-1, 1)):  # (1,) views, no array per id
                logits = step(row)
                if scored:
                    r.prompt_scores.add(log_softmax(logits)[0], int(ids[i + 1]), r.logprobs)  # type: ignore[union-attr]
            state = step.state()  # type: ignore[attr-defined]
            if want and r.num_chars == 0:  # the distribution after the prompt (the playground shows it)
                after = log_softmax(stepper(self.model, state)(ids[-1:]))[0]
                r.prompt_scores = r.prompt_scores or Scores()
                r.prompt_scores.next_top = top(after, r.logprobs)  # type: ignore[arg-type]
        observe = getattr(r.sampler, "observe", None)
        if observe is not None:
            with calling(sampler_label):
                for i in ids:
                    observe(np.full(r.n, i))
        r.state = {name: np.repeat(a, r.n, axis=0) for name, a in state.items()}
        r.x = np.repeat(ids[-1:], r.n)
        r.streams = [TextStream(r.stop, self.vocab) for _ in range(r.n)]
        r.scores = [Scores() for _ in range(r.n)]
        if r.on_text is not None:
            for row, stream in enumerate(r.streams):
                stream.emit = _emitter(r.on_text, row)

    def _search(self, r: Request) -> None:
        """A searching sampler's whole generation, with the model to itself."""
        search = r.sampler.search
        kwargs = {"cancelled": r.is_cancelled} if _accepts(search, "cancelled") else {}
        with calling(self._labels(r)[1]):
            out = search(self.model, r.state, r.x, r.num_chars, r.rng, **kwargs)
        if r.is_cancelled():
            raise Cancelled("the request was cancelled")
        out = checked_ids(out, (r.n, r.num_chars), self.V, self._labels(r)[1], "search returned")
        for stream, row in zip(r.streams, out, strict=True):
            stream.add(row)
        r.done = r.num_chars
        self._finish(r)

    def _rebuild(self) -> None:
        """One stepper over the rows of every request in the batch (states taken out, joined)."""
        if not self.requests:
            self.step_fn = None
            return
        current = self.step_fn.state() if self.step_fn is not None else None  # type: ignore[attr-defined]
        parts: list[State] = []
        xs = []
        for r in self.requests:
            if r.state is None:  # already in the batch: its rows of the current state
                assert current is not None
                r.state = {k: a[r.start : r.start + r.n] for k, a in current.items()}
                r.x = self.x[r.start : r.start + r.n]
            parts.append(r.state)
            xs.append(r.x)
        start = 0
        for r in self.requests:
            r.start, r.state = start, None
            start += r.n
        state = parts[0] if len(parts) == 1 else {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        self.x = np.concatenate(xs).astype(np.int64) if len(xs) > 1 else np.asarray(xs[0], np.int64)
        with calling(self.model_label):
            self.step_fn = stepper(self.model, state)

    # -- leaving -------------------------------------------------------------------------------

    def drop(self, gone: Callable[[Request], bool]) -> list[Request]:
        """Take out the requests for which `gone` holds (cancelled: they end without texts)."""
        out = [r for r in self.requests if gone(r)]
        if out:
            self.requests = [r for r in self.requests if r not in out]
            self._rebuild()
        return out

    # -- stepping ------------------------------------------------------------------------------

    def step(self) -> list[Request]:
        """Up to `chunk` model steps for every row; returns the requests that ended in them.

        Requests whose sampler states its noise and that want no log-probabilities are sampled
        together (see the module's docstring); the others call their sampler (and `observe`)
        per step with their rows, and one that fails or returns ids outside [0, V) ends alone.
        """
        if self.step_fn is None:
            return []
        K, V = len(self.x), self.V
        n_steps = min(self.chunk, max(r.num_chars - r.done for r in self.requests))
        n_steps = max(1, min(n_steps, NOISE_FLOATS // max(1, K * V)))
        out = np.empty((n_steps, K), np.int64)
        failed: list[tuple[Request, BaseException]] = []
        noise: np.ndarray | None = None  # (n_steps, K, V): the noise of the batched requests
        called: list[_Called] = []
        for r in self.requests:
            rows = slice(r.start, r.start + r.n)
            perturb = getattr(r.sampler, "perturb", None)
            if perturb is not None and r.logprobs is None and self.dtype == np.float32:
                try:
                    with calling(self._labels(r)[1]):
                        p = perturb(r.rng, r.n, V, n_steps)
                    if p is not None:
                        if noise is None:
                            noise = np.zeros((n_steps, K, V), np.float32)
                        noise[:, rows] = p  # a sampler giving its noise ignores `observe` meanwhile
                        continue
                except Exception as exc:  # noqa: BLE001 - this request fails, the others go on
                    failed.append((r, exc))
                    continue
            called.append(_Called(r, rows, getattr(r.sampler, "observe", None), r.num_chars - r.done))
        x, step = self.x, self.step_fn
        for t in range(n_steps):
            try:
                logits = step(x)  # (K, V), overwritten by the next call
            except Exception as exc:  # noqa: BLE001 - every request in the batch fails with it
                failure = (
                    exc
                    if isinstance(exc, (CharrnnError, PluginFailure))
                    else PluginFailure(self.model_label, exc)
                )
                ended = list(self.requests)
                for r in ended:
                    self._fail(r, failure)
                self.requests, self.step_fn = [], None
                return ended
            new = out[t]
            if noise is not None:
                z = noise[t]
                z += logits
                z.argmax(1, out=new)  # the called requests' rows are overwritten below
            if called:
                self._sample(called, logits, new, t, failed)
            x = new
        self.x = out[n_steps - 1].copy()
        self.steps += n_steps
        ended = []
        for r, exc in failed:
            if r in self.requests:
                self.requests.remove(r)
                self._fail(r, exc)
                ended.append(r)
        for r in self.requests:
            take = min(n_steps, r.num_chars - r.done)
            rows = out[:take, r.start : r.start + r.n].T  # (n, take)
            for stream, row in zip(r.streams, rows, strict=True):
                stream.add(row)
            r.done += take
        complete = [r for r in self.requests if r.done >= r.num_chars or all(s.stopped for s in r.streams)]
        for r in complete:
            self.requests.remove(r)
            self._finish(r)
        if complete or failed:
            self._rebuild()
        return ended + complete

    def _sample(
        self, called: list[_Called], logits: np.ndarray, new: np.ndarray, t: int, failed: list
    ) -> None:
        """One step of the requests that call their sampler: checked ids into `new`, scores, `observe`."""
        V = self.V
        for c in called:
            r, rows = c.request, c.rows
            if t >= c.left:  # this request has its characters (or failed): its rows idle
                new[rows] = 0
                continue
            try:
                ids = checked_ids(r.sampler(logits[rows], r.rng), (r.n,), V, self._labels(r)[1], "returned")
                new[rows] = ids
                if c.observe is not None:
                    c.observe(new[rows])
            except Exception as exc:  # noqa: BLE001 - this request fails, the others go on
                failed.append((r, exc))
                c.left = 0
                new[rows] = 0
                continue
            if r.logprobs is not None:
                logp = log_softmax(logits[rows])
                for i in range(r.n):
                    r.scores[i].add(logp[i], int(new[rows][i]), r.logprobs)

    # -- ending --------------------------------------------------------------------------------

    def _finish(self, r: Request) -> None:
        texts, reasons = [], []
        for stream in r.streams:
            texts.append(r.seed_text + stream.finish())
            reasons.append("stop" if stream.stopped else "length")
        r.texts, r.reasons = texts, reasons

    def _fail(self, r: Request, exc: BaseException) -> None:
        """End a request with its error; one that is not charrnn's words is its sampler's failure."""
        if not isinstance(exc, (CharrnnError, PluginFailure)):
            exc = PluginFailure(self._labels(r)[1], exc)
        r.error = exc

    def _labels(self, r: Request) -> tuple[str, str]:
        return (
            r.labels.get("model") or self.model_label,
            r.labels.get("sampler") or _label("sampler", r.sampler),
        )


@dataclass
class _Called:
    """A request in the chunk whose sampler is called per step, and the steps it still takes."""

    request: Request
    rows: slice
    observe: Callable[[np.ndarray], None] | None
    left: int


def run(
    requests: Sequence[Request],
    model: Model,
    vocab: Corpus,
    *,
    chunk: int = 256,
    model_label: str | None = None,
) -> None:
    """Generate every request to its end in one batch (their outcomes are set on them)."""
    batch = Batch(model, vocab, chunk=chunk, model_label=model_label)
    batch.add(requests)
    while batch.requests:
        batch.step()


# -- the pieces of a generation --------------------------------------------------------------------


def start_ids(vocab: Corpus, seed_text: str) -> np.ndarray:
    """The ids that prime the state: the seed text, or a newline (else id 0) when it is empty."""
    if seed_text:
        return vocab.encode(seed_text)
    return np.array([vocab.index.get("\n", 0) if vocab.encoding != "bytes" else 10], dtype=np.int64)


class StepAdapter:
    """A stepper (see `charrnn.types.Model.step`) for a model that has none: calls `model.step`."""

    def __init__(self, model: Model, state: State) -> None:
        self.model, self._state = model, state

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        logits, self._state = self.model.step(ids, self._state)
        return logits

    def state(self) -> State:
        return self._state


def stepper(model: Model, state: State) -> Callable[[np.ndarray], np.ndarray]:
    """The model's own stepper if it has one, else `StepAdapter`."""
    make = getattr(model, "stepper", None)
    return make(state) if make is not None else StepAdapter(model, state)


def checked_ids(ids: object, shape: tuple[int, ...], V: int, label: str, what: str) -> np.ndarray:
    """`ids` as int64 of `shape` with every id in [0, V); else the plugin that made them failed.

    NumPy would wrap a negative id around to the last character without a word, and an id >= V
    fails somewhere far from its cause; every id a sampler or a search returns passes here.
    """
    try:
        arr = np.asarray(ids)
    except (ValueError, TypeError):  # ragged rows
        arr = np.asarray(None)
    if arr.shape != shape or arr.dtype.kind not in "iu" or (arr.size and (arr.min() < 0 or arr.max() >= V)):
        shown = np.array2string(arr, threshold=8) if arr.dtype.kind != "O" else repr(ids)[:80]
        raise PluginFailure(
            label, f"{what} {' '.join(shown.split())}: expected integer ids in [0, {V}) of shape {shape}"
        )
    return arr.astype(np.int64, copy=False)


def held_text_bytes(vocab: Corpus, num_chars: int, num_samples: int) -> int:
    """About the memory a generation needs for its texts: the pieces, the joined texts, their
    join and their UTF-8 encoding for output, at 1, 2 or 4 bytes per character (CPython's str)."""
    top_ = max((ord(c) for c in vocab.vocab), default=0) if vocab.encoding != "bytes" else 0xFFFF
    width = 1 if top_ < 0x100 else 2 if top_ < 0x10000 else 4
    return num_chars * num_samples * (4 * width + 8)  # + 8: the ids of a searching sampler


def _label(kind: str, component: object) -> str:
    """`sampler 'greedy'`: a component's name when no plugin name is known (direct API use)."""
    name = getattr(component, "__name__", None) or type(component).__name__
    return f"{kind} {name!r}"


def _emitter(on_text: Callable[[int, str], None], row: int) -> Callable[[str], None]:
    return lambda text: on_text(row, text)


def _accepts(func: Callable[..., Any], name: str) -> bool:
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


class TextStream:
    """The text of one row: cut at the first stop string, optionally emitted as it grows."""

    def __init__(self, stop: Sequence[str], vocab: Corpus) -> None:
        import codecs

        self.stop, self.parts, self.pending, self.stopped = [s for s in stop if s], [], "", False
        if vocab.encoding == "bytes":  # a character's bytes may be split between chunks
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            self.decode = lambda ids, final=False: decoder.decode(bytes(ids.astype(np.uint8)), final)
        else:
            self.decode = lambda ids, final=False: vocab.decode(ids)
        self.hold = max((len(s) for s in self.stop), default=1) - 1  # a stop string may span chunks
        self.emit: Callable[[str], None] | None = None

    def add(self, ids: np.ndarray, final: bool = False) -> None:
        if self.stopped:
            return
        pending = self.pending + self.decode(ids, final)
        ends = [i for i in (pending.find(s) for s in self.stop) if i >= 0]
        if ends:
            pending, self.stopped = pending[: min(ends)], True
            ready, self.pending = pending, ""
        else:
            cut = max(0, len(pending) - self.hold)
            ready, self.pending = pending[:cut], pending[cut:]
        self.parts.append(ready)
        if self.emit is not None and ready:
            self.emit(ready)

    def finish(self) -> str:
        self.add(np.zeros(0, np.int64), final=True)
        self.hold = 0
        if self.pending and not self.stopped:
            self.parts.append(self.pending)
            if self.emit is not None:
                self.emit(self.pending)
            self.pending = ""
        return "".join(self.parts)
