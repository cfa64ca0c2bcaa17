"""What the recurrent models `rnn`, `lstm` and `gru` share: options, the layer stack, the output layer.

Each model stacks `num_layers` recurrent layers over one-hot inputs and ends in a softmax layer:

    layer 0 input:  Wxh[x_t] + bh                 a row gather: the one-hot matmul for free
    layer l input:  d_{l-1,t} @ Wxh{l} + bh{l}     d = dropout(h), inverted, in train_step only
    output:         logits_t = d_{L-1,t} @ Why + by, mean softmax cross-entropy over B*T

Parameters and state of layer l > 0 carry the suffix l (`Whh1`, `h1`), so a one-layer model has
exactly the names of the original `rnn`. `Recurrent` runs everything that does not depend on the
recurrence outside the time loop, as one gather or matmul over all B*T positions (input
projections, output layer, input-weight gradients); a cell class supplies the time loops
(`_forward_layer`, `_backward_layer`, `_step_layer`). Work arrays are time-major (T, B, ...), so
every per-step slice is contiguous, and are kept per (B, T) shape.
"""

from __future__ import annotations

import numbers

import numpy as np

from charrnn import StepResult

MAX_CACHED_SHAPES = 4  # work buffers kept for this many (B, T) shapes (train and validation)
DENSE_SCATTER_MAX_VOCAB = 1024  # dWxh as a one-hot matmul up to this V, else sort + reduceat

Arrays = dict[str, np.ndarray]


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
    o: OutputBuffers, x_flat: np.ndarray, Why: np.ndarray, by: np.ndarray, targets: np.ndarray
) -> None:
    """Logits of all positions at once, and the flat index of each target logit."""
    np.dot(Why.T, x_flat.T, out=o.logits)  # (V, N)
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
    o: OutputBuffers,
    x_flat: np.ndarray,
    Why: np.ndarray,
    dWhy: np.ndarray,
    dby: np.ndarray,
    dx_flat: np.ndarray,
) -> None:
    """Gradients of the output layer from dL/dlogits in `o.logits`, and dL/d(its input) (N, H)."""
    dlogits = o.logits  # (V, N)
    np.dot(x_flat.T, dlogits.T, out=dWhy)  # (H, V)
    np.dot(dlogits, o.ones_n, out=dby)  # (V,) sum over positions
    np.dot(dlogits.T, Why.T, out=dx_flat)  # (N, H)


def scatter_rows(
    dense: bool, inputs: np.ndarray, o: OutputBuffers, dx_flat: np.ndarray, dW: np.ndarray
) -> None:
    """dW[v] = sum of dx over positions whose input is v (a row scatter-add), dx (N, G), dW (V, G).

    `np.add.at` is an order of magnitude slower than either way used here: for small V a
    one-hot (V, N) @ (N, G) matmul, otherwise sorting the positions and `np.add.reduceat`.
    """
    if dense:
        if o.onehot is None:
            o.onehot = np.zeros(o.logits.shape, dx_flat.dtype)
        onehot = o.onehot
        onehot.fill(0)
        onehot[inputs.T, o.columns] = 1  # (V, N)
        np.dot(onehot, dx_flat, out=dW)
        return
    ids = inputs.T.reshape(-1)  # (N,) in row order t * B + b
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    starts = np.flatnonzero(np.concatenate(([True], sorted_ids[1:] != sorted_ids[:-1])))
    dW.fill(0)
    dW[sorted_ids[starts]] = np.add.reduceat(dx_flat[order], starts, axis=0)


