"""The `lstm` model: a long short-term memory network over characters, batched, in NumPy.

    [o, i, f, g] = [σ, σ, σ, tanh](Wxh[x_t] + h_{t-1} @ Whh + bh)   four (B, H) gate blocks
    c_t = f * c_{t-1} + i * g        h_t = o * tanh(c_t)        logits_t = h_t @ Why + by

`Wxh` (V, 4H), `Whh` (H, 4H) and `bh` (4H,) hold the four gates side by side in the order
[o, i, f, g]: the sigmoid gates are one contiguous (B, 3H) block, and the gates whose gradient is
dc times something, [i, f, g], are one (B, 3H) block too. Stacked layers (`num_layers`) and
dropout follow `charrnn_plugins.recurrent`: layer l > 0 has `Wxh{l}` (H, 4H), `Whh{l}`, `bh{l}`
and state `h{l}`, `c{l}`.

Speed comes from the same levers as `rnn`: the input projection of all time steps is one
gather (layer 0) or one matmul (layers above), the output layer and all weight gradients are
matmuls over all B*T positions outside the time loop, and each time step does one fused
(B, H) @ (H, 4H) matmul plus a few NumPy calls on preallocated time-major buffers. One `tanh`
serves all four gates: the sigmoid gates' pre-activations are computed halved (by halved
copies of the weights) and σ(a) = (1 + tanh(a / 2)) / 2.
"""

from __future__ import annotations

import numpy as np

from charrnn import hookimpl
from charrnn_plugins.recurrent import Arrays, Buffers, LayerBuffers, Recurrent, layer_name, orthogonal


class _Layer(LayerBuffers):
    """One LSTM layer's work arrays for a (B, T) shape; per-step views prebuilt."""

    def __init__(self, B: int, T: int, H: int, dtype: np.dtype, dropout: bool) -> None:
        super().__init__(B, T, H, 4 * H, dtype, dropout)  # xs: input projection, then gate values
        self.cs = np.empty((T + 1, B, H), dtype)  # cs[0] incoming cell state, cs[t + 1] = c_t
        self.tcs = np.empty((T, B, H), dtype)  # tanh(c_t)
        self.dh_above = np.empty((T, B, H), dtype)
        self.dx = np.empty((T, B, 4 * H), dtype)  # dL/d(gate pre-activations)
        self.ones_n = np.ones(B * T, dtype)
        self.pre = np.empty((B, 4 * H), dtype)  # h_{t-1} @ Whh
        self.tmp = np.empty((B, H), dtype)
        self.dh = np.empty((B, H), dtype)  # dL/dh_t
        self.dc = np.empty((B, H), dtype)  # dL/dc_t
        gates = [(x[:, :H], x[:, H : 2 * H], x[:, 2 * H : 3 * H], x[:, 3 * H :]) for x in self.xs]  # o i f g
        sig = [x[:, : 3 * H] for x in self.xs]
        self.forward_steps = list(
            zip(self.xs, sig, gates, self.cs[:-1], self.cs[1:], self.tcs, self.hs[1:], strict=True)
        )
        dgates = [(d[:, :H], d[:, H:].reshape(B, 3, H), d[:, : 3 * H], d[:, 3 * H :]) for d in self.dx]
        self.backward_steps = list(
            zip(self.dx, dgates, sig, gates, self.cs[:-1], self.tcs, self.dh_above, strict=True)
        )[::-1]


