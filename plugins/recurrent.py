"""What the recurrent models `rnn`, `lstm` and `gru` share: options, the layer stack, the output layer.

Each model stacks `num_layers` recurrent layers over one-hot inputs and ends in a softmax layer:

    layer 0 input:  Wxh[x_t] + bh                 a row gather: the one-hot matmul for free
    layer l input:  d_{l-1,t} @ Wxh{l} + bh{l}     d = dropout(h), inverted, in train_step only
    output:         logits_t = d_{L-1,t} @ Why + by, mean softmax cross-entropy over B*T

Parameters and state of layer l > 0 carry the suffix l (`Whh1`, `h1`), so a one-layer model has
exactly the names of the original `rnn`. `Recurrent` runs everything that does not depend on the
recurrence outside the time loop, as one gather or matmul over all B*T positions (input
projections, output layer, input-weight gradients); a cell class supplies the time loops
(`_forward_layer`, `_backward_layer`, `_step_layer`) and lays out its work arrays for them (`rnn`
time-major (T, B, H); `lstm` and `gru` feature-major, see `charrnn_plugins.lstm`), handing
`Recurrent` (F, N) matrix views of them. Work arrays are kept per (B, T) shape.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Annotated, Literal

import numpy as np

from charrnn import StepResult
from charrnn.memory import check as check_memory
from charrnn.optim import pack
from charrnn.options import Range
from charrnn.types import ExportLayer, ExportNetwork

#: the options the recurrent models share, described once (see `charrnn.options`)
HiddenSize = Annotated[int, Range(ge=1), "units in each recurrent layer"]
NumLayers = Annotated[int, Range(ge=1, le=64), "recurrent layers stacked on each other"]
Dropout = Annotated[
    float, Range(ge=0, lt=1), "inverted dropout between layers and before the output, while training only"
]
DType = Annotated[Literal["float32", "float64"], "the floating-point type of parameters and work arrays"]

MAX_CACHED_SHAPES = 4  # work buffers kept for this many (B, T) shapes (train and validation)
DENSE_SCATTER_MAX_VOCAB = 1024  # dWxh as a one-hot matmul up to this V, else sort + reduceat

Arrays = dict[str, np.ndarray]

# np.dot without its __array_function__ dispatch (NEP 18's `_implementation`): ~150 ns less per
# call, 5% of a training step at min-char-rnn's size, where the time loop is all small calls.
fast_dot = getattr(np.dot, "_implementation", np.dot)


def positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def layer_name(base: str, layer: int) -> str:
    """`Whh` for layer 0, `Whh1` for layer 1, ...: a one-layer model keeps the plain names."""
    return base if layer == 0 else f"{base}{layer}"


def orthogonal(rng: np.random.Generator, n: int) -> np.ndarray:
    """A random (n, n) orthogonal matrix, uniformly distributed (QR of a Gaussian, signs fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))


