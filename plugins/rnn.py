"""The `rnn` model: a vanilla tanh RNN over characters, batched, in NumPy.

    h_t = tanh(Wxh[x_t] + h_{t-1} @ Whh + bh)     logits_t = h_t @ Why + by

Row-vector convention; the one-hot input is a row gather `Wxh[x]`, never a matmul. Speed comes
from doing everything that does not depend on the recurrence outside the time loop: the input
projection for all steps is one gather, the output layer and its gradients are one matmul each
over all B*T positions, and `dWhh` is one matmul after the loop. What is left per time step is
three NumPy calls forward and three backward, writing into preallocated time-major (T, B, H)
buffers so every per-step slice is contiguous. (`lstm` and `gru` run their loops feature-major,
which makes the per-step matmul faster; `rnn` keeps this layout so that its numbers stay exactly
those of earlier versions.) With `num_layers` > 1 the layers stack as described in
`charrnn_plugins.recurrent` (layer l > 0 has `Wxh{l}` (H, H), `Whh{l}`, `bh{l}` and state `h{l}`).
"""

from __future__ import annotations

from typing import Annotated

import numpy as np

from charrnn import hookimpl
from charrnn.engine import StepAdapter
from charrnn.options import Range
from charrnn.tuning import padded_rows
from charrnn.types import ExportNetwork
from charrnn_plugins import recurrent as rec
from charrnn_plugins.recurrent import Arrays, fast_dot, layer_name


def _rows_t(a: np.ndarray) -> np.ndarray:
    """(T, B, F) -> the (F, N) view, N = T * B: a transposed view of the (N, F) rows."""
    return a.reshape(-1, a.shape[-1]).T


class _Layer(rec.LayerBuffers):
    """One layer's work arrays, time-major (T, B, H); `dhr` is dL/dh_t, then dL/d(pre-activation)."""

    def __init__(self, B: int, T: int, H: int, dtype: np.dtype, dropout: bool) -> None:
        self.xs = np.empty((T, B, H), dtype)  # Wxh[x_t] + bh; in backward, tanh' = 1 - h_t^2
        self.hs = np.empty((T + 1, B, H), dtype)  # hs[0] incoming state, hs[t + 1] = h_t
        self.dhr = np.empty((T, B, H), dtype)
        super().__init__(_rows_t(self.xs), _rows_t(self.dhr), self.hs[1:], self.dhr, _rows_t, dropout)
        self.dh = np.empty((B, H), dtype)  # gradient flowing from step t + 1 into h_t
        self.h_prev_flat = self.hs[:-1].reshape(B * T, H)
        self.dhr_flat = self.dhr.reshape(B * T, H)
        # Per-step views, prebuilt: indexing costs as much as a tiny ufunc call.
        self.forward_steps = list(zip(self.xs, self.hs[:-1], self.hs[1:], strict=True))
        self.backward_steps = list(zip(self.dhr[:0:-1], self.dhr[-2::-1], self.xs[-2::-1], strict=True))


