"""Priming and sampling: turns a model, a sampler and a seed text into new text.

k samples are generated at once as k parallel streams of one batched model step. The loop
calls the sampler's optional methods when it has them: `reset(k)` at the start, `observe(ids)`
with every id fed to the model (so a repetition penalty sees the history), and `search(...)`,
to which a sampler that needs the model itself (beam search) hands the whole generation.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from charrnn.errors import CharrnnError, PluginFailure
from charrnn.memory import check as check_memory
from charrnn.plugins import calling
from charrnn.types import Corpus, Model, Sampler, State

OnText = Callable[[str], None]


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


def prime(
    model: Model,
    ids: np.ndarray,
    k: int,
    observe: Callable[[np.ndarray], None] | None = None,
    labels: Mapping[str, str] | None = None,
):
    """Feed all ids but the last to one stream; `observe` sees every seed id, as k streams.

    Returns that stream's stepper (one stream goes on with it; k streams copy its state) and
    the (k,) last ids, the first input of the sampling loop. `labels` name the model's and
    the sampler's plugins when they raise (see `generate`).
    """
    labels = labels or {}
    with calling(labels.get("model") or _label("model", model)):
        step = stepper(model, model.init_state(1))
        for row in np.asarray(ids[:-1]).reshape(-1, 1):  # (1,) views, no array built per id
            step(row)
    if observe is not None:
        with calling(labels.get("sampler") or _label("sampler", observe)):
            for i in ids:
                observe(np.full(k, i))
    return step, np.repeat(ids[-1:], k)


def _label(kind: str, component: object) -> str:
    """`sampler 'greedy'`: a component's name when no plugin name is known (direct API use)."""
    name = getattr(component, "__name__", None) or type(component).__name__
    return f"{kind} {name!r}"


def _copies(state: State, k: int) -> State:
    return {name: np.repeat(a, k, axis=0) for name, a in state.items()} if k > 1 else state


def generate(
    model: Model,
    sampler: Sampler | Callable[[np.ndarray, np.random.Generator], np.ndarray],
    vocab: Corpus,
    rng: np.random.Generator,
    seed_text: str,
    num_chars: int,
    num_samples: int = 1,
    stop: Sequence[str] = (),
    on_text: OnText | None = None,
    chunk_chars: int = 256,
    labels: Mapping[str, str] | None = None,
) -> list[str]:
    """`num_samples` texts, each `seed_text` followed by `num_chars` generated characters.

    A text ends early, just before the first occurrence of any `stop` string in its generated
    part. With `on_text`, the first text is also handed over as it is produced (seed text
    first), in chunks of about `chunk_chars` characters, so streaming costs no speed.

    An exception raised by the model or the sampler, or ids outside [0, V) from the sampler,
    become a `PluginFailure` named by `labels["model"]` / `labels["sampler"]` (the pipeline
    passes `plugin 'p' (sampler 'top_k')`; by default the class or function name is used).
    """
    k = num_samples
    V = len(vocab.vocab)
    check_memory(  # the texts are kept whole (and joined, and encoded for output)
        held_text_bytes(vocab, num_chars, k),
        f"generate.num_chars={num_chars}" + (f" with num_samples={k}" if k > 1 else ""),
        "the generated text, kept whole also when streamed",
        "; ask for fewer characters",
    )
    stop = [s for s in stop if s]
    labels = {
        "model": (labels or {}).get("model") or _label("model", model),
        "sampler": (labels or {}).get("sampler") or _label("sampler", sampler),
    }
    observe = getattr(sampler, "observe", None)
    if hasattr(sampler, "reset"):
        with calling(labels["sampler"]):
            sampler.reset(k)  # type: ignore[union-attr]
    step, x = prime(model, start_ids(vocab, seed_text), k, observe, labels)
    streams = [TextStream(stop, vocab) for _ in range(k)]
    if on_text is not None:
        on_text(seed_text)
        streams[0].emit = on_text
    search = getattr(sampler, "search", None)
    if search is not None:
        state = _copies(step.state(), k)
        with calling(labels["sampler"]):
            out = search(model, state, x, num_chars, rng)
        out = _checked_ids(out, (k, num_chars), V, labels["sampler"], "search returned")
        for stream, row in zip(streams, out, strict=True):
            stream.add(row)
    else:
        done = 0
        if k > 1:
            with calling(labels["model"]):
                step = stepper(model, _copies(step.state(), k))
        while done < num_chars and not all(st.stopped for st in streams):
            n = min(chunk_chars, num_chars - done)
            chunk, x = _steps(step, sampler, rng, x, n, observe, V, labels)
            for stream, row in zip(streams, chunk, strict=True):
                stream.add(row)
            done += n
    return [seed_text + stream.finish() for stream in streams]


