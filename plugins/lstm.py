"""The `lstm` model: a long short-term memory network over characters, batched, in NumPy.

    [o, i, f, g] = [σ, σ, σ, tanh](Wxh[x_t] + h_{t-1} @ Whh + bh)   four (B, H) gate blocks
    c_t = f * c_{t-1} + i * g        h_t = o * tanh(c_t)        logits_t = h_t @ Why + by

`Wxh` (V, 4H), `Whh` (H, 4H) and `bh` (4H,) hold the four gates side by side in the order
[o, i, f, g]: the sigmoid gates are one contiguous 3H block, and the gates whose gradient is dc
times something, [i, f, g], are one 3H block too. Stacked layers (`num_layers`) and dropout
follow `charrnn_plugins.recurrent`: layer l > 0 has `Wxh{l}` (H, 4H), `Whh{l}`, `bh{l}` and
state `h{l}`, `c{l}`.

Speed comes from the same levers as `rnn`: the input projection of all time steps is gathered
(layer 0) or one matmul (layers above), the output layer and all weight gradients are matmuls
over all B*T positions outside the time loop, and each time step does one fused matmul plus a
dozen NumPy calls on contiguous slabs of preallocated buffers. The loop runs feature-major:
the step's matmul is (4H, H) @ (H, B), which OpenBLAS runs ~1.8x faster than the row-major
(B, H) @ (H, 4H) when B is small. One `tanh` serves all four gates: the sigmoid gates'
pre-activations are computed halved (by halved copies of the weights) and
σ(a) = (1 + tanh(a / 2)) / 2.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from charrnn import hookimpl
from charrnn.types import ExportNetwork
from charrnn_plugins import recurrent as rec
from charrnn_plugins.recurrent import Arrays, features_first, layer_name


@dataclass(frozen=True, slots=True)
class _Forward:
    """What the forward loop touches at time step t: (F, B) views into the layer's buffers.

    Named, so the loop says what it reads and writes; a slotted dataclass rather than a
    NamedTuple, because the loop reads some twenty fields per step and slots read fastest.
    """

    a: np.ndarray  # (4H, B) pre-activations, then the gate values [o, i, f, g]
    sig: np.ndarray  # (3H, B) the sigmoid gates [o, i, f] of `a`
    o: np.ndarray  # (H, B) each gate of `a`
    i: np.ndarray
    f: np.ndarray
    g: np.ndarray
    x: np.ndarray  # (4H, B) the input projection, sigmoid rows halved
    h_prev: np.ndarray  # (H, B) h_{t-1}
    h: np.ndarray  # (H, B) h_t
    c_prev: np.ndarray  # (H, B) c_{t-1}
    c: np.ndarray  # (H, B) c_t
    tc: np.ndarray  # (H, B) tanh(c_t)


@dataclass(frozen=True, slots=True)
class _Backward:
    """What the backward loop touches at time step t (views, as `_Forward`)."""

    d: np.ndarray  # (4H, B) dL/d(pre-activations) of step t; step t + 1's is the other buffer
    do: np.ndarray  # (H, B) its o block
    difg: np.ndarray  # (3, H, B) its [i, f, g] blocks
    dsig: np.ndarray  # (3H, B) its sigmoid blocks [o, i, f]: first σ' = σ(1 - σ)
    dg: np.ndarray  # (H, B) its g block: first tanh' = 1 - g^2
    sig: np.ndarray  # the gate values of step t, as in `_Forward`
    o: np.ndarray
    i: np.ndarray
    f: np.ndarray
    g: np.ndarray
    c_prev: np.ndarray  # (H, B) c_{t-1}
    tc: np.ndarray  # (H, B) tanh(c_t)
    dh_above: np.ndarray  # (H, B) dL/dh_t from the layer above (or the output layer)
    dx: np.ndarray  # (4H, B) where dL/d(pre-activations) of step t is kept for the weight gradients


class _Layer(rec.LayerBuffers):
    """One LSTM layer's work arrays for a (B, T) shape, feature-major; per-step views prebuilt.

    The per-step matmul is (4H, H) @ (H, B): with B the short axis OpenBLAS runs it ~1.8x faster
    than (B, H) @ (H, 4H). What the time loop touches per step is a contiguous (F, B) slab: gates
    (T, 4H, B), cell states (T + 1, H, B), the first layer's gathered input projection. What the
    matmuls outside the loop need is (F, N): the hidden states `hs`, `dx` and the projected input
    of higher layers are (F, T, B), and the loop reads or writes their (F, B) slices strided.
    """

    def __init__(self, B: int, T: int, H: int, dtype: np.dtype, dropout: bool, first: bool) -> None:
        G = 4 * H
        # input projection, sigmoid rows halved: gathered per step in the first layer, else a matmul
        self.xs = np.empty((T, G, B) if first else (G, T, B), dtype)
        self.hs = np.empty((H, T + 1, B), dtype)  # hs[:, 0] incoming state, hs[:, t + 1] = h_t
        self.dh_above = np.empty((H, T, B), dtype)
        self.dx = np.empty((G, T, B), dtype)  # dL/d(gate pre-activations)
        super().__init__(
            None if first else features_first(self.xs),
            features_first(self.dx),
            self.hs[:, 1:],
            self.dh_above,
            features_first,
            dropout,
        )
        self.h_prevT = features_first(self.hs[:, :-1])  # (H, N)
        self.acts = np.empty((T, G, B), dtype)  # gate values [o, i, f, g]
        self.cs = np.empty((T + 1, H, B), dtype)  # cs[0] incoming cell state, cs[t + 1] = c_t
        self.tcs = np.empty((T, H, B), dtype)  # tanh(c_t)
        self.dxs = np.empty((2, G, B), dtype)  # dL/d(pre-activations) of steps t and t + 1
        self.tmp, self.dh, self.dc = (np.empty((H, B), dtype) for _ in range(3))  # dh: dL/dh_t, dc: dL/dc_t
        self.forward_steps = [
            _Forward(
                a=a,
                sig=a[: 3 * H],
                o=a[:H],
                i=a[H : 2 * H],
                f=a[2 * H : 3 * H],
                g=a[3 * H :],
                x=self.xs[t] if first else self.xs[:, t],
                h_prev=self.hs[:, t],
                h=self.hs[:, t + 1],
                c_prev=self.cs[t],
                c=self.cs[t + 1],
                tc=self.tcs[t],
            )
            for t, a in enumerate(self.acts)
        ]
        ds = [
            dict(d=d, do=d[:H], difg=d[H:].reshape(3, H, B), dsig=d[: 3 * H], dg=d[3 * H :]) for d in self.dxs
        ]
        self.backward_steps = [
            _Backward(
                **ds[t % 2],
                sig=s.sig,
                o=s.o,
                i=s.i,
                f=s.f,
                g=s.g,
                c_prev=s.c_prev,
                tc=s.tc,
                dh_above=self.dh_above[:, t],
                dx=self.dx[:, t],
            )
            for t, s in reversed(list(enumerate(self.forward_steps)))
        ]


class LSTM(rec.Recurrent):
    """LSTM character model (see the module docstring for the equations and gate layout).

    Init: `Whh` is four independent random orthogonal (H, H) blocks, so at the start the
    recurrence neither shrinks nor grows the state or its gradient through time; `Wxh` and
    `Why` are normal with std 1/sqrt(H) (for a one-hot input that gives small pre-activations,
    for a layer input of H values in (-1, 1) a fan-in-scaled one); biases are zero except the
    forget gate's, which is 1, so cells remember by default and gradients flow through c from
    the start (Jozefowicz et al., 2015). Learning rate (tinyshakespeare, H 256-512, B 32): Adam
    5e-3 is a good start (2e-3 to 1e-2 all train), Adagrad about 0.05. `dtype` is "float32"
    (fast) or "float64" (gradient checks). `dropout` drops the inputs of layers 2..L and of the
    output layer in `train_step`, which then needs its `rng`.

    Returned arrays: `train_step` grads are buffers overwritten by the next `train_step`; state
    arrays and `step` logits are fresh, and incoming state is never modified.
    """

    gates = 4
    state_names = ("h", "c")
    sigmoid_gates = 3
    feature_major = True
    work_arrays = (3, 4)  # xs, dx, acts of 4H; hs, dh_above, cs, tcs of H (memory estimate)

    def __init__(
        self,
        vocab_size: int,
        rng: np.random.Generator,
        hidden_size: rec.HiddenSize = 128,
        num_layers: rec.NumLayers = 1,
        dropout: rec.Dropout = 0.0,
        dtype: rec.DType = "float32",
    ) -> None:
        super().__init__(vocab_size, rng, hidden_size, num_layers, dropout, dtype)
        V, H, L = self.vocab_size, self.hidden_size, self.num_layers
        std = 1 / np.sqrt(H)
        bias = np.zeros(4 * H)
        bias[2 * H : 3 * H] = 1.0  # forget gate
        params: Arrays = {}
        for layer in range(L):
            params[layer_name("Wxh", layer)] = rng.standard_normal((V if layer == 0 else H, 4 * H)) * std
            params[layer_name("Whh", layer)] = np.concatenate(
                [rec.orthogonal(rng, H) for _ in range(4)], axis=1
            )
            params[layer_name("bh", layer)] = bias
        params["Why"], params["by"] = rng.standard_normal((H, V)) * std, np.zeros(V)
        order = ["Wxh", "Whh", "Why", "bh", "by"]  # the one-layer names first, as in `rnn`
        self._finish_init({k: params[k] for k in order + [k for k in params if k not in order]})
        self._WhhT_half = [np.empty((4 * H, H), self.dtype) for _ in range(L)]  # sigmoid rows halved

    def _layer_buffers(self, B: int, T: int, layer: int) -> _Layer:
        return _Layer(B, T, self.hidden_size, self.dtype, self.dropout > 0, layer == 0)

    def _forward_layer(self, layer: int, lb: _Layer, state: Arrays) -> None:
        np.copyto(lb.hs[:, 0], state[layer_name("h", layer)].T)
        np.copyto(lb.cs[0], state[layer_name("c", layer)].T)
        WT = self._WhhT_half[layer]  # (4H, H)
        rec.transpose_into(self.params[layer_name("Whh", layer)], WT)
        WT *= self._gate_scale[:, None]
        tmp = lb.tmp
        for s in lb.forward_steps:
            np.matmul(WT, s.h_prev, out=s.a)  # (4H, B)
            np.add(s.a, s.x, out=s.a)  # pre-activations, sigmoid rows halved
            np.tanh(s.a, out=s.a)
            np.multiply(s.sig, 0.5, out=s.sig)
            np.add(s.sig, 0.5, out=s.sig)  # [o, i, f] = σ
            np.multiply(s.f, s.c_prev, out=s.c)
            np.multiply(s.i, s.g, out=tmp)
            np.add(s.c, tmp, out=s.c)  # c_t = f * c_{t-1} + i * g
            np.tanh(s.c, out=s.tc)
            np.multiply(s.o, s.tc, out=s.h)  # h_t = o * tanh(c_t)

    def _backward_layer(self, layer: int, lb: _Layer) -> None:
        Whh, bh = layer_name("Whh", layer), layer_name("bh", layer)
        W, g_ = self.params[Whh], self._grads
        dh, dc, tmp = lb.dh, lb.dc, lb.tmp
        dc.fill(0)  # nothing flows into the last cell state from beyond the chunk
        d_next = None
        for s in lb.backward_steps:
            if d_next is None:
                np.copyto(dh, s.dh_above)
            else:
                np.matmul(W, d_next, out=dh)  # (H, B) dL/dh_t through the gates of t + 1
                np.add(dh, s.dh_above, out=dh)
            np.multiply(s.tc, s.tc, out=tmp)
            np.subtract(1, tmp, out=tmp)
            np.multiply(tmp, s.o, out=tmp)
            np.multiply(tmp, dh, out=tmp)
            np.add(dc, tmp, out=dc)  # dc_t += dh_t * o * tanh'(c_t)
            np.multiply(s.sig, s.sig, out=s.dsig)
            np.subtract(s.sig, s.dsig, out=s.dsig)  # σ' = σ(1 - σ) for o, i, f
            np.multiply(s.g, s.g, out=s.dg)
            np.subtract(1, s.dg, out=s.dg)  # tanh' = 1 - g^2
            difg = s.difg
            np.multiply(difg, dc, out=difg)  # [i, f, g] blocks: times dc
            np.multiply(s.do, dh, out=s.do)
            np.multiply(s.do, s.tc, out=s.do)  # do = dh * tanh(c) * σ'
            np.multiply(difg[0], s.g, out=difg[0])  # di = dc * g * σ'
            np.multiply(difg[1], s.c_prev, out=difg[1])  # df = dc * c_{t-1} * σ'
            np.multiply(difg[2], s.i, out=difg[2])  # dg = dc * i * tanh'
            np.multiply(dc, s.f, out=dc)  # dL/dc_{t-1} through the cell
            np.copyto(s.dx, s.d)
            d_next = s.d
        np.dot(lb.h_prevT, lb.dxT.T, out=g_[Whh])  # (H, 4H) summed over all steps at once
        np.dot(lb.dxT, lb.ones_n, out=g_[bh])  # (4H,)

    def _step_layer(self, layer: int, x: np.ndarray, state: Arrays, new: Arrays) -> np.ndarray:
        H = self.hidden_size
        hn, cn = layer_name("h", layer), layer_name("c", layer)
        a = np.dot(state[hn], self.params[layer_name("Whh", layer)])  # (k, 4H)
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

    def _state_out(self, b: rec.Buffers) -> Arrays:
        out = {}
        for layer, lb in enumerate(b.layers):
            out[layer_name("h", layer)] = np.ascontiguousarray(lb.hs[:, -1].T)  # (B, H)
            out[layer_name("c", layer)] = np.ascontiguousarray(lb.cs[-1].T)
        return out


def export_network(model: LSTM) -> ExportNetwork:
    """The model as ONNX `LSTM` layers: gate blocks [o, i, f, g] become ONNX's [i, o, f, c]; Rb = 0."""
    return rec.export_stack(model, "LSTM", (1, 0, 2, 3))


@hookimpl
def charrnn_model(register):
    register("lstm", LSTM)


@hookimpl
def charrnn_exporter(register):
    register("lstm", export_network)