class LSTM(Recurrent):
    """LSTM character model (see the module docstring for the equations and gate layout).

    Init: `Whh` is four independent random orthogonal (H, H) blocks, so at the start the
    recurrence neither shrinks nor grows the state or its gradient through time; `Wxh` and
    `Why` are normal with std 1/sqrt(H) (for a one-hot input that gives small pre-activations,
    for a layer input of H values in (-1, 1) a fan-in-scaled one); biases are zero except the
    forget gate's, which is 1, so cells remember by default and gradients flow through c from
    the start (Jozefowicz et al., 2015). With Adam, lr 2e-3 is a good start; with Adagrad, 0.01
    to 0.05. `dtype` is "float32" (fast) or "float64" (gradient checks). `dropout` drops the
    inputs of layers 2..L and of the output layer in `train_step`, which then needs its `rng`.

    Returned arrays: `train_step` grads are buffers overwritten by the next `train_step`; state
    arrays and `step` logits are fresh, and incoming state is never modified.
    """

    gates = 4
    state_names = ("h", "c")
    sigmoid_gates = 3

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
        bias = np.zeros(4 * H)
        bias[2 * H : 3 * H] = 1.0  # forget gate
        params: Arrays = {}
        for l in range(L):
            params[layer_name("Wxh", l)] = rng.standard_normal((V if l == 0 else H, 4 * H)) * std
            params[layer_name("Whh", l)] = np.concatenate([orthogonal(rng, H) for _ in range(4)], axis=1)
            params[layer_name("bh", l)] = bias
        params["Why"], params["by"] = rng.standard_normal((H, V)) * std, np.zeros(V)
        order = ["Wxh", "Whh", "Why", "bh", "by"]  # the one-layer names first, as in `rnn`
        self._finish_init({k: params[k] for k in order + [k for k in params if k not in order]})
        self._Whh_half = [np.empty((H, 4 * H), self.dtype) for _ in range(L)]  # sigmoid columns halved
        self._WhhT = [np.empty((4 * H, H), self.dtype) for _ in range(L)]  # contiguous Whh.T

    def _layer_buffers(self, B: int, T: int) -> _Layer:
        return _Layer(B, T, self.hidden_size, self.dtype, self.dropout > 0)

    def _forward_layer(self, l: int, lb: _Layer, state: Arrays) -> None:
        np.copyto(lb.hs[0], state[layer_name("h", l)])
        np.copyto(lb.cs[0], state[layer_name("c", l)])
        W = np.multiply(self.params[layer_name("Whh", l)], self._gate_scale, out=self._Whh_half[l])
        pre, tmp = lb.pre, lb.tmp
        h_prev = lb.hs[0]
        for x, sig, (o, i, f, g), c_prev, c, tc, h in lb.forward_steps:
            np.dot(h_prev, W, out=pre)  # (B, 4H)
            np.add(x, pre, out=x)  # pre-activations, sigmoid blocks halved
            np.tanh(x, out=x)
            np.multiply(sig, 0.5, out=sig)
            np.add(sig, 0.5, out=sig)  # [o, i, f] = σ
            np.multiply(f, c_prev, out=c)
            np.multiply(i, g, out=tmp)
            np.add(c, tmp, out=c)  # c_t = f * c_{t-1} + i * g
            np.tanh(c, out=tc)
            np.multiply(o, tc, out=h)  # h_t = o * tanh(c_t)
            h_prev = h

    def _backward_layer(self, l: int, lb: _Layer) -> None:
        Whh, bh = layer_name("Whh", l), layer_name("bh", l)
        g_ = self._grads
        WhhT = self._WhhT[l]
        np.copyto(WhhT, self.params[Whh].T)
        dh, dc, tmp = lb.dh, lb.dc, lb.tmp
        dc.fill(0)  # nothing flows into the last cell state from beyond the chunk
        dx_next = None
        for dx, (do, difg, dsig, dg), sig, (o, i, f, g), c_prev, tc, dh_above in lb.backward_steps:
            if dx_next is None:
                np.copyto(dh, dh_above)
            else:
                np.dot(dx_next, WhhT, out=dh)  # (B, H) dL/dh_t through the gates of t + 1
                np.add(dh, dh_above, out=dh)
            np.multiply(tc, tc, out=tmp)
            np.subtract(1, tmp, out=tmp)
            np.multiply(tmp, o, out=tmp)
            np.multiply(tmp, dh, out=tmp)
            np.add(dc, tmp, out=dc)  # dc_t += dh_t * o * tanh'(c_t)
            np.multiply(sig, sig, out=dsig)
            np.subtract(sig, dsig, out=dsig)  # σ' = σ(1 - σ) for o, i, f
            np.multiply(g, g, out=dg)
            np.subtract(1, dg, out=dg)  # tanh' = 1 - g^2
            np.multiply(difg, dc[:, None, :], out=difg)  # [i, f, g] blocks: times dc
            np.multiply(do, dh, out=do)
            np.multiply(do, tc, out=do)  # do = dh * tanh(c) * σ'
            np.multiply(difg[:, 0], g, out=difg[:, 0])  # di = dc * g * σ'
            np.multiply(difg[:, 1], c_prev, out=difg[:, 1])  # df = dc * c_{t-1} * σ'
            np.multiply(difg[:, 2], i, out=difg[:, 2])  # dg = dc * i * tanh'
            np.multiply(dc, f, out=dc)  # dL/dc_{t-1} through the cell
            dx_next = dx
        dx_flat = lb.flat(lb.dx)  # (N, 4H)
        np.dot(lb.h_prev_flat.T, dx_flat, out=g_[Whh])  # (H, 4H) summed over all steps at once
        np.dot(lb.ones_n, dx_flat, out=g_[bh])  # (4H,)

    def _step_layer(self, l: int, x: np.ndarray, state: Arrays, new: Arrays) -> np.ndarray:
        H = self.hidden_size
        hn, cn = layer_name("h", l), layer_name("c", l)
        a = np.dot(state[hn], self.params[layer_name("Whh", l)])  # (k, 4H)
        a += x
        sig = a[:, : 3 * H]
        sig *= 0.5
        np.tanh(a, out=a)
        sig *= 0.5
        sig += 0.5  # [o, i, f] = σ, as in the forward pass
        o, i, f, g = a[:, :H], a[:, H : 2 * H], a[:, 2 * H : 3 * H], a[:, 3 * H :]
        c = f * state[cn]
        c += i * g
        h = np.tanh(c)
        h *= o
        new[hn], new[cn] = h, c
        return h

    def _state_out(self, b: Buffers) -> Arrays:
        out = {}
        for l, lb in enumerate(b.layers):
            out[layer_name("h", l)], out[layer_name("c", l)] = lb.hs[-1].copy(), lb.cs[-1].copy()
        return out


@hookimpl
def charrnn_model(register):
    register("lstm", LSTM)
