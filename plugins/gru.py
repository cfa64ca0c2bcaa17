"""The `gru` model: a gated recurrent unit network over characters, batched, in NumPy.

    [ur, uz, un] = h_{t-1} @ Whh + [0, 0, bhn]         three blocks of one matmul
    [r, z] = σ(Wxh[x_t]_rz + bh_rz + [ur, uz])         reset and update gates
    n = tanh(Wxh[x_t]_n + bh_n + r * un)                candidate
    h_t = (1 - z) * n + z * h_{t-1}                     logits_t = h_t @ Why + by

`Wxh` (V, 3H), `Whh` (H, 3H) and `bh` (3H,) hold the gates side by side as [r, z, n]; `bhn` (H,)
is the candidate's recurrent bias, inside the reset gate. The reset gate multiplies h_{t-1} @ Whh_n
rather than h_{t-1} (as in cuDNN and torch's `nn.GRU`), so one fused matmul per step serves all
three blocks. Stacked layers and dropout follow `charrnn_plugins.recurrent` (layer l > 0 has
`Wxh{l}` (H, 3H), `Whh{l}`, `bh{l}`, `bhn{l}` and state `h{l}`). The speed levers and the
feature-major layout are those of `lstm` (the step's matmul is (3H, H) @ (H, B)), and as there
the sigmoid gates' pre-activations are computed halved so one `tanh` serves both:
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
    """What the forward loop touches at time step t: (F, B) views (a slotted dataclass, as in `lstm`)."""

    rz: np.ndarray  # (2H, B) the sigmoid gates [r, z]: pre-activations halved, then values
    r: np.ndarray  # (H, B) reset gate
    z: np.ndarray  # (H, B) update gate
    n: np.ndarray  # (H, B) candidate
    x_rz: np.ndarray  # (2H, B) the input projection of [r, z], halved
    x_n: np.ndarray  # (H, B) the input projection of n
    un: np.ndarray  # (H, B) h_{t-1} @ Whh_n + bhn
    h_prev: np.ndarray  # (H, B) h_{t-1}
    h: np.ndarray  # (H, B) h_t


@dataclass(frozen=True, slots=True)
class _Backward:
    """What the backward loop touches at time step t (views, as `_Forward`)."""

    du: np.ndarray  # (3H, B) dL/du of step t; step t + 1's is the other buffer
    r: np.ndarray  # the gate values of step t, as in `_Forward`
    z: np.ndarray
    n: np.ndarray
    un: np.ndarray
    h_prev: np.ndarray
    dh_above: np.ndarray  # (H, B) dL/dh_t from the layer above (or the output layer)
    dx: np.ndarray  # (3H, B) where dL/d(input projection) of step t is kept for the weight gradients
    du_seq: np.ndarray  # (3H, B) where dL/du of step t is kept for the weight gradients


class _Layer(rec.LayerBuffers):
    """One GRU layer's work arrays for a (B, T) shape, feature-major as in `lstm`; per-step views prebuilt."""

    def __init__(self, B: int, T: int, H: int, dtype: np.dtype, dropout: bool, first: bool) -> None:
        G = 3 * H
        # input projection, r and z rows halved: gathered per step in the first layer, else a matmul
        self.xs = np.empty((T, G, B) if first else (G, T, B), dtype)
        self.hs = np.empty((H, T + 1, B), dtype)  # hs[:, 0] incoming state, hs[:, t + 1] = h_t
        self.dh_above = np.empty((H, T, B), dtype)
        self.dx = np.empty((G, T, B), dtype)  # dL/d(input projection)
        self.du = np.empty((G, T, B), dtype)  # dL/d(h_{t-1} @ Whh + [0, 0, bhn])
        super().__init__(
            None if first else features_first(self.xs),
            features_first(self.dx),
            self.hs[:, 1:],
            self.dh_above,
            features_first,
            dropout,
        )
        self.h_prevT = features_first(self.hs[:, :-1])  # (H, N)
        self.duT = features_first(self.du)  # (3H, N)
        self.acts = np.empty((T, G, B), dtype)  # gate values [r, z, n]
        self.un = np.empty((T, H, B), dtype)  # h_{t-1} @ Whh_n + bhn
        self.u = np.empty((G, B), dtype)  # h_{t-1} @ Whh, r and z rows halved
        self.d = np.empty((G, B), dtype)  # dL/d(input projection) of step t
        self.dus = np.empty((2, G, B), dtype)  # dL/du of steps t and t + 1
        self.tmp, self.dh, self.dh_prev = (np.empty((H, B), dtype) for _ in range(3))
        xs = self.xs if first else self.xs.transpose(1, 0, 2)  # (T, 3H, B) views
        self.forward_steps = [
            _Forward(
                rz=a[: 2 * H],
                r=a[:H],
                z=a[H : 2 * H],
                n=a[2 * H :],
                x_rz=x[: 2 * H],
                x_n=x[2 * H :],
                un=self.un[t],
                h_prev=self.hs[:, t],
                h=self.hs[:, t + 1],
            )
            for t, (a, x) in enumerate(zip(self.acts, xs, strict=True))
        ]
        d = self.d
        self.backward_steps = [
            _Backward(
                du=self.dus[t % 2],
                r=s.r,
                z=s.z,
                n=s.n,
                un=s.un,
                h_prev=s.h_prev,
                dh_above=self.dh_above[:, t],
                dx=self.dx[:, t],
                du_seq=self.du[:, t],
            )
            for t, s in reversed(list(enumerate(self.forward_steps)))
        ]
        self.d_blocks = (d[:H], d[H : 2 * H], d[2 * H :], d[: 2 * H])  # dr, dz, dn, drz


