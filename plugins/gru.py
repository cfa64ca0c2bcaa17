"""The `gru` model: a gated recurrent unit network over characters, batched, in NumPy.

    [ur, uz, un] = h_{t-1} @ Whh + [0, 0, bhn]         three (B, H) blocks of one matmul
    [r, z] = σ(Wxh[x_t]_rz + bh_rz + [ur, uz])         reset and update gates
    n = tanh(Wxh[x_t]_n + bh_n + r * un)                candidate
    h_t = (1 - z) * n + z * h_{t-1}                     logits_t = h_t @ Why + by

`Wxh` (V, 3H), `Whh` (H, 3H) and `bh` (3H,) hold the gates side by side as [r, z, n]; `bhn` (H,)
is the candidate's recurrent bias, inside the reset gate. The reset gate multiplies h_{t-1} @ Whh_n
rather than h_{t-1} (as in cuDNN and torch's `nn.GRU`), so one fused (B, H) @ (H, 3H) matmul per
step serves all three blocks. Stacked layers and dropout follow `charrnn_plugins.recurrent`
(layer l > 0 has `Wxh{l}` (H, 3H), `Whh{l}`, `bh{l}`, `bhn{l}` and state `h{l}`). As in `lstm`,
the sigmoid gates' pre-activations are computed halved so one `tanh` serves both:
σ(a) = (1 + tanh(a / 2)) / 2.
"""

from __future__ import annotations

import numpy as np

from charrnn import hookimpl
from charrnn_plugins.recurrent import Arrays, Buffers, LayerBuffers, Recurrent, layer_name, orthogonal


class _Layer(LayerBuffers):
    """One GRU layer's work arrays for a (B, T) shape; per-step views prebuilt."""

    def __init__(self, B: int, T: int, H: int, dtype: np.dtype, dropout: bool) -> None:
        super().__init__(B, T, H, 3 * H, dtype, dropout)  # xs: input projection, then [r, z, n]
        self.un = np.empty((T, B, H), dtype)  # h_{t-1} @ Whh_n + bhn
        self.dh_above = np.empty((T, B, H), dtype)
        self.dx = np.empty((T, B, 3 * H), dtype)  # dL/d(input projection)
        self.du = np.empty((T, B, 3 * H), dtype)  # dL/d(h_{t-1} @ Whh + [0, 0, bhn])
        self.ones_n = np.ones(B * T, dtype)
        self.pre = np.empty((B, 3 * H), dtype)  # h_{t-1} @ Whh
        self.tmp = np.empty((B, H), dtype)
        self.dh = np.empty((B, H), dtype)  # dL/dh_t
        self.dh_prev = np.empty((B, H), dtype)
        gates = [(x[:, :H], x[:, H : 2 * H], x[:, 2 * H :]) for x in self.xs]  # r z n
        rz = [x[:, : 2 * H] for x in self.xs]
        self.forward_steps = list(zip(rz, gates, self.un, self.hs[:-1], self.hs[1:], strict=True))
        dgates = [(d[:, :H], d[:, H : 2 * H], d[:, 2 * H :], d[:, : 2 * H]) for d in self.dx]
        dus = [(u[:, : 2 * H], u[:, 2 * H :]) for u in self.du]
        self.backward_steps = list(
            zip(self.du, dus, dgates, gates, self.un, self.hs[:-1], self.dh_above, strict=True)
        )[::-1]


