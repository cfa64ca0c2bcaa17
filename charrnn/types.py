"""The contracts that plugin components fulfil: Corpus, Model, Optimizer, Sampler.

Plugins hand these back from the factories they register (see `charrnn.hookspecs`); the
training and generation loops call their methods directly, never the plugin manager.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol, runtime_checkable

import numpy as np

from charrnn.encoding import ids_dtype, lookup, mark, utf8_codes
from charrnn.errors import CorpusError

Params = dict[str, np.ndarray]
State = dict[str, np.ndarray]


@dataclass
class Corpus:
    """Encoded text: `ids` (N,) of unsigned ints indexing `vocab`, a list of symbols.

    Loaders that read text call `Corpus.from_text` or `Corpus.from_utf8`; loaders that produce
    ids directly (a memory-mapped cache) build it themselves. With `encoding="bytes"` the
    vocabulary is the 256 byte values (`vocab[i] == chr(i)`) and text is encoded as UTF-8.
    """

    ids: np.ndarray
    vocab: list[str]
    source: str = ""
    encoding: str = "utf-8"  # or "bytes": 256 symbols, one per byte; text is encoded to UTF-8 bytes
    _index: dict[str, int] = field(default=None, init=False, repr=False, compare=False)  # type: ignore[assignment]

    @classmethod
    def from_text(cls, text: str, source: str = "") -> Corpus:
        """Encode `text` with the sorted set of its characters as vocabulary (linear time)."""
        if not text:
            return cls(np.zeros(0, np.uint8), [], source)
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)  # (N,) code points
        present = np.flatnonzero(np.bincount(codes))  # sorted distinct code points
        lut = np.zeros(int(present[-1]) + 1, dtype=ids_dtype(len(present)))
        lut[present] = np.arange(len(present))
        vocab = [chr(c) for c in present]
        return cls(lut[codes], vocab, source)

    @classmethod
    def from_utf8(cls, raw: bytes, source: str = "", chunk_size: int = 1 << 22) -> Corpus:
        """Decode and encode UTF-8 bytes in linear time, in two streaming passes (`charrnn.encoding`).

        ASCII chunks are mapped byte for byte; others are decoded. A leading byte-order mark is
        dropped. Invalid UTF-8 raises CorpusError naming the byte offset.
        """
        start = 3 if raw[:3] == codecs.BOM_UTF8 else 0
        view = memoryview(raw)

        def chunks() -> Iterator[tuple[int, bytes]]:
            for offset in range(start, len(raw), chunk_size):
                yield offset, view[offset : offset + chunk_size]
            yield len(raw), b""

        name = source or "corpus"
        seen, count = np.zeros(0x80, dtype=bool), 0
        for codes in utf8_codes(chunks(), name):
            seen = mark(seen, codes)
            count += len(codes)
        vocab, lut = lookup(seen)
        ids, pos = np.empty(count, dtype=lut.dtype), 0
        for codes in utf8_codes(chunks(), name):
            np.take(lut, codes, out=ids[pos : pos + len(codes)])
            pos += len(codes)
        return cls(ids, vocab, source)

    @property
    def index(self) -> dict[str, int]:
        """Symbol -> id."""
        if self._index is None:
            self._index = {ch: i for i, ch in enumerate(self.vocab)}
        return self._index

    def with_vocab(self, vocab: list[str]) -> Corpus:
        """This text encoded with `vocab`, which must hold every symbol of `self.vocab` (it may hold more).

        Used to fine-tune a model on a text that uses a subset of its vocabulary; a missing symbol
        is a CorpusError that names it. The ids are remapped in one pass (a new in-memory array).
        """
        if list(vocab) == self.vocab:
            return self
        index = {ch: i for i, ch in enumerate(vocab)}
        missing = [ch for ch in self.vocab if ch not in index]
        if missing:
            shown = "".join(missing[:20]) + ("..." if len(missing) > 20 else "")
            raise CorpusError(
                f"the vocabulary lacks {len(missing)} of the text's characters (new: {shown!r})"
            )
        lut = np.array([index[ch] for ch in self.vocab], dtype=ids_dtype(len(vocab)))  # old id -> new id
        return Corpus(lut[self.ids], list(vocab), self.source, self.encoding)

    def encode(self, text: str) -> np.ndarray:
        """Ids of `text`; a symbol outside the vocabulary is a CorpusError that names it."""
        if self.encoding == "bytes":
            return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)
        index = self.index
        try:
            return np.array([index[ch] for ch in text], dtype=np.int64)
        except KeyError as exc:
            ch = exc.args[0]
            raise CorpusError(
                f"character {ch!r} (U+{ord(ch):04X}) is not in the model's vocabulary"
            ) from None

    def decode(self, ids: np.ndarray | list[int]) -> str:
        """Text of `ids`; with the byte vocabulary, invalid UTF-8 shows as U+FFFD."""
        if self.encoding == "bytes":
            return bytes(np.asarray(ids, dtype=np.uint8)).decode("utf-8", errors="replace")
        return "".join(map(self.vocab.__getitem__, np.asarray(ids).tolist()))  # ints, not NumPy scalars


class StepResult(NamedTuple):
    """What `Model.train_step` returns.

    `loss` is the mean cross-entropy in nats per character over the minibatch; `grads` has the
    keys of `Model.params` (its arrays may be buffers reused by the next call); `state` is the
    hidden state after the last time step, to carry into the next chunk.
    """

    loss: float
    grads: Params
    state: State


@runtime_checkable
class Model(Protocol):
    """A character model. Factories are called as `factory(vocab_size=V, rng=Generator, **options)`.

    `params` maps names (RNN notation: `Wxh`, `Whh`, `Why`, `bh`, `by`) to arrays that the
    optimizer updates in place. State is a dict of arrays whose first axis is the stream
    (batch) axis, so the pipeline can save it and carry it between chunks.

    Optional, for `charrnn bench`: `matmul_shapes(batch_size, seq_length)` returns
    `{"train": [...], "generate": [...]}`, lists of `(m, k, n, count)`: the `count` products of
    an (m, k) by a (k, n) matrix that one `train_step` on a (batch_size, seq_length) chunk, and
    one generation step of `batch_size` streams, perform. The bench times those shapes on the
    machine at hand; FLOPs per character are sum(2 * m * k * n * count) / characters per step,
    and the bound is those characters over sum(count * time of one product) (`charrnn.machine`).
    List the model's own arithmetic; leave out shortcuts and bookkeeping (a one-hot product
    that stands for a gather or scatter, sums done as products with a ones vector).
    """

    params: Params

    def init_state(self, batch_size: int) -> State:
        """A zero hidden state for `batch_size` parallel streams."""
        ...

    def train_step(self, inputs: np.ndarray, targets: np.ndarray, state: State) -> StepResult:
        """Forward, loss and backward (truncated BPTT) on inputs/targets of shape (B, T).

        A model that needs randomness while training (dropout) declares a keyword argument
        `rng`; the loop then passes its `numpy.random.Generator`, whose state checkpoints keep,
        so resume stays exact.
        """
        ...

    def loss(self, inputs: np.ndarray, targets: np.ndarray, state: State) -> tuple[float, State]:
        """Forward only: mean loss in nats/char over (B, T) and the state after the chunk."""
        ...

    def step(self, ids: np.ndarray, state: State) -> tuple[np.ndarray, State]:
        """One time step for k streams: ids (k,) -> logits (k, V) and the new state.

        Generation uses the optional `stepper(state)` instead when a model has it: an object
        whose call `stepper(ids)` does what `step` does, keeping the state inside and returning
        logits in a buffer the next call overwrites, and whose `state()` returns the state
        (fresh arrays). It may cache arrays derived from `params` (transposed weights), so the
        parameters must not change while it is in use. Without it, generation wraps `step`
        (`charrnn.generate.StepAdapter`).
        """
        ...


@runtime_checkable
class Optimizer(Protocol):
    """Updates parameters in place from gradients; keeps its own state per parameter name.

    Factories are called as `factory(**options)`. `state_dict` returns arrays only (saved in
    checkpoints, so resume is exact); `load_state_dict` restores them.
    """

    def step(self, params: Params, grads: Params) -> None: ...

    def state_dict(self) -> dict[str, np.ndarray]: ...

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None: ...


@runtime_checkable
class Sampler(Protocol):
    """Picks the next symbol of k parallel streams.

    Called with logits of shape (k, V) and a `numpy.random.Generator`; returns k ids, shape (k,),
    as a new array each call (the generation loop keeps them). The logits may be a buffer that
    the model overwrites at its next step: copy them to keep them.
    Optional methods (see `charrnn.hookspecs.charrnn_sampler`): `bind(vocab)`, `reset(k)`,
    `observe(ids)`, `search(model, state, last_ids, num_chars, rng)` and
    `perturb(rng, k, V, steps)`.
    """

    def __call__(self, logits: np.ndarray, rng: np.random.Generator) -> np.ndarray: ...


class Schedule(Protocol):
    """A learning-rate schedule: the factor for the base `lr` at `step` (0-based).

    A schedule whose factor is always 1 may say so with a true `constant` attribute: the
    training loop then never calls it (and leaves the optimizer's `lr` alone).
    """

    def __call__(self, step: int, total_steps: int | None) -> float: ...


#: the recurrent operators an exported layer may be, named as in ONNX
EXPORT_OPS = {"RNN": 1, "LSTM": 4, "GRU": 3}  # op -> gate blocks G / H


@dataclass
class ExportLayer:
    """One recurrent layer as ONNX's `RNN`, `LSTM` or `GRU` operator runs it (forward, default activations).

    `W` (G, I) multiplies the layer's input and `R` (G, H) the previous h, both as column
    vectors; `Wb` and `Rb` (G,) are their biases; G = gates * H with the gate blocks in ONNX's
    order: `RNN` one tanh block; `LSTM` [i, o, f, c] (no peepholes, no clipping); `GRU`
    [z, r, h] with `linear_before_reset=1`, the reset gate multiplying (R_h h + Rb_h). `state`
    names the layer's arrays in the model's `init_state`: `(h,)`, or `(h, c)` for an LSTM.
    """

    op: str
    W: np.ndarray
    R: np.ndarray
    Wb: np.ndarray
    Rb: np.ndarray
    state: tuple[str, ...]


@dataclass
class ExportNetwork:
    """What `charrnn_exporter` exporters return: a model as stacked recurrent layers over one-hot ids.

    Layer 0 reads the one-hot of each id (its I is V), layer l > 0 reads the h of layer l - 1,
    and the logits are h_top @ `Why` (H, V) + `by` (V,). Dropout, which acts only in training,
    has no place here.
    """

    layers: list[ExportLayer]
    Why: np.ndarray
    by: np.ndarray