class GRU(rec.Recurrent):
    """GRU character model (see the module docstring for the equations and gate layout).

    Init: `Whh` is three independent random orthogonal (H, H) blocks, so at the start the
    recurrence neither shrinks nor grows the state or its gradient through time; `Wxh` and `Why`
    are normal with std 1/sqrt(H); biases are zero (z = 1/2: h_t starts as an even mix of the old
    state and the candidate). Learning rate (tinyshakespeare, H 256-512, B 32): Adam 2e-3 to 5e-3
    (1e-2 is unstable at H 512), Adagrad 0.01 to 0.05.
    `dtype` is "float32" (fast) or "float64" (gradient checks). `dropout` drops the inputs of
    layers 2..L and of the output layer in `train_step`, which then needs its `rng`.

    Returned arrays: `train_step` grads are buffers overwritten by the next `train_step`; state
    arrays and `step` logits are fresh, and incoming state is never modified.
    """

    gates = 3
    sigmoid_gates = 2
    feature_major = True
    work_arrays = (4, 3)  # xs, dx, du, acts of 3H; hs, dh_above, un of H (memory estimate)

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
        params: Arrays = {}
        for layer in range(L):
            params[layer_name("Wxh", layer)] = rng.standard_normal((V if layer == 0 else H, 3 * H)) * std
            params[layer_name("Whh", layer)] = np.concatenate(
                [rec.orthogonal(rng, H) for _ in range(3)], axis=1
            )
            params[layer_name("bh", layer)] = np.zeros(3 * H)
            params[layer_name("bhn", layer)] = np.zeros(H)
        params["Why"], params["by"] = rng.standard_normal((H, V)) * std, np.zeros(V)
        order = ["Wxh", "Whh", "Why", "bh", "bhn", "by"]  # the one-layer names first, as in `rnn`
        self._finish_init({k: params[k] for k in order + [k for k in params if k not in order]})
        self._WhhT_half = [np.empty((3 * H, H), self.dtype) for _ in range(L)]  # r, z rows halved

    def _layer_buffers(self, B: int, T: int, layer: int) -> _Layer:
        return _Layer(B, T, self.hidden_size, self.dtype, self.dropout > 0, layer == 0)

    def _forward_layer(self, layer: int, lb: _Layer, state: Arrays) -> None:
        H = self.hidden_size
        np.copyto(lb.hs[:, 0], state[layer_name("h", layer)].T)
        WT = self._WhhT_half[layer]  # (3H, H)
        rec.transpose_into(self.params[layer_name("Whh", layer)], WT)
        WT *= self._gate_scale[:, None]
        bhn = self.params[layer_name("bhn", layer)][:, None]  # (H, 1)
        u, tmp = lb.u, lb.tmp
        u_rz, u_n = u[: 2 * H], u[2 * H :]
        for s in lb.forward_steps:
            np.matmul(WT, s.h_prev, out=u)  # (3H, B)
            np.add(u_n, bhn, out=s.un)
            np.add(u_rz, s.x_rz, out=s.rz)  # pre-activations, halved
            np.tanh(s.rz, out=s.rz)
            np.multiply(s.rz, 0.5, out=s.rz)
            np.add(s.rz, 0.5, out=s.rz)  # [r, z] = σ
            np.multiply(s.r, s.un, out=s.n)
            np.add(s.n, s.x_n, out=s.n)
            np.tanh(s.n, out=s.n)  # candidate
            np.subtract(s.h_prev, s.n, out=tmp)
            np.multiply(tmp, s.z, out=tmp)
            np.add(tmp, s.n, out=s.h)  # h_t = n + z * (h_{t-1} - n)

    def _backward_layer(self, layer: int, lb: _Layer) -> None:
        H = self.hidden_size
        Whh, bh, bhn = (layer_name(s, layer) for s in ("Whh", "bh", "bhn"))
        W, g_ = self.params[Whh], self._grads
        dh, dh_prev, tmp, d = lb.dh, lb.dh_prev, lb.tmp, lb.d
        dr, dz, dn, drz = lb.d_blocks
        du_next = None
        for s in lb.backward_steps:
            if du_next is None:
                np.copyto(dh, s.dh_above)
            else:
                np.matmul(W, du_next, out=dh)  # (H, B) through the gates of t + 1
                np.add(dh, dh_prev, out=dh)  # ... and through z * h_t
                np.add(dh, s.dh_above, out=dh)
            np.multiply(dh, s.z, out=dh_prev)  # dL/dh_{t-1} directly through z * h_{t-1}
            np.subtract(1, s.z, out=tmp)
            np.multiply(s.z, tmp, out=dz)  # σ'(z)
            np.multiply(tmp, dh, out=tmp)  # dL/dn = dh * (1 - z)
            np.multiply(s.n, s.n, out=dn)
            np.subtract(1, dn, out=dn)
            np.multiply(dn, tmp, out=dn)  # dL/d(candidate pre-activation)
            np.subtract(s.h_prev, s.n, out=tmp)
            np.multiply(tmp, dh, out=tmp)
            np.multiply(dz, tmp, out=dz)  # dL/d(z pre-activation)
            np.subtract(1, s.r, out=tmp)
            np.multiply(s.r, tmp, out=dr)  # σ'(r)
            np.multiply(dn, s.un, out=tmp)
            np.multiply(dr, tmp, out=dr)  # dL/d(r pre-activation)
            du = s.du
            np.copyto(du[: 2 * H], drz)
            np.multiply(dn, s.r, out=du[2 * H :])  # dL/d(un)
            np.copyto(s.dx, d)
            np.copyto(s.du_seq, du)
            du_next = du
        np.dot(lb.h_prevT, lb.duT.T, out=g_[Whh])  # (H, 3H) summed over all steps at once
        np.dot(lb.duT[2 * H :], lb.ones_n, out=g_[bhn])  # (H,)
        np.dot(lb.dxT, lb.ones_n, out=g_[bh])  # (3H,)

    def _step_layer(self, layer: int, x: np.ndarray, state: Arrays, new: Arrays) -> np.ndarray:
        H = self.hidden_size
        name = layer_name("h", layer)
        h_prev = state[name]
        u = np.dot(h_prev, self.params[layer_name("Whh", layer)])  # (k, 3H)
        un = u[:, 2 * H :]
        un += self.params[layer_name("bhn", layer)]
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

    def _state_out(self, b: rec.Buffers) -> Arrays:
        return {
            layer_name("h", layer): np.ascontiguousarray(lb.hs[:, -1].T) for layer, lb in enumerate(b.layers)
        }


def export_network(model: GRU) -> ExportNetwork:
    """The model as ONNX `GRU` layers with `linear_before_reset=1`: gate blocks [r, z, n] become
    ONNX's [z, r, h]; Wb = bh so reordered, and Rb = [0, 0, bhn], the candidate's recurrent bias."""
    H, p = model.hidden_size, model.params

    def recurrent_bias(layer: int) -> np.ndarray:
        bhn = p[layer_name("bhn", layer)]
        return np.concatenate([np.zeros(2 * H, bhn.dtype), bhn])  # (3H,) [z, r, h]

    return rec.export_stack(model, "GRU", (1, 0, 2), recurrent_bias)


@hookimpl
def charrnn_model(register):
    register("gru", GRU)


@hookimpl
def charrnn_exporter(register):
    register("gru", export_network)
