"""The `rnn` model: a vanilla tanh RNN over characters, batched, in NumPy.

    h_t = tanh(Wxh[x_t] + h_{t-1} @ Whh + bh)     logits_t = h_t @ Why + by

Row-vector convention; the one-hot input is a row gather `Wxh[x]`, never a matmul. Speed comes
from doing everything that does not depend on the recurrence outside the time loop: the input
projection for all steps is one gather, the output layer and its gradients are one matmul each
over all B*T positions, and `dWhh` is one matmul after the loop. What is left per time step is
three NumPy calls forward and three backward, writing into preallocated time-major (T, B, H)
buffers so every per-step slice is contiguous.
"""

from __future__ import annotations

import numbers

import numpy as np

from charrnn import StepResult, hookimpl

_MAX_CACHED_SHAPES = 4  # work buffers kept for this many (B, T) shapes (train and validation)
_DENSE_SCATTER_MAX_VOCAB = 1024  # dWxh as a one-hot matmul up to this V, else sort + reduceat


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


class _Buffers:
    """Work arrays for one (B, T) shape, reused across calls; time-major so `a[t]` is contiguous."""

    def __init__(self, B: int, T: int, H: int, V: int, dtype: np.dtype) -> None:
        N = B * T
        self.xs = np.empty((T, B, H), dtype)  # Wxh[x_t] + bh; in backward, tanh' = 1 - h_t^2
        self.hs = np.empty((T + 1, B, H), dtype)  # hs[0] incoming state, hs[t + 1] = h_t
        self.dhr = np.empty((T, B, H), dtype)  # dL/dh_t from the outputs, then dL/d(pre-activation)
        self.dh = np.empty((B, H), dtype)  # gradient flowing from step t + 1 into h_t
        # Logits are (V, N): the max over V is then a fast axis-0 reduction (10x over axis 1).
        self.logits = np.empty((V, N), dtype)  # logits, then exp, then dL/dlogits
        self.row = np.empty(N, dtype)  # per-position max, then sum of exp
        # Sums over an axis as BLAS products with ones: 3-5x faster than np.sum here.
        self.ones_v, self.ones_n = np.ones(V, dtype), np.ones(N, dtype)
        self.h_flat = self.hs[1:].reshape(N, H)  # (N, H) views over all positions, row = t * B + b
        self.h_prev_flat = self.hs[:-1].reshape(N, H)
        self.dhr_flat = self.dhr.reshape(N, H)
        self.n = np.intp(N)  # an intp, so uint8 targets * N cannot overflow
        self.columns = np.arange(N).reshape(T, B)  # column of each position in logits and one-hot
        self.target_idx = np.empty((T, B), np.intp)  # flat index of each target logit
        self.onehot: np.ndarray | None = None  # (V, N), made on first dense dWxh
        # Per-step views, prebuilt: indexing costs as much as a tiny ufunc call.
        self.forward_steps = list(zip(self.xs, self.hs[:-1], self.hs[1:], strict=True))
        self.backward_steps = list(zip(self.dhr[:0:-1], self.dhr[-2::-1], self.xs[-2::-1], strict=True))