def dot_into(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
    """out = a @ b for a C- or F-contiguous `out` (np.dot writes only C-contiguous arrays)."""
    if out.flags.c_contiguous:
        np.dot(a, b, out=out)
    else:
        np.dot(b.T, a.T, out=out.T)  # out.T = b.T @ a.T


def features_first(a: np.ndarray) -> np.ndarray:
    """(F, T, B) -> the (F, N) view, N = T * B: the feature-major layout of `lstm` and `gru`."""
    return a.reshape(a.shape[0], -1)


def transpose_into(a: np.ndarray, out: np.ndarray) -> None:
    """out = a.T for a 2-D `a`; a large one in strips of 16 rows, 3-5x faster than one np.copyto."""
    if a.size < 1 << 16:
        np.copyto(out, a.T)
        return
    for i in range(0, a.shape[0], 16):
        np.copyto(out[:, i : i + 16], a[i : i + 16].T)


class OutputBuffers:
    """Work arrays of the output layer for N = B*T positions; position t * B + b is column/row n."""

    def __init__(self, B: int, T: int, V: int, dtype: np.dtype) -> None:
        N = B * T
        # Logits are (V, N): the max over V is then a fast axis-0 reduction (10x over axis 1).
        self.logits = np.empty((V, N), dtype)  # logits, then exp, then dL/dlogits
        self.row = np.empty(N, dtype)  # per-position max, then sum of exp
        # Sums over an axis as BLAS products with ones: 3-5x faster than np.sum here.
        self.ones_v, self.ones_n = np.ones(V, dtype), np.ones(N, dtype)
        self.n = np.intp(N)  # an intp, so uint8 targets * N cannot overflow
        self.columns = np.arange(N).reshape(T, B)  # column of each position in logits and one-hot
        self.target_idx = np.empty((T, B), np.intp)  # flat index of each target logit
        self.onehot: np.ndarray | None = None  # (V, N), made on first dense dWxh


def output_forward(
    o: OutputBuffers, xT: np.ndarray, Why: np.ndarray, by: np.ndarray, targets: np.ndarray
) -> None:
    """Logits of all positions at once from the inputs xT (H, N), and the flat index of each target."""
    np.dot(Why.T, xT, out=o.logits)  # (V, N)
    o.logits += by[:, None]
    np.multiply(targets.T, o.n, out=o.target_idx)  # (T, B)
    o.target_idx += o.columns


def cross_entropy(o: OutputBuffers, backward: bool) -> float:
    """Mean softmax cross-entropy of `o.logits`; with `backward`, leave dL/dlogits in their place."""
    logits, row = o.logits, o.row
    N = logits.shape[1]
    np.maximum.reduce(logits, axis=0, out=row)  # (N,)
    logits -= row  # stable: the largest logit at each position is 0
    picked = logits.take(o.target_idx)  # (T, B) shifted logit of each target
    np.exp(logits, out=logits)
    np.dot(o.ones_v, logits, out=row)  # (N,) partition functions
    loss = float(np.log(row).sum() - picked.sum()) / N
    if backward:
        row *= N
        logits /= row  # softmax / N
        logits.reshape(-1)[o.target_idx.reshape(-1)] -= 1 / N  # (softmax - onehot) / N
    return loss


def output_backward(
    o: OutputBuffers, xT: np.ndarray, Why: np.ndarray, dWhy: np.ndarray, dby: np.ndarray, dxT: np.ndarray
) -> None:
    """Output-layer gradients from dL/dlogits in `o.logits`, and dL/d(its inputs) into dxT (H, N)."""
    dlogits = o.logits  # (V, N)
    np.dot(xT, dlogits.T, out=dWhy)  # (H, V)
    np.dot(dlogits, o.ones_n, out=dby)  # (V,) sum over positions
    dot_into(Why, dlogits, dxT)  # (H, N)


def scatter_rows(dense: bool, inputs: np.ndarray, o: OutputBuffers, dx: np.ndarray, dW: np.ndarray) -> None:
    """dW[v] = sum of dx over positions whose input is v (a row scatter-add), dx (N, G), dW (V, G).

    `np.add.at` is an order of magnitude slower than either way used here: for small V a
    one-hot (V, N) @ (N, G) matmul, otherwise sorting the positions and `np.add.reduceat`.
    """
    if dense:
        if o.onehot is None:
            o.onehot = np.zeros(o.logits.shape, dx.dtype)
        onehot = o.onehot
        onehot.fill(0)
        onehot[inputs.T, o.columns] = 1  # (V, N)
        np.dot(onehot, dx, out=dW)
        return
    ids = inputs.T.reshape(-1)  # (N,) in row order t * B + b
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    starts = np.flatnonzero(np.concatenate(([True], sorted_ids[1:] != sorted_ids[:-1])))
    dW.fill(0)
    dW[sorted_ids[starts]] = np.add.reduceat(dx[order], starts, axis=0)


class LayerBuffers:
    """What `Recurrent` sees of one layer's work arrays: (F, N) matrices over all positions.

    The suffix T marks these (F, N) views: transposed relative to one row per position.

    A cell allocates its arrays in the memory layout its time loop wants and hands over views:
    `xT` (G, N) receives the input projection (layers above the first; the first gets its
    projection in `xs`, gathered), `dxT` (G, N) holds dL/d(input projection) after
    the cell's backward pass, `h_seq` and `dh_above_seq` are h_t and dL/dh_t (from the layer above
    or the output layer) for all t in the cell's layout, and `as_matrix` views such an array as
    (H, N). With dropout, `ds` = dropout(h) and `mask` (scaled keep-mask) share that layout, and
    `outT` (H, N) is what the layer above sees: h, or dropout(h).
    """

    def __init__(
        self,
        xT: np.ndarray | None,
        dxT: np.ndarray,
        h_seq: np.ndarray,
        dh_above_seq: np.ndarray,
        as_matrix: Callable[[np.ndarray], np.ndarray],
        dropout: bool,
    ) -> None:
        self.xT, self.dxT, self.h_seq, self.dh_above_seq = xT, dxT, h_seq, dh_above_seq
        self.hT, self.dh_aboveT = as_matrix(h_seq), as_matrix(dh_above_seq)
        self.outT = self.hT
        self.ones_n = np.ones(dxT.shape[1], dxT.dtype)  # sums over positions as BLAS products
        self.mask = self.keep = self.ds = self.dsT = None
        if dropout:
            self.mask = np.empty(h_seq.shape, h_seq.dtype)  # uniform draws, then keep / (1 - p)
            self.keep = np.empty(h_seq.shape, bool)
            self.ds = np.empty(h_seq.shape, h_seq.dtype)
            self.dsT = as_matrix(self.ds)


class Buffers:
    """All work arrays for one (B, T) shape: one `LayerBuffers` per layer, then the output layer."""

    def __init__(self, layers: list, out: OutputBuffers) -> None:
        self.layers, self.out = layers, out


class Recurrent:
    """A stack of recurrent layers with a softmax output layer; subclasses supply the cell.

    Class attributes: `gates` (G = gates * H columns in `Wxh`, `Whh`, `bh`), `state_names` (per
    layer), `sigmoid_gates` (the leading gate blocks that are sigmoids: their pre-activations are
    computed halved, so one `tanh` serves every gate, as sigmoid(a) = (1 + tanh(a / 2)) / 2;
    halving is exact in floating point), `feature_major` (the cell's time loop works on (F, B)
    slabs, so layer 0's gathered input projection `xs` is (T, G, B) rather than (T, B, G)).
    """

    gates = 1
    state_names: tuple[str, ...] = ("h",)
    sigmoid_gates = 0
    feature_major = False
    work_arrays = (4, 4)  # per layer and position: work arrays of G and of H values (memory estimate)

    def __init__(
        self,
        vocab_size: int,
        rng: np.random.Generator,
        hidden_size: int,
        num_layers: int,
        dropout: float,
        dtype: str,
    ) -> None:
        V = positive_int("vocab_size", vocab_size)
        H, L = int(hidden_size), int(num_layers)
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
        self.vocab_size, self.hidden_size, self.num_layers = V, H, L
        self.dropout, self.dtype = float(dropout), np.dtype(dtype)
        check_memory(  # before allocating anything: a huge size is one line, not a MemoryError
            self.memory_bytes(0, 0),
            f"model.hidden_size={H}" + (f", num_layers={L}" if L > 1 else "") + f" (vocabulary of {V})",
            "parameters, gradients, optimizer state",
        )
        self._buffers: dict[tuple[int, int], Buffers] = {}
        self._dense_scatter = V <= DENSE_SCATTER_MAX_VOCAB
        G = self.gates * H
        # (Wxh + bh) * gate_scale, gathered by input id: (G, V) if feature-major, else (V, G)
        self._x_table = np.empty((G, V) if self.feature_major else (V, G), self.dtype)
        self._gate_scale: np.ndarray | None = None  # (G,): 1/2 on sigmoid gates, else 1
        if self.sigmoid_gates:
            self._gate_scale = np.ones(G, self.dtype)
            self._gate_scale[: self.sigmoid_gates * H] = 0.5
            self._w_in = [np.empty((H, G), self.dtype) for _ in range(L - 1)]  # scaled Wxh{l}
            self._b_in = [np.empty(G, self.dtype) for _ in range(L - 1)]  # scaled bh{l}

    def memory_bytes(self, batch_size: int, seq_length: int) -> int:
        """About the memory training needs at (batch_size, seq_length): parameters, gradients,
        optimizer state (up to Adam's two moments and two scratch arrays), work arrays.

        Needs only the sizes, so `__init__` checks it (with no work arrays) before allocating.
        """
        V, H, L, size = self.vocab_size, self.hidden_size, self.num_layers, self.dtype.itemsize
        G = self.gates * H
        P = V * G + (L - 1) * H * G + L * (H * G + G + H) + H * V + V  # parameters (GRU's bhn included)
        train = P * size * 6 + (V * G + L * H * G) * size  # + gathered input table, transposed Whh
        build = P * (8 + 2 * size) + V * G * 8  # float64 init arrays while packing
        N = batch_size * seq_length
        g_arrays, h_arrays = self.work_arrays
        logits = (2 if V <= DENSE_SCATTER_MAX_VOCAB else 1) * V  # logits, and the one-hot when dense
        per_position = L * (g_arrays * G + h_arrays * H + (3 * H if self.dropout else 0)) + logits + 4
        per_step = L * 3072  # prebuilt per-step views: Python objects, not arrays
        return max(train + N * per_position * size + 16 * N, build) + seq_length * per_step

    def _finish_init(self, params: Arrays) -> None:
        """Adopt copies of `params` in the model's dtype and allocate the gradient arrays.

        Both are packed (`charrnn.optim.pack`): views of one flat buffer each, laid out alike,
        so the optimizer updates all parameters in a few calls instead of a few per parameter.
        """
        self.params: Arrays = pack(params, self.dtype)
        self._grads = pack({k: np.zeros_like(p) for k, p in self.params.items()})

    # -- protocol -------------------------------------------------------------------------

    def init_state(self, batch_size: int) -> Arrays:
        """Zero state: `h` (and `c` for the LSTM) of shape (B, H) per layer; layer l > 0 adds l."""
        B = positive_int("batch_size", batch_size)
        return {
            layer_name(s, layer): np.zeros((B, self.hidden_size), self.dtype)
            for layer in range(self.num_layers)
            for s in self.state_names
        }

    def train_step(
        self,
        inputs: np.ndarray,
        targets: np.ndarray,
        state: Arrays,
        rng: np.random.Generator | None = None,
    ) -> StepResult:
        """Forward, mean cross-entropy and truncated BPTT over one (B, T) chunk of integer ids.

        The incoming state is a constant (no gradient flows into it). `rng` draws the dropout
        masks (required when `dropout` > 0). Returns the loss in nats/char, gradients of that
        mean loss (buffers reused by the next call), and the state after the last step.
        """
        if self.dropout and rng is None:
            raise ValueError("dropout > 0 needs train_step(..., rng=numpy.random.Generator)")
        b = self._forward(inputs, targets, state, rng if self.dropout else None)
        loss = cross_entropy(b.out, backward=True)  # b.out.logits is now dL/dlogits
        p, g = self.params, self._grads
        top = b.layers[-1]
        output_backward(b.out, top.outT, p["Why"], g["Why"], g["by"], top.dh_aboveT)
        for layer in range(self.num_layers - 1, -1, -1):
            lb = b.layers[layer]
            if lb.outT is not lb.hT:
                lb.dh_above_seq *= lb.mask  # back through the dropout
            self._backward_layer(layer, lb)  # lb.dxT = dL/d(input projection); Whh, bh grads
            if layer == 0:
                scatter_rows(self._dense_scatter, inputs, b.out, lb.dxT.T, g["Wxh"])  # (V, G)
            else:
                below, Wxh = b.layers[layer - 1], layer_name("Wxh", layer)
                np.dot(below.outT, lb.dxT.T, out=g[Wxh])  # (H, G)
                dot_into(p[Wxh], lb.dxT, below.dh_aboveT)  # (H, N)
        return StepResult(loss, dict(g), self._state_out(b))

    def loss(self, inputs: np.ndarray, targets: np.ndarray, state: Arrays) -> tuple[float, Arrays]:
        """Forward only, without dropout: mean cross-entropy (nats/char) and the state after the chunk."""
        b = self._forward(inputs, targets, state, None)
        return cross_entropy(b.out, backward=False), self._state_out(b)

    def step(self, ids: np.ndarray, state: Arrays) -> tuple[np.ndarray, Arrays]:
        """One time step for k streams: ids (k,) -> logits (k, V) and the new state (fresh arrays)."""
        h = state["h"]  # (k, H)
        if np.ndim(ids) != 1 or len(ids) != h.shape[0]:
            raise ValueError(f"ids must have shape ({h.shape[0]},) to match state['h'], got {np.shape(ids)}")
        p, new = self.params, {}
        x = p["Wxh"].take(ids, axis=0)  # (k, G) row gather
        x += p["bh"]
        for layer in range(self.num_layers):
            if layer:
                x = np.dot(h, p[layer_name("Wxh", layer)])  # (k, G)
                x += p[layer_name("bh", layer)]
            h = self._step_layer(layer, x, state, new)
        logits = np.dot(h, p["Why"])  # (k, V)
        logits += p["by"]
        return logits, new

    def matmul_shapes(self, batch_size: int, seq_length: int) -> dict[str, list[tuple[int, int, int, int]]]:
        """The matrix products this model performs, as (m, k, n, count): `count` (m, k) @ (k, n).

        `train`: one `train_step` on a (batch_size, seq_length) chunk; `generate`: one
        generation step of `batch_size` streams. `charrnn bench` times these shapes to compute
        the model's bound on this machine (`charrnn.machine`). FLOPs per character, 2 * m * k * n
        per product, with G = gates * H and L layers (going back in time, the last step has no
        recurrent product: T - 1 of them):

            train:    L * (6 - 2 / T) * H * G + (L - 1) * 6 * H * G + 6 * H * V
            generate: (2 * L - 1) * 2 * H * G + 2 * H * V

        So a one-layer rnn (G = H) trains at 6 * H * (H + V) - 2 * H^2 / T, a 2-layer lstm
        (G = 4 * H) at 72 * H^2 + 6 * H * V - 16 * H^2 / T. Left out: the layer-0 input
        projection (a row gather, no product), its gradient (a scatter-add, done as a one-hot
        product for small V, an implementation shortcut), and sums over positions done as
        products with a vector of ones; these count against the model's share of the bound,
        as does all elementwise work.
        """
        B = positive_int("batch_size", batch_size)
        T = positive_int("seq_length", seq_length)
        H, V, L, G, N = (
            self.hidden_size,
            self.vocab_size,
            self.num_layers,
            self.gates * self.hidden_size,
            B * T,
        )
        if self.feature_major:  # the layout of the time loops and of the (F, N) buffers, see the cells
            step, step_back, below_in, below_back, out_back = (
                (G, H, B),
                (H, G, B),
                (G, H, N),
                (H, G, N),
                (H, V, N),
            )
        else:
            step, step_back, below_in, below_back, out_back = (
                (B, H, G),
                (B, G, H),
                (N, H, G),
                (N, G, H),
                (N, V, H),
            )
        train = [
            (*step, L * T),  # h_{t-1} @ Whh, every layer and step
            (*step_back, L * (T - 1)),  # dL/dh_{t-1} through Whh
            (H, N, G, L),  # dWhh of every layer, all steps at once
            (*below_in, L - 1),  # layers above the first: input projection, dWxh{l}, dL/d(input)
            (H, N, G, L - 1),
            (*below_back, L - 1),
            (V, H, N, 1),  # output layer: logits, dWhy, dL/dh
            (H, N, V, 1),
            (*out_back, 1),
        ]
        generate = [(B, H, G, 2 * L - 1), (B, H, V, 1)]  # per layer h @ Whh, above the first x @ Wxh{l}
        return {"train": [s for s in train if s[3]], "generate": generate}

    # -- the stack ------------------------------------------------------------------------

    def _check(self, inputs: np.ndarray, targets: np.ndarray, state: Arrays) -> None:
        if inputs.ndim != 2 or inputs.shape != targets.shape or inputs.size == 0:
            raise ValueError(
                f"inputs and targets must both have shape (B, T) with B, T > 0, "
                f"got {inputs.shape} and {targets.shape}"
            )
        shape = (inputs.shape[0], self.hidden_size)
        for layer in range(self.num_layers):
            for s in self.state_names:
                name = layer_name(s, layer)
                if name not in state:
                    raise ValueError(f"state lacks {name!r} (it has {sorted(state)})")
                if state[name].shape != shape:
                    raise ValueError(f"state[{name!r}] must have shape {shape}, got {state[name].shape}")
        V = self.vocab_size
        for ids in (inputs, targets):
            if ids.max() >= V or (ids.dtype.kind != "u" and ids.min() < 0):
                raise ValueError(f"ids must lie in [0, {V}), got {ids.min()}..{ids.max()}")

    def _buffers_for(self, B: int, T: int) -> Buffers:
        b = self._buffers.get((B, T))
        if b is None:
            if len(self._buffers) >= MAX_CACHED_SHAPES:
                del self._buffers[next(iter(self._buffers))]  # drop the oldest shape
            layers = [self._layer_buffers(B, T, layer) for layer in range(self.num_layers)]
            b = self._buffers[B, T] = Buffers(layers, OutputBuffers(B, T, self.vocab_size, self.dtype))
        return b

    def _forward(
        self, inputs: np.ndarray, targets: np.ndarray, state: Arrays, rng: np.random.Generator | None
    ) -> Buffers:
        """Fill the buffers for this (B, T): every layer's states, the logits and target indices."""
        self._check(inputs, targets, state)
        b = self._buffers_for(*inputs.shape)
        p, scale = self.params, self._gate_scale
        for layer, lb in enumerate(b.layers):
            if layer == 0:
                self._gather_inputs(inputs, lb)
            else:
                W, bias = p[layer_name("Wxh", layer)], p[layer_name("bh", layer)]
                if scale is not None:
                    W = np.multiply(W, scale, out=self._w_in[layer - 1])
                    bias = np.multiply(bias, scale, out=self._b_in[layer - 1])
                dot_into(W.T, b.layers[layer - 1].outT, lb.xT)  # (G, N) all steps at once
                lb.xT += bias[:, None]
            self._forward_layer(layer, lb, state)
            lb.outT = lb.hT
            if rng is not None:
                rng.random(dtype=self.dtype, out=lb.mask)  # uniform on [0, 1)
                np.greater_equal(lb.mask, self.dropout, out=lb.keep)
                np.multiply(lb.keep, self.dtype.type(1 / (1 - self.dropout)), out=lb.mask)
                np.multiply(lb.h_seq, lb.mask, out=lb.ds)  # inverted dropout: E[ds] = h
                lb.outT = lb.dsT
        output_forward(b.out, b.layers[-1].outT, p["Why"], p["by"], targets)
        return b

    def _gather_inputs(self, inputs: np.ndarray, lb: LayerBuffers) -> None:
        """Layer 0's input projection Wxh[x] + bh (gates scaled) for all positions, by gathering rows.

        Feature-major cells get it as (T, G, B), one gather per step, so that their time loop
        reads a contiguous slab per step (the gather costs the same as one for all steps).
        """
        Wxh, bh, scale = self.params["Wxh"], self.params["bh"], self._gate_scale
        if self.feature_major:
            table = np.add(Wxh.T, bh[:, None], out=self._x_table)  # (G, V)
            if scale is not None:
                table *= scale[:, None]
            for t, x in enumerate(lb.xs):
                np.take(table, inputs[:, t], axis=1, out=x, mode="clip")  # (G, B); ids checked
        else:
            table = np.add(Wxh, bh, out=self._x_table)  # (V, G): Wxh[x] + bh == table[x]
            if scale is not None:
                table *= scale
            np.take(table, inputs.T, axis=0, out=lb.xs, mode="clip")  # (T, B, G); ids checked

    # -- what a cell supplies ---------------------------------------------------------------

    def _layer_buffers(self, B: int, T: int, layer: int) -> LayerBuffers:
        raise NotImplementedError

    def _forward_layer(self, layer: int, lb: LayerBuffers, state: Arrays) -> None:
        """Copy layer l's incoming state into the buffers and run its time loop over `lb.xs`."""
        raise NotImplementedError

    def _backward_layer(self, layer: int, lb: LayerBuffers) -> None:
        """From `lb.dh_above_seq`, fill `lb.dxT` and the gradients of layer l's recurrent parameters."""
        raise NotImplementedError

    def _step_layer(self, layer: int, x: np.ndarray, state: Arrays, new: Arrays) -> np.ndarray:
        """One time step of layer l given its input projection x (k, G); writes `new`, returns h."""
        raise NotImplementedError

    def _state_out(self, b: Buffers) -> Arrays:
        """Copies of every layer's state after the last time step."""
        raise NotImplementedError


def export_stack(
    model: Recurrent,
    op: str,
    order: tuple[int, ...],
    recurrent_bias: Callable[[int], np.ndarray] | None = None,
) -> ExportNetwork:
    """A stacked model in ONNX's conventions (see `charrnn.types.ExportLayer`), for `charrnn_exporter`.

    ONNX's gate block k is the model's block `order[k]`; `bh{l}` is the input bias `Wb` and
    `recurrent_bias(l)` (default zeros) the recurrent bias `Rb`, both already in ONNX's order.
    """
    p, H = model.params, model.hidden_size

    def onnx_order(a: np.ndarray) -> np.ndarray:
        return np.concatenate([a[..., k * H : (k + 1) * H] for k in order], axis=-1)  # (..., G), a copy

    layers = []
    for layer in range(model.num_layers):
        Wb = onnx_order(p[layer_name("bh", layer)])  # (G,)
        layers.append(
            ExportLayer(
                op,
                onnx_order(p[layer_name("Wxh", layer)]).T,  # (G, I)
                onnx_order(p[layer_name("Whh", layer)]).T,  # (G, H)
                Wb,
                np.zeros_like(Wb) if recurrent_bias is None else recurrent_bias(layer),
                tuple(layer_name(s, layer) for s in model.state_names),
            )
        )
    return ExportNetwork(layers, p["Why"].copy(), p["by"].copy())
