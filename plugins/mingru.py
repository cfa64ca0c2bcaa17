"""The `mingru` model: residual blocks of a causal conv, a minGRU and a feed-forward layer, in NumPy.

After "Were RNNs All We Needed?" (Feng et al., 2024). Over N = B*T positions, row n = t * B + b:

    x = dropout(E[ids])                                            (N, D) embedding rows
    block l, recurrent branch:
        u = rms(x) * gm                                            RMSNorm, rms(x) = x / sqrt(mean(x^2) + eps)
        c_t = sum_j Wc[j] * u_{t - K + 1 + j}                      causal depthwise conv over time, kernel K
        [a_z, h~] = c @ Wzh + bzh          z = σ(a_z)              gate and candidate, no dependence on h
        h_t = (1 - z_t) * h_{t-1} + z_t * h~_t                     the minGRU: the only loop over time
        x = x + dropout(h @ Wo + bo)
    block l, feed-forward branch:
        x = x + dropout(act(rms(x) * gf @ Wu + bu) @ Wd + bd)      act: GELU (tanh form), SiLU or ReLU
    logits = rms(x) * gy @ Why + by

D is `hidden_size`, H = round(`expansion` * D) the minGRU's width, F = round(`ffn_mult` * D) the
feed-forward width, K = `conv_kernel`, L = `num_layers` blocks. Block l > 0 suffixes its names
with l (`Wzh1`, `h1`), as the stacked recurrent models do.

The state carried between chunks is what the next chunk needs and nothing else: per block `h{l}`
(B, H), the last minGRU state, and `conv{l}` (B, K - 1, D), the last K - 1 conv inputs u, oldest
first (absent when K = 1). So consecutive chunks with carried state compute what one chunk of
their concatenation computes, and generating one step at a time computes the full forward pass.

Everything but the recurrence is a whole-sequence matrix product or elementwise pass over the
(N, F) row-major buffers; the recurrence is two NumPy calls per time step on contiguous (B, H)
slabs of the same buffers (the log-space and blocked-cumprod "parallel scans" are far slower in
NumPy). Backward, the recurrence is again a loop of two calls per step, a reverse linear scan of
dL/dh, and the gate and candidate gradients follow for all positions at once.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal, NamedTuple

import numpy as np

from charrnn import StepResult, hookimpl
from charrnn.memory import check as check_memory
from charrnn.optim import pack
from charrnn.options import Range
from charrnn_plugins.recurrent import (
    DENSE_SCATTER_MAX_VOCAB,
    MAX_CACHED_SHAPES,
    Arrays,
    DType,
    OutputBuffers,
    cross_entropy,
    fast_dot,
    layer_name,
    output_backward,
    output_forward,
    positive_int,
    scatter_rows,
)

Width = Annotated[int, Range(ge=1), "width of the residual stream: embedding, blocks, output layer"]
Blocks = Annotated[int, Range(ge=1, le=64), "residual blocks (conv + minGRU, feed-forward) stacked"]
Expansion = Annotated[float, Range(gt=0, le=8), "the minGRU's width as a multiple of hidden_size"]
FfnMult = Annotated[float, Range(gt=0, le=16), "the feed-forward layer's width as a multiple of hidden_size"]
ConvKernel = Annotated[int, Range(ge=1, le=32), "time steps each causal depthwise conv sees (1: no conv)"]
Activation = Annotated[
    Literal["gelu", "silu", "relu"], "the feed-forward nonlinearity (GELU in its tanh form; SiLU: p σ(p))"
]
BlockDropout = Annotated[
    float,
    Range(ge=0, lt=1),
    "inverted dropout on the embedding and on each branch's output, while training only",
]

EPS = 1e-5  # RMSNorm: added to the mean square
# gelu(a) = a/2 (1 + tanh(K0 (a + K1 a^3))); Python floats: a NumPy float64 would make float32 passes float64
GELU_K0, GELU_K1 = math.sqrt(2 / math.pi), 0.044715

__all__ = ["MinGRU"]


def _width(multiple: float, D: int) -> int:
    return max(1, int(round(multiple * D)))


def rms_forward(x: np.ndarray, xhat: np.ndarray, s: np.ndarray, sq: np.ndarray, ones_d: np.ndarray) -> None:
    """xhat = x * s with s = 1 / sqrt(mean(x^2) + eps) per row; x, xhat, sq (N, D), s (N,)."""
    np.multiply(x, x, out=sq)
    np.dot(sq, ones_d, out=s)  # (N,) sums of squares, a BLAS product with ones
    s *= 1 / x.shape[1]
    s += EPS
    np.sqrt(s, out=s)
    np.divide(1, s, out=s)
    np.multiply(x, s[:, None], out=xhat)


def rms_backward(
    dy: np.ndarray,
    gain: np.ndarray,
    xhat: np.ndarray,
    s: np.ndarray,
    dgain: np.ndarray,
    dx: np.ndarray,
    w: np.ndarray,
    r: np.ndarray,
    ones_n: np.ndarray,
) -> None:
    """Back through y = xhat * gain: dgain, and dx += dL/dx; dy (N, D) is overwritten, w scratch.

    dL/dx = s * (dxhat - xhat * mean(dxhat * xhat)) with dxhat = dy * gain, per row.
    """
    np.multiply(dy, xhat, out=w)  # (N, D)
    np.dot(ones_n, w, out=dgain)  # (D,) sum over positions
    np.dot(w, gain, out=r)  # (N,) sum(dxhat * xhat) per row
    r *= 1 / xhat.shape[1]
    dy *= gain  # dxhat
    np.multiply(xhat, r[:, None], out=w)
    dy -= w
    dy *= s[:, None]
    dx += dy


def activation_forward(kind: str, p: np.ndarray, q: np.ndarray, t: np.ndarray | None) -> None:
    """q = act(p), p and q (N, F); `t` keeps what the backward pass needs (GELU's 1 + tanh, SiLU's σ(p)).

    `train_step`, `step` and the stepper all call this, so they compute the same numbers.
    """
    if kind == "relu":
        np.maximum(p, 0, out=q)
        return
    assert t is not None
    if kind == "silu":
        np.multiply(p, 0.5, out=t)
        np.tanh(t, out=t)
        t *= 0.5
        t += 0.5  # σ(p)
        np.multiply(p, t, out=q)
        return
    np.multiply(p, p, out=t)
    t *= GELU_K0 * GELU_K1
    t += GELU_K0
    t *= p  # K0 (p + K1 p^3)
    np.tanh(t, out=t)
    t += 1  # t = 1 + tanh(...), kept for the backward pass
    np.multiply(p, t, out=q)  # q may be p itself (one step's in-place call)
    q *= 0.5  # gelu(p) = p/2 (1 + tanh(...))


def activation_backward(
    kind: str, p: np.ndarray, q: np.ndarray, t: np.ndarray | None, fs: np.ndarray, dq: np.ndarray
) -> None:
    """dq *= act'(p), all (N, F); overwrites q, t and the scratch fs (the forward pass's last use was dWd)."""
    if kind == "relu":
        np.greater(p, 0, out=fs)
        dq *= fs
        return
    assert t is not None
    if kind == "silu":
        np.subtract(1, t, out=fs)
        fs *= p
        fs += 1
        fs *= t  # silu'(p) = σ (1 + p (1 - σ))
        dq *= fs
        return
    np.multiply(p, p, out=fs)
    fs *= 1.5 * GELU_K0 * GELU_K1
    fs += 0.5 * GELU_K0
    fs *= p  # A = K0/2 p (1 + 3 K1 p^2)
    np.subtract(2, t, out=q)  # 1 - tanh
    fs *= q
    fs += 0.5
    fs *= t  # gelu'(p) = (1 + tanh)/2 + A (1 - tanh^2) = (1 + tanh) (1/2 + A (1 - tanh))
    dq *= fs


class _Block:
    """One block's work arrays for a (B, T) shape, row-major (N, F), time-major rows; views prebuilt."""

    def __init__(
        self,
        B: int,
        T: int,
        D: int,
        H: int,
        F: int,
        K: int,
        dtype: np.dtype,
        dropout: bool,
        keeps: bool,
        G: np.ndarray,
    ) -> None:
        N = B * T
        self.xhat_m, self.s_m = np.empty((N, D), dtype), np.empty(N, dtype)  # norm before the conv
        self.upad = np.empty((T + K - 1, B, D), dtype)  # [incoming conv state; u_0 .. u_{T-1}]
        self.u = self.upad[K - 1 :].reshape(N, D)
        self.c = np.empty((N, D), dtype)  # conv output
        self.a = np.empty((N, 2 * H), dtype)  # [a_z, h~]
        self.hh = self.a[:, H:]  # h~, a strided view
        self.z, self.omz, self.zh = (np.empty((N, H), dtype) for _ in range(3))  # z, 1 - z, z * h~
        self.hs = np.empty((T + 1, B, H), dtype)  # hs[0] incoming state, hs[t + 1] = h_t
        self.h, self.h_prev = self.hs[1:].reshape(N, H), self.hs[:-1].reshape(N, H)
        self.xhat_f, self.s_f = np.empty((N, D), dtype), np.empty(N, dtype)  # norm before the FFN
        self.v = np.empty((N, D), dtype)  # xhat_f * gf
        self.p, self.q = np.empty((N, F), dtype), np.empty((N, F), dtype)  # FFN pre-activation, act(p)
        self.t = np.empty((N, F), dtype) if keeps else None  # GELU's 1 + tanh term, SiLU's σ(p)
        self.mask_m = np.empty((N, D), dtype) if dropout else None  # keep / (1 - p)
        self.mask_f = np.empty((N, D), dtype) if dropout else None
        omz3, zh3, G3 = self.omz.reshape(T, B, H), self.zh.reshape(T, B, H), G.reshape(T, B, H)
        self.forward_steps = list(zip(omz3, zh3, self.hs[:-1], self.hs[1:], strict=True))
        self.backward_steps = [(G3[t], G3[t + 1], omz3[t + 1]) for t in range(T - 2, -1, -1)]