class RNN:
    """Vanilla tanh RNN character model (see the module docstring for the equations).

    Weights are `init_scale * standard_normal` as in min-char-rnn, biases zero: the network
    starts near-linear with near-uniform predictions. Adagrad's first steps move every weight by
    about `lr` whatever its scale, so at H=512 the learning rate matters far more than the init
    (on tinyshakespeare lr 0.01 learns well, lr 0.1 stalls near 3.4 nats; at H=100, 0.1 is fine).
    `dtype` is "float32" (fast) or "float64" (for gradient checks).

    Returned arrays: `train_step` grads are buffers overwritten by the next `train_step`; state
    arrays and `step` logits are fresh, and incoming state is never modified.
    """

    def __init__(
        self,
        vocab_size: int,
        rng: np.random.Generator,
        hidden_size: int = 128,
        dtype: str = "float32",
        init_scale: float = 0.01,
    ) -> None:
        V = _positive_int("vocab_size", vocab_size)
        H = _positive_int("hidden_size", hidden_size)
        if dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
        if isinstance(init_scale, bool) or not isinstance(init_scale, numbers.Real):
            raise ValueError(f"init_scale must be a positive number, got {init_scale!r}")
        if not 0 < init_scale < float("inf"):
            raise ValueError(f"init_scale must be a positive finite number, got {init_scale!r}")
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
        self.vocab_size, self.hidden_size, self.dtype = V, H, np.dtype(dtype)

        def normal(*shape: int) -> np.ndarray:
            return (rng.standard_normal(shape) * init_scale).astype(self.dtype)

        self.params: dict[str, np.ndarray] = {
            "Wxh": normal(V, H),
            "Whh": normal(H, H),
            "Why": normal(H, V),
            "bh": np.zeros(H, self.dtype),
            "by": np.zeros(V, self.dtype),
        }
        self._grads = {k: np.zeros_like(p) for k, p in self.params.items()}
        self._WhhT = np.empty((H, H), self.dtype)  # contiguous Whh.T: BLAS is faster on it than on a view
        self._x_table = np.empty((V, H), self.dtype)  # Wxh + bh, gathered by input id
        self._buffers: dict[tuple[int, int], _Buffers] = {}
        self._dense_scatter = V <= _DENSE_SCATTER_MAX_VOCAB

    def init_state(self, batch_size: int) -> dict[str, np.ndarray]:
        """Zero hidden state `{"h": (B, H)}`."""
        B = _positive_int("batch_size", batch_size)
        return {"h": np.zeros((B, self.hidden_size), self.dtype)}

    def train_step(self, inputs: np.ndarray, targets: np.ndarray, state: dict[str, np.ndarray]) -> StepResult:
        """Forward, mean cross-entropy and truncated BPTT over one (B, T) chunk of integer ids.

        The incoming state is a constant (no gradient flows into it). Returns the loss in
        nats/char, gradients of that mean loss, and the state after the last step.
        """
        b = self._forward(inputs, targets, state)
        loss = self._cross_entropy(b, backward=True)  # b.logits is now dL/dlogits
        p, g = self.params, self._grads
        dlogits = b.logits  # (V, N)
        np.dot(b.h_flat.T, dlogits.T, out=g["Why"])  # (H, V)
        np.dot(dlogits, b.ones_n, out=g["by"])  # (V,) sum over positions
        np.dot(dlogits.T, p["Why"].T, out=b.dhr_flat)  # (N, H) dL/dh_t through the outputs

        dtanh = np.multiply(b.hs[1:], b.hs[1:], out=b.xs)  # (T, B, H), xs no longer needed
        np.subtract(1, dtanh, out=dtanh)  # tanh' = 1 - h^2
        WhhT = self._WhhT
        np.copyto(WhhT, p["Whh"].T)
        np.multiply(b.dhr[-1], dtanh[-1], out=b.dhr[-1])  # last step: nothing flows in from t + 1
        dh = b.dh
        for dhr_next, dhr_t, dtanh_t in b.backward_steps:  # t = T-2 .. 0
            np.dot(dhr_next, WhhT, out=dh)  # (B, H) dL/dh_t through h_{t+1}
            np.add(dhr_t, dh, out=dhr_t)
            np.multiply(dhr_t, dtanh_t, out=dhr_t)  # (B, H) dL/d(pre-activation)

        np.dot(b.h_prev_flat.T, b.dhr_flat, out=g["Whh"])  # (H, H) summed over all steps at once
        np.dot(b.ones_n, b.dhr_flat, out=g["bh"])  # (H,) sum over positions
        self._scatter_rows(inputs, b, g["Wxh"])  # (V, H) dWxh[x] += dL/d(pre-activation)
        return StepResult(loss, dict(g), {"h": b.hs[-1].copy()})

    def loss(
        self, inputs: np.ndarray, targets: np.ndarray, state: dict[str, np.ndarray]
    ) -> tuple[float, dict[str, np.ndarray]]:
        """Forward only: mean cross-entropy (nats/char) over (B, T) and the state after the chunk."""
        b = self._forward(inputs, targets, state)
        return self._cross_entropy(b, backward=False), {"h": b.hs[-1].copy()}

    def step(self, ids: np.ndarray, state: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One time step for k streams: ids (k,) -> logits (k, V) and the new state.

        The logits and the new state are fresh arrays that the caller owns.
        """
        h = state["h"]  # (k, H)
        if np.ndim(ids) != 1 or len(ids) != h.shape[0]:
            raise ValueError(f"ids must have shape ({h.shape[0]},) to match state['h'], got {np.shape(ids)}")
        p = self.params
        x = p["Wxh"].take(ids, axis=0)  # (k, H) row gather
        x += p["bh"]
        h = np.dot(h, p["Whh"])  # (k, H)
        h += x
        np.tanh(h, out=h)
        logits = np.dot(h, p["Why"])  # (k, V)
        logits += p["by"]
        return logits, {"h": h}

    def _buffers_for(self, B: int, T: int) -> _Buffers:
        b = self._buffers.get((B, T))
        if b is None:
            if len(self._buffers) >= _MAX_CACHED_SHAPES:
                del self._buffers[next(iter(self._buffers))]  # drop the oldest shape
            b = self._buffers[B, T] = _Buffers(B, T, self.hidden_size, self.vocab_size, self.dtype)
        return b

    def _forward(self, inputs: np.ndarray, targets: np.ndarray, state: dict[str, np.ndarray]) -> _Buffers:
        """Fill the buffers for this (B, T): hidden states, logits and target indices."""
        if inputs.ndim != 2 or inputs.shape != targets.shape or inputs.size == 0:
            raise ValueError(
                f"inputs and targets must both have shape (B, T) with B, T > 0, "
                f"got {inputs.shape} and {targets.shape}"
            )
        B, T = inputs.shape
        h0 = state["h"]
        if h0.shape != (B, self.hidden_size):
            raise ValueError(f"state['h'] must have shape {(B, self.hidden_size)}, got {h0.shape}")
        V = self.vocab_size
        for ids in (inputs, targets):
            if ids.max() >= V or (ids.dtype.kind != "u" and ids.min() < 0):
                raise ValueError(f"ids must lie in [0, {V}), got {ids.min()}..{ids.max()}")
        b = self._buffers_for(B, T)
        p = self.params
        table = np.add(p["Wxh"], p["bh"], out=self._x_table)  # (V, H): Wxh[x] + bh == table[x]
        np.take(table, inputs.T, axis=0, out=b.xs, mode="clip")  # (T, B, H); ids checked, no buffering
        np.copyto(b.hs[0], h0)
        Whh = p["Whh"]
        for x_t, h_prev, h_t in b.forward_steps:
            np.dot(h_prev, Whh, out=h_t)  # (B, H)
            np.add(h_t, x_t, out=h_t)
            np.tanh(h_t, out=h_t)
        np.dot(p["Why"].T, b.h_flat.T, out=b.logits)  # (V, N) all positions at once
        b.logits += p["by"][:, None]
        np.multiply(targets.T, b.n, out=b.target_idx)  # (T, B) flat index of each target logit
        b.target_idx += b.columns
        return b

    @staticmethod
    def _cross_entropy(b: _Buffers, backward: bool) -> float:
        """Mean softmax cross-entropy of `b.logits`; with `backward`, leave dL/dlogits in their place."""
        logits, row = b.logits, b.row
        N = logits.shape[1]
        np.maximum.reduce(logits, axis=0, out=row)  # (N,)
        logits -= row  # stable: the largest logit at each position is 0
        picked = logits.take(b.target_idx)  # (T, B) shifted logit of each target
        np.exp(logits, out=logits)
        np.dot(b.ones_v, logits, out=row)  # (N,) partition functions
        loss = float(np.log(row).sum() - picked.sum()) / N
        if backward:
            row *= N
            logits /= row  # softmax / N
            logits.reshape(-1)[b.target_idx.reshape(-1)] -= 1 / N  # (softmax - onehot) / N
        return loss

    def _scatter_rows(self, inputs: np.ndarray, b: _Buffers, dWxh: np.ndarray) -> None:
        """dWxh[v] = sum of dL/d(pre-activation) over positions whose input is v (a row scatter-add).

        `np.add.at` is an order of magnitude slower than either way used here: for small V a
        one-hot (V, N) @ (N, H) matmul, otherwise sorting the positions and `np.add.reduceat`.
        """
        if self._dense_scatter:
            if b.onehot is None:
                b.onehot = np.zeros(b.logits.shape, self.dtype)
            onehot = b.onehot
            onehot.fill(0)
            onehot[inputs.T, b.columns] = 1  # (V, N)
            np.dot(onehot, b.dhr_flat, out=dWxh)
            return
        ids = inputs.T.reshape(-1)  # (N,) in row order t * B + b
        order = np.argsort(ids, kind="stable")
        sorted_ids = ids[order]
        starts = np.flatnonzero(np.concatenate(([True], sorted_ids[1:] != sorted_ids[:-1])))
        dWxh.fill(0)
        dWxh[sorted_ids[starts]] = np.add.reduceat(b.dhr_flat[order], starts, axis=0)


@hookimpl
def charrnn_model(register):
    register("rnn", RNN)