class LayerBuffers:
    """The work arrays of one layer that `Recurrent` itself uses; cells add their own.

    `xs` (T, B, G) receives the input projection; `hs` (T + 1, B, H) the hidden states (hs[0]
    the incoming one); `dh_above` (T, B, H) dL/dh from the layer above or the output layer;
    `dx` (T, B, G) is dL/d(input projection) once the cell's backward pass has run. With dropout,
    `ds` holds the dropped-out outputs and `mask` the scaled keep-mask.
    """

    def __init__(self, B: int, T: int, H: int, G: int, dtype: np.dtype, dropout: bool) -> None:
        N = B * T
        self.xs = np.empty((T, B, G), dtype)
        self.hs = np.empty((T + 1, B, H), dtype)
        self.xs_flat = self.xs.reshape(N, G)
        self.h_flat = self.hs[1:].reshape(N, H)  # row t * B + b is h_t of stream b
        self.h_prev_flat = self.hs[:-1].reshape(N, H)
        self.out_flat = self.h_flat  # what the layer above sees: h, or dropout(h)
        self.mask = self.ds = self.keep = None
        if dropout:
            self.mask = np.empty((T, B, H), dtype)  # uniform draws, then keep / (1 - p)
            self.keep = np.empty((T, B, H), bool)
            self.ds = np.empty((T, B, H), dtype)  # dropout(h)
        self.dh_above: np.ndarray  # (T, B, H), set by the cell (it may alias dx)
        self.dx: np.ndarray  # (T, B, G)

    def flat(self, a: np.ndarray) -> np.ndarray:
        return a.reshape(-1, a.shape[-1])


class Buffers:
    """All work arrays for one (B, T) shape: one `LayerBuffers` per layer, then the output layer."""

    def __init__(self, layers: list[LayerBuffers], out: OutputBuffers) -> None:
        self.layers, self.out = layers, out