class GRU(Recurrent):
    """GRU character model (see the module docstring for the equations and gate layout).

    Init: `Whh` is three independent random orthogonal (H, H) blocks, so at the start the
    recurrence neither shrinks nor grows the state or its gradient through time; `Wxh` and `Why`
    are normal with std 1/sqrt(H); biases are zero (z = 1/2: h_t starts as an even mix of the old
    state and the candidate). With Adam, lr 2e-3 is a good start; with Adagrad, 0.01 to 0.05.
    `dtype` is "float32" (fast) or "float64" (gradient checks). `dropout` drops the inputs of
    layers 2..L and of the output layer in `train_step`, which then needs its `rng`.

    Returned arrays: `train_step` grads are buffers overwritten by the next `train_step`; state
    arrays and `step` logits are fresh, and incoming state is never modified.
    """

    gates = 3
    sigmoid_gates = 2

    def __init__(
        self,
        vocab_size: int,
        rng: np.random.Generator,
        hidden_size: int = 128,
        num_layers: int = 1,
        dropout: float = 0.0,
        dtype: str = "float32",
    ) -> None:
        super().__init__(vocab_size, rng, hidden_size, num_layers, dropout, dtype)
        V, H, L = self.vocab_size, self.hidden_size, self.num_layers
        std = 1 / np.sqrt(H)
        params: Arrays = {}
        for l in range(L):
            params[layer_name("Wxh", l)] = rng.standard_normal((V if l == 0 else H, 3 * H)) * std
            params[layer_name("Whh", l)] = np.concatenate([orthogonal(rng, H) for _ in range(3)], axis=1)
            params[layer_name("bh", l)] = np.zeros(3 * H)
            params[layer_name("bhn", l)] = np.zeros(H)
        params["Why"], params["by"] = rng.standard_normal((H, V)) * std, np.zeros(V)
        order = ["Wxh", "Whh", "Why", "bh", "bhn", "by"]  # the one-layer names first, as in `rnn`
        self._finish_init({k: params[k] for k in order + [k for k in params if k not in order]})
        self._Whh_half = [np.empty((H, 3 * H), self.dtype) for _ in range(L)]  # r, z columns halved
        self._WhhT = [np.empty((3 * H, H), self.dtype) for _ in range(L)]  # contiguous Whh.T

    def _layer_buffers(self, B: int, T: int) -> _Layer:
        return _Layer(B, T, self.hidden_size, self.dtype, self.dropout > 0)

    def _forward_layer(self, l: int, lb: _Layer, state: Arrays) -> None:
        H = self.hidden_size
        np.copyto(lb.hs[0], state[layer_name("h", l)])
        W = np.multiply(self.params[layer_name("Whh", l)], self._gate_scale, out=self._Whh_half[l])
        bhn = self.params[layer_name("bhn", l)]
        pre, tmp = lb.pre, lb.tmp
        pre_rz, pre_n = pre[:, : 2 * H], pre[:, 2 * H :]
        for rz, (r, z, n), un, h_prev, h in lb.forward_steps:
            np.dot(h_prev, W, out=pre)  # (B, 3H), r and z blocks halved
            np.add(pre_n, bhn, out=un)
            np.add(rz, pre_rz, out=rz)
            np.tanh(rz, out=rz)
            np.multiply(rz, 0.5, out=rz)
            np.add(rz, 0.5, out=rz)  # [r, z] = σ
            np.multiply(r, un, out=tmp)
            np.add(n, tmp, out=n)
            np.tanh(n, out=n)  # candidate
            np.subtract(h_prev, n, out=h)
            np.multiply(h, z, out=h)
            np.add(h, n, out=h)  # h_t = n + z * (h_{t-1} - n)

    def _backward_layer(self, l: int, lb: _Layer) -> None:
        Whh, bh, bhn = (layer_name(s, l) for s in ("Whh", "bh", "bhn"))
        g_ = self._grads
        WhhT = self._WhhT[l]
        np.copyto(WhhT, self.params[Whh].T)
        dh, dh_prev, tmp = lb.dh, lb.dh_prev, lb.tmp
        du_next = None
        for du, (du_rz, du_n), (dr, dz, dn, drz), (r, z, n), un, h_prev, dh_above in lb.backward_steps:
            if du_next is None:
                np.copyto(dh, dh_above)
            else:
                np.dot(du_next, WhhT, out=dh)  # (B, H) through the gates of t + 1
                np.add(dh, dh_prev, out=dh)  # ... and through z * h_t
                np.add(dh, dh_above, out=dh)
            np.multiply(dh, z, out=dh_prev)  # dL/dh_{t-1} directly through z * h_{t-1}
            np.subtract(1, z, out=tmp)
            np.multiply(z, tmp, out=dz)  # σ'(z)
            np.multiply(tmp, dh, out=tmp)  # dL/dn = dh * (1 - z)
            np.multiply(n, n, out=dn)
            np.subtract(1, dn, out=dn)
            np.multiply(dn, tmp, out=dn)  # dL/d(candidate pre-activation)
            np.subtract(h_prev, n, out=tmp)
            np.multiply(tmp, dh, out=tmp)
            np.multiply(dz, tmp, out=dz)  # dL/d(z pre-activation)
            np.subtract(1, r, out=tmp)
            np.multiply(r, tmp, out=dr)  # σ'(r)
            np.multiply(dn, un, out=tmp)
            np.multiply(dr, tmp, out=dr)  # dL/d(r pre-activation)
            np.copyto(du_rz, drz)
            np.multiply(dn, r, out=du_n)  # dL/d(un)
            du_next = du
        du_flat = lb.flat(lb.du)  # (N, 3H)
        np.dot(lb.h_prev_flat.T, du_flat, out=g_[Whh])  # (H, 3H) summed over all steps at once
        np.dot(lb.ones_n, du_flat[:, 2 * self.hidden_size :], out=g_[bhn])  # (H,)
        np.dot(lb.ones_n, lb.flat(lb.dx), out=g_[bh])  # (3H,)

    def _step_layer(self, l: int, x: np.ndarray, state: Arrays, new: Arrays) -> np.ndarray:
        H = self.hidden_size
        name = layer_name("h", l)
        h_prev = state[name]
        u = np.dot(h_prev, self.params[layer_name("Whh", l)])  # (k, 3H)
        un = u[:, 2 * H :]
        un += self.params[layer_name("bhn", l)]
        rz = x[:, : 2 * H] + u[:, : 2 * H]
        rz *= 0.5
        np.tanh(rz, out=rz)
        rz *= 0.5
        rz += 0.5  # [r, z] = σ, as in the forward pass
        r, z = rz[:, :H], rz[:, H:]
        n = r * un
        n += x[:, 2 * H :]
        np.tanh(n, out=n)
        h = h_prev - n
        h *= z
        h += n
        new[name] = h
        return h

    def _state_out(self, b: Buffers) -> Arrays:
        return {layer_name("h", l): lb.hs[-1].copy() for l, lb in enumerate(b.layers)}


@hookimpl
def charrnn_model(register):
    register("gru", GRU)