class RNN(rec.Recurrent):
    """Vanilla tanh RNN character model (see the module docstring for the equations).

    Weights are `init_scale * standard_normal` as in min-char-rnn, biases zero: the network
    starts near-linear with near-uniform predictions. Adagrad's first steps move every weight by
    about `lr` whatever its scale, so at H=512 the learning rate matters far more than the init
    (on tinyshakespeare lr 0.01 learns well, lr 0.1 stalls near 3.4 nats; at H=100, 0.1 is fine).
    `dtype` is "float32" (fast) or "float64" (for gradient checks). `num_layers` stacks layers;
    `dropout` (in [0, 1)) drops the inputs of layers 2..L and of the output layer in
    `train_step`, which then needs its `rng` argument.

    Returned arrays: `train_step` grads are buffers overwritten by the next `train_step`; state
    arrays and `step` logits are fresh, and incoming state is never modified.
    """

    work_arrays = (3, 0)  # xs, hs, dhr: (T, B, H) each (memory estimate)

    def __init__(
        self,
        vocab_size: int,
        rng: np.random.Generator,
        hidden_size: rec.HiddenSize = 128,
        dtype: rec.DType = "float32",
        init_scale: Annotated[float, Range(gt=0), "standard deviation of the initial weights"] = 0.01,
        num_layers: rec.NumLayers = 1,
        dropout: rec.Dropout = 0.0,
    ) -> None:
        super().__init__(vocab_size, rng, hidden_size, num_layers, dropout, dtype)
        V, H, L = self.vocab_size, self.hidden_size, self.num_layers

        def normal(*shape: int) -> np.ndarray:
            return rng.standard_normal(shape) * init_scale

        params = {"Wxh": normal(V, H), "Whh": normal(H, H), "Why": normal(H, V)}
        params.update(bh=np.zeros(H), by=np.zeros(V))
        for layer in range(1, L):
            params[layer_name("Wxh", layer)] = normal(H, H)
            params[layer_name("Whh", layer)] = normal(H, H)
            params[layer_name("bh", layer)] = np.zeros(H)
        self._finish_init(params)
        self._WhhT = [np.empty((H, H), self.dtype) for _ in range(L)]  # contiguous Whh.T: faster BLAS

    def _layer_buffers(self, B: int, T: int, layer: int) -> _Layer:
        return _Layer(B, T, self.hidden_size, self.dtype, self.dropout > 0)

    def _forward_layer(self, layer: int, lb: _Layer, state: Arrays) -> None:
        np.copyto(lb.hs[0], state[layer_name("h", layer)])
        Whh = self.params[layer_name("Whh", layer)]
        dot, add, tanh = fast_dot, np.add, np.tanh  # locals: the loop is all small calls
        for x_t, h_prev, h_t in lb.forward_steps:
            dot(h_prev, Whh, out=h_t)  # (B, H)
            add(h_t, x_t, out=h_t)
            tanh(h_t, out=h_t)

    def _backward_layer(self, layer: int, lb: _Layer) -> None:
        Whh, bh = layer_name("Whh", layer), layer_name("bh", layer)
        g = self._grads
        dtanh = np.multiply(lb.hs[1:], lb.hs[1:], out=lb.xs)  # (T, B, H), xs no longer needed
        np.subtract(1, dtanh, out=dtanh)  # tanh' = 1 - h^2
        WhhT = self._WhhT[layer]
        rec.transpose_into(self.params[Whh], WhhT)
        np.multiply(lb.dhr[-1], dtanh[-1], out=lb.dhr[-1])  # last step: nothing flows in from t + 1
        dh, dot, add, multiply = lb.dh, fast_dot, np.add, np.multiply
        for dhr_next, dhr_t, dtanh_t in lb.backward_steps:  # t = T-2 .. 0
            dot(dhr_next, WhhT, out=dh)  # (B, H) dL/dh_t through h_{t+1}
            add(dhr_t, dh, out=dhr_t)
            multiply(dhr_t, dtanh_t, out=dhr_t)  # (B, H) dL/d(pre-activation)
        np.dot(lb.h_prev_flat.T, lb.dhr_flat, out=g[Whh])  # (H, H) summed over all steps at once
        np.dot(lb.ones_n, lb.dhr_flat, out=g[bh])  # (H,) sum over positions

    def stepper(self, state: Arrays) -> _Stepper | StepAdapter:
        """A stepper for generation (see `charrnn.types.Model.step`); one layer only, else `step`."""
        if self.num_layers > 1:
            return StepAdapter(self, state)
        return _Stepper(self, state)

    def matmul_shapes(self, batch_size: int, seq_length: int) -> dict[str, list[tuple[int, int, int, int]]]:
        """`rec.Recurrent.matmul_shapes`; one layer generates with one stacked (H + V, H) product per step.

        The stepper's zero padding rows (`padded_rows`) are a speed trick, not the model's work:
        the bound counts the (H + V, H) product.
        """
        shapes = super().matmul_shapes(batch_size, seq_length)
        if self.num_layers == 1:
            H, V = self.hidden_size, self.vocab_size
            shapes["generate"] = [(H + V, H, batch_size, 1)]  # [Whh.T; Why.T] @ h
        return shapes

    def _step_layer(self, layer: int, x: np.ndarray, state: Arrays, new: Arrays) -> np.ndarray:
        name = layer_name("h", layer)
        h = np.dot(state[name], self.params[layer_name("Whh", layer)])  # (k, H)
        h += x
        np.tanh(h, out=h)
        new[name] = h
        return h

    def _state_out(self, b: rec.Buffers) -> Arrays:
        return {layer_name("h", layer): lb.hs[-1].copy() for layer, lb in enumerate(b.layers)}