def _checked_ids(ids: object, shape: tuple[int, ...], V: int, label: str, what: str) -> np.ndarray:
    """`ids` as int64 of `shape` with every id in [0, V); else the plugin that made them failed.

    Called once per chunk, never per character: numpy would wrap a negative id around to
    the last character without a word, and an id >= V fails somewhere far from its cause.
    """
    try:
        arr = np.asarray(ids)
    except (ValueError, TypeError):  # ragged rows
        arr = np.asarray(None)
    if arr.shape != shape or arr.dtype.kind not in "iu" or (arr.size and (arr.min() < 0 or arr.max() >= V)):
        shown = np.array2string(arr, threshold=8) if arr.dtype.kind != "O" else repr(ids)[:80]
        raise PluginFailure(
            label, f"{what} {_one_line(shown)}: expected integer ids in [0, {V}) of shape {shape}"
        )
    return arr.astype(np.int64, copy=False)


def held_text_bytes(vocab: Corpus, num_chars: int, num_samples: int) -> int:
    """About the memory that `generate` needs for its texts: the pieces, the joined texts, their
    join and their UTF-8 encoding for output, at 1, 2 or 4 bytes per character (CPython's str)."""
    top = max((ord(c) for c in vocab.vocab), default=0) if vocab.encoding != "bytes" else 0xFFFF
    width = 1 if top < 0x100 else 2 if top < 0x10000 else 4
    return num_chars * num_samples * (4 * width + 8)  # + 8: the ids of a searching sampler


def _steps(step, sampler, rng, x, n, observe, V, labels):
    """n sampling steps for k streams: the hot loop, with nothing in it but the model and sampler.

    The ids are checked once per chunk (`_checked_ids`), not per step; the `try` blocks cost
    nothing until something raises. A sampler's bad ids usually make the model raise first: the
    last ids are checked then, so the sampler, not the model, is named.
    """
    out, k = [], len(x)
    for _ in range(n):
        try:
            logits = step(x)
        except CharrnnError:
            raise
        except Exception as exc:
            _checked_ids(x, (k,), V, labels["sampler"], "returned")
            raise PluginFailure(labels["model"], exc) from exc
        try:
            x = sampler(logits, rng)  # (k,)
            if observe is not None:
                observe(x)
        except CharrnnError:
            raise
        except Exception as exc:
            raise PluginFailure(labels["sampler"], exc) from exc
        out.append(x)
    chunk = _checked_ids(out, (n, k), V, labels["sampler"], "returned")
    return chunk.T, x  # (k, n)


def _one_line(text: str) -> str:
    return " ".join(text.split())


class TextStream:
    """The text of one stream: cut at the first stop string, optionally emitted as it grows.

    Public because the server keeps one per request row (stop strings, incremental UTF-8 decoding).
    """

    def __init__(self, stop: Sequence[str], vocab: Corpus) -> None:
        self.stop, self.parts, self.pending, self.stopped = stop, [], "", False
        if vocab.encoding == "bytes":  # a character's bytes may be split between chunks
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            self.decode = lambda ids, final=False: decoder.decode(bytes(ids.astype(np.uint8)), final)
        else:
            self.decode = lambda ids, final=False: vocab.decode(ids)
        self.hold = max((len(s) for s in stop), default=1) - 1  # a stop string may span chunks
        self.emit: OnText | None = None

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