class Recurrent:
    """A stack of recurrent layers with a softmax output layer; subclasses supply the cell.

    Class attributes: `gates` (G = gates * H columns in `Wxh`, `Whh`, `bh`), `state_names` (per
    layer), `sigmoid_gates` (the leading gate blocks that are sigmoids: their pre-activations are
    computed halved, so one `tanh` over all G columns serves every gate, as
    sigmoid(a) = (1 + tanh(a / 2)) / 2; halving is exact in floating point).
    """

    gates = 1
    state_names: tuple[str, ...] = ("h",)
    sigmoid_gates = 0

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
        H = positive_int("hidden_size", hidden_size)
        L = positive_int("num_layers", num_layers)
        if dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0 <= dropout < 1:
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
        self.vocab_size, self.hidden_size, self.num_layers = V, H, L
        self.dropout, self.dtype = float(dropout), np.dtype(dtype)
        self._buffers: dict[tuple[int, int], Buffers] = {}
        self._dense_scatter = V <= DENSE_SCATTER_MAX_VOCAB
        G = self.gates * H
        self._x_table = np.empty((V, G), self.dtype)  # (Wxh + bh) * gate_scale, gathered by input id
        self._gate_scale: np.ndarray | None = None  # (G,): 1/2 on sigmoid gates, else 1
        self._w_in: list[np.ndarray] = []  # scaled copies of Wxh{l}, bh{l} for l > 0
        if self.sigmoid_gates:
            self._gate_scale = np.ones(G, self.dtype)
            self._gate_scale[: self.sigmoid_gates * H] = 0.5
            self._w_in = [np.empty((H, G), self.dtype) for _ in range(L - 1)]
            self._b_in = [np.empty(G, self.dtype) for _ in range(L - 1)]

    def _finish_init(self, params: Arrays) -> None:
        """Adopt copies of `params` in the model's dtype and allocate the gradient arrays."""
        self.params: Arrays = {k: np.array(p, self.dtype, order="C") for k, p in params.items()}
        self._grads = {k: np.zeros_like(p) for k, p in self.params.items()}

    # -- protocol -------------------------------------------------------------------------

    def init_state(self, batch_size: int) -> Arrays:
        """Zero state: `h` (and `c` for the LSTM) of shape (B, H) per layer; layer l > 0 adds l."""
        B = positive_int("batch_size", batch_size)
        return {
            layer_name(s, l): np.zeros((B, self.hidden_size), self.dtype)
            for l in range(self.num_layers)
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
        output_backward(b.out, top.out_flat, p["Why"], g["Why"], g["by"], top.flat(top.dh_above))
        for l in range(self.num_layers - 1, -1, -1):
            lb = b.layers[l]
            if lb.out_flat is not lb.h_flat:
                lb.dh_above *= lb.mask  # back through the dropout
            self._backward_layer(l, lb)  # lb.dx = dL/d(input projection); Whh, bh grads
            dx_flat = lb.flat(lb.dx)  # (N, G)
            if l == 0:
                scatter_rows(self._dense_scatter, inputs, b.out, dx_flat, g["Wxh"])  # (V, G)
            else:
                below = b.layers[l - 1]
                Wxh = layer_name("Wxh", l)
                np.dot(below.out_flat.T, dx_flat, out=g[Wxh])  # (H, G)
                np.dot(dx_flat, p[Wxh].T, out=below.flat(below.dh_above))  # (N, H)
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
        for l in range(self.num_layers):
            if l:
                x = np.dot(h, p[layer_name("Wxh", l)])  # (k, G)
                x += p[layer_name("bh", l)]
            h = self._step_layer(l, x, state, new)
        logits = np.dot(h, p["Why"])  # (k, V)
        logits += p["by"]
        return logits, new

    # -- the stack ------------------------------------------------------------------------

    def _check(self, inputs: np.ndarray, targets: np.ndarray, state: Arrays) -> None:
        if inputs.ndim != 2 or inputs.shape != targets.shape or inputs.size == 0:
            raise ValueError(
                f"inputs and targets must both have shape (B, T) with B, T > 0, "
                f"got {inputs.shape} and {targets.shape}"
            )
        shape = (inputs.shape[0], self.hidden_size)
        for l in range(self.num_layers):
            for s in self.state_names:
                name = layer_name(s, l)
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
            layers = [self._layer_buffers(B, T) for _ in range(self.num_layers)]
            b = self._buffers[B, T] = Buffers(layers, OutputBuffers(B, T, self.vocab_size, self.dtype))
        return b

    def _forward(
        self, inputs: np.ndarray, targets: np.ndarray, state: Arrays, rng: np.random.Generator | None
    ) -> Buffers:
        """Fill the buffers for this (B, T): every layer's states, the logits and target indices."""
        self._check(inputs, targets, state)
        b = self._buffers_for(*inputs.shape)
        p, scale = self.params, self._gate_scale
        for l, lb in enumerate(b.layers):
            if l == 0:
                table = np.add(p["Wxh"], p["bh"], out=self._x_table)  # (V, G): Wxh[x] + bh == table[x]
                if scale is not None:
                    table *= scale
                np.take(table, inputs.T, axis=0, out=lb.xs, mode="clip")  # (T, B, G); ids checked
            else:
                W, bias = p[layer_name("Wxh", l)], p[layer_name("bh", l)]
                if scale is not None:
                    W = np.multiply(W, scale, out=self._w_in[l - 1])
                    bias = np.multiply(bias, scale, out=self._b_in[l - 1])
                np.dot(b.layers[l - 1].out_flat, W, out=lb.xs_flat)  # (N, G) all steps at once
                lb.xs += bias
            self._forward_layer(l, lb, state)
            lb.out_flat = lb.h_flat
            if rng is not None:
                rng.random(dtype=self.dtype, out=lb.mask)  # (T, B, H) uniform on [0, 1)
                np.greater_equal(lb.mask, self.dropout, out=lb.keep)
                np.multiply(lb.keep, self.dtype.type(1 / (1 - self.dropout)), out=lb.mask)
                np.multiply(lb.hs[1:], lb.mask, out=lb.ds)  # inverted dropout: E[ds] = h
                lb.out_flat = lb.flat(lb.ds)
        top = b.layers[-1]
        output_forward(b.out, top.out_flat, p["Why"], p["by"], targets)
        return b

    # -- what a cell supplies ---------------------------------------------------------------

    def _layer_buffers(self, B: int, T: int) -> LayerBuffers:
        raise NotImplementedError

    def _forward_layer(self, l: int, lb: LayerBuffers, state: Arrays) -> None:
        """Copy layer l's incoming state into the buffers and run its time loop over `lb.xs`."""
        raise NotImplementedError

    def _backward_layer(self, l: int, lb: LayerBuffers) -> None:
        """From `lb.dh_above`, fill `lb.dx` and the gradients of layer l's recurrent parameters."""
        raise NotImplementedError

    def _step_layer(self, l: int, x: np.ndarray, state: Arrays, new: Arrays) -> np.ndarray:
        """One time step of layer l given its input projection x (k, G); writes `new`, returns h."""
        raise NotImplementedError

    def _state_out(self, b: Buffers) -> Arrays:
        """Copies of every layer's state after the last time step."""
        raise NotImplementedError