class _Stepper:
    """`RNN.step` for a generation loop: the same model, one matrix product per character.

    Generation at hidden 512 is bound by reading the weights once per character (`Whh` is
    1 MB): the output layer and the next step's recurrent product both multiply the new state
    h_t, so one product with the stacked [Whh.T; Why.T] (H + V, H) gives the logits now and
    `r` = h_t @ Whh for the next call (10% faster than two products, which also evict each
    other from cache). `Wxh + bh` is one table to index; buffers are preallocated, no dict per
    step. One stream runs on 1-D vectors, k > 1 streams feature-major (H, k). The logits agree
    with `step` to rounding (the sums run in another order).
    """

    def __init__(self, model: RNN, state: Arrays) -> None:
        p, H, V = model.params, model.hidden_size, model.vocab_size
        h = state["h"]  # (k, H)
        if h.ndim != 2 or h.shape[1] != H:
            raise ValueError(f"state['h'] must have shape (k, {H}), got {h.shape}")
        self.k = k = h.shape[0]
        rows = padded_rows(H + V, H) if k == 1 else H + V
        self.W = np.zeros((rows, H), model.dtype)  # [Whh.T; Why.T; zero rows, see padded_rows]
        self.W[:H], self.W[H : H + V] = p["Whh"].T, p["Why"].T
        table = p["Wxh"] + p["bh"]  # (V, H): table[x] == Wxh[x] + bh, as `step` computes it
        self.table = table if k == 1 else np.ascontiguousarray(table.T)  # (H, V) for k > 1
        self.by = p["by"] if k == 1 else p["by"][:, None].copy()
        self.h = np.array(h[0] if k == 1 else h.T, model.dtype, order="C")  # (H,) or (H, k)
        self.a = np.empty_like(self.h)  # the pre-activation
        self.z = np.empty((rows, *self.h.shape[1:]), model.dtype)  # [r; logits; padding]
        self.r, self.logits = self.z[:H], self.z[H : H + V]
        self.out = self.logits[None] if k == 1 else self.logits.T  # (k, V) views
        self.dot = fast_dot
        self.dot(self.W, self.h, out=self.z)  # r for the first call

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        """ids (k,) -> logits (k, V), in a buffer that the next call overwrites."""
        a, h, logits = self.a, self.h, self.logits
        np.add(self.r, self.table[ids[0]] if self.k == 1 else self.table.take(ids, axis=1), out=a)
        np.tanh(a, out=h)
        self.dot(self.W, h, out=self.z)  # [h @ Whh (next call); h @ Why]
        np.add(logits, self.by, out=logits)
        return self.out

    def state(self) -> Arrays:
        return {"h": (self.h[None] if self.k == 1 else self.h.T).copy()}


def export_network(model: RNN) -> ExportNetwork:
    """The model as ONNX `RNN` layers (tanh): W = Wxh.T, R = Whh.T, Wb = bh, Rb = 0."""
    return rec.export_stack(model, "RNN", (0,))


@hookimpl
def charrnn_model(register):
    register("rnn", RNN)


@hookimpl
def charrnn_exporter(register):
    register("rnn", export_network)