class _Buffers:
    """Work arrays for one (B, T) shape: the blocks', and those the blocks share in turn."""

    def __init__(
        self,
        B: int,
        T: int,
        V: int,
        D: int,
        H: int,
        F: int,
        K: int,
        L: int,
        dtype: np.dtype,
        dropout: bool,
        keeps: bool,
    ) -> None:
        N = B * T
        self.T, self.B = T, B
        self.G = np.empty((N, H), dtype)  # dL/dh_t, the reverse scan
        self.blocks = [_Block(B, T, D, H, F, K, dtype, dropout, keeps, self.G) for _ in range(L)]
        self.x = np.empty((N, D), dtype)  # the residual stream
        self.branch = np.empty((N, D), dtype)  # a branch's output; backward: its gradient
        self.sq = np.empty((N, D), dtype)  # scratch
        self.mask_x = np.empty((N, D), dtype) if dropout else None  # embedding dropout
        self.keep = np.empty((N, D), bool) if dropout else None
        self.xhat_y, self.s_y = np.empty((N, D), dtype), np.empty(N, dtype)  # final norm
        self.y = np.empty((N, D), dtype)
        self.dx = np.empty((N, D), dtype)  # dL/d(residual stream)
        self.dv = np.empty((N, D), dtype)  # dL/d(a norm's output)
        self.da = np.empty((N, 2 * H), dtype)  # dL/d[a_z, h~]
        self.dq = np.empty((N, F), dtype)  # dL/dq, then dL/dp
        self.fs = np.empty((N, F), dtype)  # scratch: act'(p)
        self.hsq = np.empty((N, H), dtype)  # scratch
        self.tmp_h = np.empty((B, H), dtype)  # scratch of the backward scan
        self.r = np.empty(N, dtype)
        self.ones_n, self.ones_d = np.ones(N, dtype), np.ones(D, dtype)
        self.out = OutputBuffers(B, T, V, dtype)


class MinGRU:
    """minGRU character model (see the module docstring for the equations and the state).

    Init: embedding rows standard normal, so the residual stream starts at unit scale; `Wzh`,
    `Wu`, `Why` normal with std 1/sqrt(fan-in); the branch outputs `Wo`, `Wd` the same divided
    by sqrt(2L), so the stream's scale grows slowly with depth; gains 1, biases 0 except the
    gate's, whose z = σ(bz) spread from 1/2 to 1/64 over the units (memory from ~2 to ~64 steps
    at the start, as in chrono initialisation); the conv starts as the identity (Wc[K - 1] = 1,
    the other taps 0), so a fresh block is a plain minGRU. `dtype` is "float32" (fast) or
    "float64" (gradient checks). `dropout` needs `train_step`'s `rng`.

    Returned arrays: `train_step` grads are buffers overwritten by the next `train_step`; state
    arrays and `step` logits are fresh, and incoming state is never modified.
    """

    def __init__(
        self,
        vocab_size: int,
        rng: np.random.Generator,
        hidden_size: Width = 256,
        num_layers: Blocks = 2,
        expansion: Expansion = 1.5,
        ffn_mult: FfnMult = 4.0,
        conv_kernel: ConvKernel = 4,
        activation: Activation = "gelu",
        dropout: BlockDropout = 0.0,
        dtype: DType = "float32",
    ) -> None:
        V = positive_int("vocab_size", vocab_size)
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
        D, L, K = int(hidden_size), int(num_layers), int(conv_kernel)
        H, F = _width(expansion, D), _width(ffn_mult, D)
        self.vocab_size, self.hidden_size, self.num_layers = V, D, L
        self.expansion, self.ffn_mult, self.conv_kernel = float(expansion), float(ffn_mult), K
        self.inner_size, self.ffn_size = H, F
        self.activation, self.dropout, self.dtype = activation, float(dropout), np.dtype(dtype)
        check_memory(  # before allocating anything: a huge size is one line, not a MemoryError
            self.memory_bytes(0, 0),
            f"model.hidden_size={D}, num_layers={L}, expansion={expansion}, ffn_mult={ffn_mult}"
            f" (vocabulary of {V})",
            "parameters, gradients, optimizer state",
        )
        self._dense_scatter = V <= DENSE_SCATTER_MAX_VOCAB
        self._buffers: dict[tuple[int, int], _Buffers] = {}

        def normal(std: float, *shape: int) -> np.ndarray:
            return rng.standard_normal(shape) * std

        z_bias = np.log(1 / (np.geomspace(2, 64, H) - 1))  # σ(b) = 1/tau, tau from 2 to 64 steps
        out_std = 1 / np.sqrt(2 * L)
        params: Arrays = {"E": normal(1.0, V, D)}
        for b in range(L):
            conv = np.zeros((K, D))
            conv[K - 1] = 1.0  # the identity: u_t passes, earlier steps add nothing yet
            params.update(
                {
                    layer_name("gm", b): np.ones(D),
                    layer_name("Wc", b): conv,
                    layer_name("Wzh", b): normal(1 / np.sqrt(D), D, 2 * H),
                    layer_name("bzh", b): np.concatenate([z_bias, np.zeros(H)]),
                    layer_name("Wo", b): normal(out_std / np.sqrt(H), H, D),
                    layer_name("bo", b): np.zeros(D),
                    layer_name("gf", b): np.ones(D),
                    layer_name("Wu", b): normal(1 / np.sqrt(D), D, F),
                    layer_name("bu", b): np.zeros(F),
                    layer_name("Wd", b): normal(out_std / np.sqrt(F), F, D),
                    layer_name("bd", b): np.zeros(D),
                }
            )
        params.update(gy=np.ones(D), Why=normal(1 / np.sqrt(D), D, V), by=np.zeros(V))
        self.params: Arrays = pack(params, self.dtype)  # one flat buffer: the optimizers' fast path
        self._grads = pack({k: np.zeros_like(p) for k, p in self.params.items()})

    def memory_bytes(self, batch_size: int, seq_length: int) -> int:
        """About the memory training needs at (batch_size, seq_length): parameters, gradients,
        optimizer state (up to Adam's two moments and two scratch arrays), work arrays.

        Needs only the sizes, so `__init__` checks it (with no work arrays) before allocating.
        """
        V, D, L, K = self.vocab_size, self.hidden_size, self.num_layers, self.conv_kernel
        H, F, size = self.inner_size, self.ffn_size, self.dtype.itemsize
        P = V * D + L * (K * D + 2 * D * H + 2 * H + H * D + 4 * D + 2 * D * F + F) + D * V + D + V
        build = P * (8 + 2 * size)  # float64 init arrays while packing
        keeps, drop = self.activation != "relu", self.dropout > 0
        block = 6 * D + 6 * H + (3 if keeps else 2) * F + 2 + (2 * D if drop else 0)
        shared = 9 * D + 4 * H + 2 * F + 2 + (D + D // size + 1 if drop else 0)
        logits = (2 if V <= DENSE_SCATTER_MAX_VOCAB else 1) * V + 4
        N = batch_size * seq_length
        work = N * (L * block + shared + logits) * size + 16 * N + L * (K - 1) * batch_size * D * size
        per_step = L * 1024  # prebuilt per-step views: Python objects, not arrays
        return max(P * size * 6 + work, build) + seq_length * per_step

    # -- protocol -------------------------------------------------------------------------

    def _state_shapes(self, B: int) -> dict[str, tuple[int, ...]]:
        shapes = {}
        for b in range(self.num_layers):
            shapes[layer_name("h", b)] = (B, self.inner_size)
            if self.conv_kernel > 1:
                shapes[layer_name("conv", b)] = (B, self.conv_kernel - 1, self.hidden_size)
        return shapes

    def init_state(self, batch_size: int) -> Arrays:
        """Zero state: per block `h{l}` (B, H) and, with conv_kernel K > 1, `conv{l}` (B, K - 1, D)."""
        B = positive_int("batch_size", batch_size)
        return {name: np.zeros(shape, self.dtype) for name, shape in self._state_shapes(B).items()}

    def train_step(
        self,
        inputs: np.ndarray,
        targets: np.ndarray,
        state: Arrays,
        rng: np.random.Generator | None = None,
    ) -> StepResult:
        """Forward, mean cross-entropy and truncated BPTT over one (B, T) chunk of integer ids.

        The incoming state is a constant (no gradient flows into it, neither into `h{l}` nor into
        the conv window). `rng` draws the dropout masks (required when `dropout` > 0).
        """
        if self.dropout and rng is None:
            raise ValueError("dropout > 0 needs train_step(..., rng=numpy.random.Generator)")
        b = self._forward(inputs, targets, state, rng if self.dropout else None)
        loss = cross_entropy(b.out, backward=True)  # b.out.logits is now dL/dlogits
        p, g = self.params, self._grads
        D, H, K = self.hidden_size, self.inner_size, self.conv_kernel
        T, B = b.T, b.B
        dx, dv, sq, r, ones_n = b.dx, b.dv, b.sq, b.r, b.ones_n
        output_backward(b.out, b.y.T, p["Why"], g["Why"], g["by"], dv.T)  # dv = dL/dy (N, D)
        dx.fill(0)
        rms_backward(dv, p["gy"], b.xhat_y, b.s_y, g["gy"], dx, sq, r, ones_n)
        for layer in range(self.num_layers - 1, -1, -1):
            blk = b.blocks[layer]

            def name(base: str, layer: int = layer) -> str:
                return layer_name(base, layer)

            # feed-forward branch: x_out = x_mid + dropout(q @ Wd + bd)
            df = dx if blk.mask_f is None else np.multiply(dx, blk.mask_f, out=b.branch)
            np.dot(blk.q.T, df, out=g[name("Wd")])  # (F, D)
            np.dot(ones_n, df, out=g[name("bd")])
            np.dot(df, p[name("Wd")].T, out=b.dq)  # (N, F)
            activation_backward(self.activation, blk.p, blk.q, blk.t, b.fs, b.dq)  # b.dq = dL/dp
            np.dot(blk.v.T, b.dq, out=g[name("Wu")])  # (D, F)
            np.dot(ones_n, b.dq, out=g[name("bu")])
            np.dot(b.dq, p[name("Wu")].T, out=dv)  # (N, D)
            rms_backward(dv, p[name("gf")], blk.xhat_f, blk.s_f, g[name("gf")], dx, sq, r, ones_n)
            # recurrent branch: x_mid = x_in + dropout(h @ Wo + bo)
            dm = dx if blk.mask_m is None else np.multiply(dx, blk.mask_m, out=b.branch)
            np.dot(blk.h.T, dm, out=g[name("Wo")])  # (H, D)
            np.dot(ones_n, dm, out=g[name("bo")])
            G = b.G
            np.dot(dm, p[name("Wo")].T, out=G)  # (N, H) dL/dh_t from above
            tmp = b.tmp_h
            for G_t, G_next, omz_next in blk.backward_steps:  # t = T-2 .. 0; nothing from beyond the chunk
                np.multiply(G_next, omz_next, out=tmp)
                np.add(G_t, tmp, out=G_t)  # dL/dh_t += dL/dh_{t+1} * (1 - z_{t+1})
            da_z, da_h = b.da[:, :H], b.da[:, H:]
            np.multiply(G, blk.z, out=da_h)  # dL/dh~ = dh * z
            np.subtract(blk.hh, blk.h_prev, out=b.hsq)
            b.hsq *= G  # dL/dz = dh * (h~ - h_{t-1})
            b.hsq *= blk.z
            np.multiply(b.hsq, blk.omz, out=da_z)  # times σ' = z (1 - z)
            np.dot(blk.c.T, b.da, out=g[name("Wzh")])  # (D, 2H)
            np.dot(ones_n, b.da, out=g[name("bzh")])
            dc = b.branch  # the branch's gradient is spent
            np.dot(b.da, p[name("Wzh")].T, out=dc)  # (N, D)
            # the causal conv: c[t] = sum_j Wc[j] * upad[t + j]
            Wc, dWc = p[name("Wc")], g[name("Wc")]
            dc3, du3, sq3 = dc.reshape(T, B, D), dv.reshape(T, B, D), sq.reshape(T, B, D)
            for j in range(K):
                np.multiply(dc3, blk.upad[j : j + T], out=sq3)
                np.dot(ones_n, sq, out=dWc[j])
            np.multiply(dc, Wc[K - 1], out=dv)  # dL/du, the current tap
            for j in range(K - 1):
                o = K - 1 - j  # tap j sees u_{t - o}; what reaches the incoming window is dropped
                if o < T:
                    np.multiply(dc3[o:], Wc[j], out=sq3[: T - o])
                    du3[: T - o] += sq3[: T - o]
            rms_backward(dv, p[name("gm")], blk.xhat_m, blk.s_m, g[name("gm")], dx, sq, r, ones_n)
        if b.mask_x is not None:
            dx *= b.mask_x
        scatter_rows(self._dense_scatter, inputs, b.out, dx, g["E"])  # (V, D)
        return StepResult(loss, dict(g), self._state_out(b))

    def loss(self, inputs: np.ndarray, targets: np.ndarray, state: Arrays) -> tuple[float, Arrays]:
        """Forward only, without dropout: mean cross-entropy (nats/char) and the state after the chunk."""
        b = self._forward(inputs, targets, state, None)
        return cross_entropy(b.out, backward=False), self._state_out(b)

    def forward(self, inputs: np.ndarray, state: Arrays) -> tuple[np.ndarray, Arrays]:
        """Logits at every position, (B, T, V), and the state after the chunk; no dropout.

        What `loss` scores and what `step` computes one position at a time, as one array.
        """
        b = self._forward(inputs, np.zeros_like(inputs), state, None)
        B, T = inputs.shape
        return b.out.logits.T.reshape(T, B, -1).transpose(1, 0, 2).copy(), self._state_out(b)

    def step(self, ids: np.ndarray, state: Arrays) -> tuple[np.ndarray, Arrays]:
        """One time step for k streams: ids (k,) -> logits (k, V) and the new state (fresh arrays)."""
        if "h" not in state:
            raise ValueError(f"state lacks 'h' (it has {sorted(state)})")
        k = state["h"].shape[0]
        if np.ndim(ids) != 1 or len(ids) != k:
            raise ValueError(f"ids must have shape ({k},) to match state['h'], got {np.shape(ids)}")
        self._check_state(state, k)
        p, K, H, new = self.params, self.conv_kernel, self.inner_size, {}
        x = p["E"].take(ids, axis=0)  # (k, D) row gather
        for layer in range(self.num_layers):

            def w(base: str, layer: int = layer) -> np.ndarray:
                return p[layer_name(base, layer)]

            u = _rms_rows(x) * w("gm")  # (k, D)
            if K > 1:
                window = np.concatenate([state[layer_name("conv", layer)], u[:, None]], axis=1)  # (k, K, D)
                new[layer_name("conv", layer)] = window[:, 1:].copy()
            else:
                window = u[:, None]
            Wc = w("Wc")
            c = window[:, 0] * Wc[0]
            for j in range(1, K):
                c += window[:, j] * Wc[j]  # c_t = sum_j Wc[j] * u_{t - K + 1 + j}
            a = np.dot(c, w("Wzh"))  # (k, 2H)
            a += w("bzh")
            z = np.tanh(a[:, :H] * 0.5)
            z *= 0.5
            z += 0.5  # σ, as in the forward pass
            h = (1 - z) * state[layer_name("h", layer)]
            h += z * a[:, H:]
            new[layer_name("h", layer)] = h
            m = np.dot(h, w("Wo"))  # (k, D)
            m += w("bo")
            x = x + m
            f = np.dot(_rms_rows(x) * w("gf"), w("Wu"))  # (k, F)
            f += w("bu")
            activation_forward(self.activation, f, f, np.empty_like(f))  # in place
            f = np.dot(f, w("Wd"))  # (k, D)
            f += w("bd")
            x += f
        logits = np.dot(_rms_rows(x) * p["gy"], p["Why"])  # (k, V)
        logits += p["by"]
        return logits, new

    def stepper(self, state: Arrays) -> _Stepper:
        """A stepper for generation (see `charrnn.types.Model.step`): `step` without per-call arrays."""
        return _Stepper(self, state)

    def matmul_shapes(self, batch_size: int, seq_length: int) -> dict[str, list[tuple[int, int, int, int]]]:
        """The matrix products this model performs, as (m, k, n, count): `count` (m, k) @ (k, n).

        `train`: one `train_step` on a (batch_size, seq_length) chunk; `generate`: one generation
        step of `batch_size` streams. FLOPs per character, 2 * m * k * n per product:

            train:    L * (18 * D * H + 12 * D * F) + 6 * D * V
            generate: L * (6 * D * H + 4 * D * F) + 2 * D * V

        Left out: the embedding (a row gather) and its gradient (a scatter-add, a one-hot product
        for small V), and sums done as products with a vector (norms, biases, conv taps); these
        count against the model's share of the bound, as do the conv, the recurrence and all
        other elementwise work.
        """
        B = positive_int("batch_size", batch_size)
        T = positive_int("seq_length", seq_length)
        V, D, H, F, L, N = (
            self.vocab_size,
            self.hidden_size,
            self.inner_size,
            self.ffn_size,
            self.num_layers,
            B * T,
        )
        train = [
            (N, D, 2 * H, L),  # c @ Wzh
            (N, H, D, L),  # h @ Wo
            (N, D, F, 2 * L),  # v @ Wu; back: df @ Wd.T
            (N, F, D, 2 * L),  # q @ Wd; back: dp @ Wu.T
            (F, N, D, L),  # dWd
            (D, N, F, L),  # dWu
            (H, N, D, L),  # dWo
            (N, D, H, L),  # dL/dh = dm @ Wo.T
            (D, N, 2 * H, L),  # dWzh
            (N, 2 * H, D, L),  # dL/dc
            (V, D, N, 1),  # output layer: logits, dWhy, dL/dy
            (D, N, V, 1),
            (N, V, D, 1),
        ]
        generate = [(B, D, 2 * H, L), (B, H, D, L), (B, D, F, L), (B, F, D, L), (B, D, V, 1)]
        return {"train": train, "generate": generate}

    # -- the forward pass -----------------------------------------------------------------

    def _check_state(self, state: Arrays, B: int) -> None:
        for name, shape in self._state_shapes(B).items():
            if name not in state:
                raise ValueError(f"state lacks {name!r} (it has {sorted(state)})")
            if state[name].shape != shape:
                raise ValueError(f"state[{name!r}] must have shape {shape}, got {state[name].shape}")

    def _check(self, inputs: np.ndarray, targets: np.ndarray, state: Arrays) -> None:
        if inputs.ndim != 2 or inputs.shape != targets.shape or inputs.size == 0:
            raise ValueError(
                f"inputs and targets must both have shape (B, T) with B, T > 0, "
                f"got {inputs.shape} and {targets.shape}"
            )
        self._check_state(state, inputs.shape[0])
        V = self.vocab_size
        for ids in (inputs, targets):
            if ids.max() >= V or (ids.dtype.kind != "u" and ids.min() < 0):
                raise ValueError(f"ids must lie in [0, {V}), got {ids.min()}..{ids.max()}")

    def _buffers_for(self, B: int, T: int) -> _Buffers:
        b = self._buffers.get((B, T))
        if b is None:
            if len(self._buffers) >= MAX_CACHED_SHAPES:
                del self._buffers[next(iter(self._buffers))]  # drop the oldest shape
            b = self._buffers[B, T] = _Buffers(
                B,
                T,
                self.vocab_size,
                self.hidden_size,
                self.inner_size,
                self.ffn_size,
                self.conv_kernel,
                self.num_layers,
                self.dtype,
                self.dropout > 0,
                self.activation != "relu",
            )
        return b

    def _dropout(
        self, rng: np.random.Generator | None, b: _Buffers, mask: np.ndarray | None, a: np.ndarray
    ) -> None:
        """a *= a fresh inverted-dropout mask (kept in `mask` for the backward pass), in training."""
        if rng is None or mask is None:
            return
        rng.random(dtype=self.dtype, out=mask)  # uniform on [0, 1)
        np.greater_equal(mask, self.dropout, out=b.keep)
        np.multiply(b.keep, self.dtype.type(1 / (1 - self.dropout)), out=mask)
        a *= mask

    def _forward(
        self, inputs: np.ndarray, targets: np.ndarray, state: Arrays, rng: np.random.Generator | None
    ) -> _Buffers:
        """Fill the buffers for this (B, T): every block's activations, the logits and target indices."""
        self._check(inputs, targets, state)
        B, T = inputs.shape
        b = self._buffers_for(B, T)
        p, D, H, K = self.params, self.hidden_size, self.inner_size, self.conv_kernel
        x, sq, branch, ones_d = b.x, b.sq, b.branch, b.ones_d
        np.take(p["E"], inputs.T, axis=0, out=x.reshape(T, B, D), mode="clip")  # (T, B, D); ids checked
        self._dropout(rng, b, b.mask_x, x)
        for layer, blk in enumerate(b.blocks):

            def w(base: str, layer: int = layer) -> np.ndarray:
                return p[layer_name(base, layer)]

            # recurrent branch
            rms_forward(x, blk.xhat_m, blk.s_m, sq, ones_d)
            np.multiply(blk.xhat_m, w("gm"), out=blk.u)
            if K > 1:
                np.copyto(blk.upad[: K - 1], state[layer_name("conv", layer)].transpose(1, 0, 2))
            Wc, c3, sq3 = w("Wc"), blk.c.reshape(T, B, D), sq.reshape(T, B, D)
            np.multiply(blk.upad[:T], Wc[0], out=c3)  # the taps in order j = 0 .. K-1, as `step` sums them
            for j in range(1, K):
                np.multiply(blk.upad[j : j + T], Wc[j], out=sq3)
                c3 += sq3
            np.dot(blk.c, w("Wzh"), out=blk.a)  # (N, 2H) all steps at once
            blk.a += w("bzh")
            z = blk.z
            np.multiply(blk.a[:, :H], 0.5, out=z)
            np.tanh(z, out=z)
            z *= 0.5
            z += 0.5  # z = σ(a_z) = (1 + tanh(a_z / 2)) / 2
            np.subtract(1, z, out=blk.omz)
            np.multiply(z, blk.hh, out=blk.zh)
            np.copyto(blk.hs[0], state[layer_name("h", layer)])
            multiply, add = np.multiply, np.add  # locals: the loop is all small calls
            for omz_t, zh_t, h_prev, h_t in blk.forward_steps:
                multiply(omz_t, h_prev, out=h_t)
                add(h_t, zh_t, out=h_t)  # h_t = (1 - z_t) h_{t-1} + z_t h~_t
            np.dot(blk.h, w("Wo"), out=branch)  # (N, D)
            branch += w("bo")
            self._dropout(rng, b, blk.mask_m, branch)
            x += branch
            # feed-forward branch
            rms_forward(x, blk.xhat_f, blk.s_f, sq, ones_d)
            np.multiply(blk.xhat_f, w("gf"), out=blk.v)
            np.dot(blk.v, w("Wu"), out=blk.p)  # (N, F)
            blk.p += w("bu")
            activation_forward(self.activation, blk.p, blk.q, blk.t)
            np.dot(blk.q, w("Wd"), out=branch)  # (N, D)
            branch += w("bd")
            self._dropout(rng, b, blk.mask_f, branch)
            x += branch
        rms_forward(x, b.xhat_y, b.s_y, sq, ones_d)
        np.multiply(b.xhat_y, p["gy"], out=b.y)
        output_forward(b.out, b.y.T, p["Why"], p["by"], targets)
        return b

    def _state_out(self, b: _Buffers) -> Arrays:
        """Copies of every block's state after the last time step."""
        out, K = {}, self.conv_kernel
        for layer, blk in enumerate(b.blocks):
            out[layer_name("h", layer)] = blk.hs[-1].copy()  # (B, H)
            if K > 1:
                out[layer_name("conv", layer)] = np.ascontiguousarray(blk.upad[-(K - 1) :].transpose(1, 0, 2))
        return out


class _StepBlock(NamedTuple):
    """One block as the stepper uses it: parameter views, its state, its conv window."""

    gm: np.ndarray
    Wc: np.ndarray  # (K, 1, D), to broadcast over the window
    Wzh: np.ndarray
    bzh: np.ndarray
    Wo: np.ndarray
    bo: np.ndarray
    gf: np.ndarray
    Wu: np.ndarray
    bu: np.ndarray
    Wd: np.ndarray
    bd: np.ndarray
    h: np.ndarray  # (k, H)
    window: np.ndarray  # (K, k, D): the last K - 1 conv inputs, oldest first, then room for u_t


class _Stepper:
    """`MinGRU.step` for a generation loop: the same arithmetic into preallocated buffers.

    Generation builds no dict and no array per character: each block's conv window is a
    (K, k, D) array whose last row receives u_t and which shifts by one row after the step. The
    logits agree with `step` to rounding.
    """

    def __init__(self, model: MinGRU, state: Arrays) -> None:
        if "h" not in state:
            raise ValueError(f"state lacks 'h' (it has {sorted(state)})")
        k = state["h"].shape[0]
        model._check_state(state, k)
        p, dtype = model.params, model.dtype
        D, H, F, K, V = (
            model.hidden_size,
            model.inner_size,
            model.ffn_size,
            model.conv_kernel,
            model.vocab_size,
        )
        self.k, self.K, self.H, self.activation = k, K, H, model.activation
        self.E, self.gy, self.Why, self.by = p["E"], p["gy"], p["Why"], p["by"]
        self.blocks = []
        for layer in range(model.num_layers):
            window = np.zeros((K, k, D), dtype)
            if K > 1:
                window[: K - 1] = state[layer_name("conv", layer)].transpose(1, 0, 2)
            views = [
                p[layer_name(n, layer)]
                for n in ("gm", "Wc", "Wzh", "bzh", "Wo", "bo", "gf", "Wu", "bu", "Wd", "bd")
            ]
            views[1] = views[1][:, None, :]
            h = np.array(state[layer_name("h", layer)], dtype, order="C")
            self.blocks.append(_StepBlock(*views, h, window))
        self.x, self.xn, self.c, self.m = (np.empty((k, D), dtype) for _ in range(4))
        self.cw = np.empty((K, k, D), dtype)  # the window times the taps
        self.s = np.empty(k, dtype)
        self.s_col = self.s[:, None]
        self.a = np.empty((k, 2 * H), dtype)
        self.z, self.tmp = np.empty((k, H), dtype), np.empty((k, H), dtype)
        self.f, self.t = np.empty((k, F), dtype), np.empty((k, F), dtype)
        self.logits = np.empty((k, V), dtype)
        self.dot = fast_dot

    def _norm(self, x: np.ndarray, gain: np.ndarray, out: np.ndarray) -> None:
        """out = x / sqrt(mean(x^2) + eps) * gain per row, as `_rms_rows` computes it."""
        s = self.s
        np.multiply(x, x, out=out)
        np.add.reduce(out, axis=1, out=s)
        s *= 1 / x.shape[1]
        s += EPS
        np.sqrt(s, out=s)
        np.divide(1, s, out=s)
        np.multiply(x, self.s_col, out=out)
        out *= gain

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        """ids (k,) -> logits (k, V), in a buffer that the next call overwrites."""
        x, xn, c, m, cw, a, z, tmp, f, t = (
            self.x,
            self.xn,
            self.c,
            self.m,
            self.cw,
            self.a,
            self.z,
            self.tmp,
            self.f,
            self.t,
        )
        dot, H, K = self.dot, self.H, self.K
        np.take(self.E, ids, axis=0, out=x)  # (k, D)
        for b in self.blocks:
            self._norm(x, b.gm, b.window[K - 1])  # u_t
            np.multiply(b.window, b.Wc, out=cw)
            np.add.reduce(cw, axis=0, out=c)  # sum over the taps, j = 0 .. K-1
            if K > 1:
                np.copyto(b.window[:-1], b.window[1:])  # shift: u_t becomes the newest kept input
            dot(c, b.Wzh, out=a)  # (k, 2H)
            a += b.bzh
            np.multiply(a[:, :H], 0.5, out=z)
            np.tanh(z, out=z)
            z *= 0.5
            z += 0.5  # σ
            np.subtract(1, z, out=tmp)
            tmp *= b.h
            np.multiply(z, a[:, H:], out=b.h)
            np.add(b.h, tmp, out=b.h)  # h_t = (1 - z) h_{t-1} + z h~
            dot(b.h, b.Wo, out=m)  # (k, D)
            m += b.bo
            x += m
            self._norm(x, b.gf, xn)
            dot(xn, b.Wu, out=f)  # (k, F)
            f += b.bu
            activation_forward(self.activation, f, f, t)  # in place
            dot(f, b.Wd, out=m)  # (k, D)
            m += b.bd
            x += m
        self._norm(x, self.gy, xn)
        dot(xn, self.Why, out=self.logits)  # (k, V)
        self.logits += self.by
        return self.logits

    def state(self) -> Arrays:
        out: Arrays = {}
        for layer, b in enumerate(self.blocks):
            out[layer_name("h", layer)] = b.h.copy()
            if self.K > 1:
                out[layer_name("conv", layer)] = np.ascontiguousarray(
                    b.window[: self.K - 1].transpose(1, 0, 2)
                )
        return out


def _rms_rows(x: np.ndarray) -> np.ndarray:
    """x / sqrt(mean(x^2) + eps) per row of a (k, D) array (no BLAS product: a step's own work)."""
    s = np.einsum("kd,kd->k", x, x)
    s *= 1 / x.shape[1]
    s += EPS
    np.sqrt(s, out=s)
    np.divide(1, s, out=s)
    return x * s[:, None]


@hookimpl
def charrnn_model(register):
    register("mingru", MinGRU)
