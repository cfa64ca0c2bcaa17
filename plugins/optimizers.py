"""The `sgd`, `rmsprop`, `adam` and `adamw` optimizers (options and state from `charrnn.optim`).

Every optimizer takes `clip` (each gradient entry to [-clip, clip]) and `clip_norm` (then all
gradients rescaled jointly so that their global L2 norm is at most `clip_norm`); `null` turns
either off. They are settings the training loop reads: it clips the gradients before `step`
(`charrnn.transforms.clipping`), so `step` itself never clips.
"""

from __future__ import annotations

import math
from typing import Annotated

import numpy as np

from charrnn import hookimpl
from charrnn.optim import BaseOptimizer, Clip, ClipNorm, Decay, Eps, LearningRate, Params
from charrnn.options import Range


class SGD(BaseOptimizer):
    """Stochastic gradient descent with optional (Nesterov) momentum and L2 weight decay.

    g += weight_decay * p; buf = momentum * buf + g; p -= lr * buf, or with `nesterov`
    p -= lr * (g + momentum * buf) (as torch.optim.SGD).
    """

    def __init__(
        self,
        lr: LearningRate = 0.5,
        momentum: Annotated[Decay, "momentum of the update; 0: plain SGD"] = 0.0,
        nesterov: Annotated[bool, "Nesterov momentum (needs momentum > 0)"] = False,
        weight_decay: Annotated[float, Range(ge=0), "L2 penalty added to the gradients"] = 0.0,
        clip: Clip = None,
        clip_norm: ClipNorm = 5.0,
    ) -> None:
        super().__init__(lr, clip, clip_norm)
        if nesterov and momentum == 0:
            raise ValueError("nesterov needs momentum > 0, got momentum 0")
        self.momentum, self.nesterov, self.weight_decay = momentum, nesterov, weight_decay

    @property
    def state_names(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("buf",) if self.momentum else ()  # plain SGD keeps no state

    def step(self, params: Params, grads: Params) -> None:
        for s in self.slots(params, grads):
            p, g, upd = s.param, s.grad, self.buffer(f"upd.{s.key}", s.param)
            if self.weight_decay:
                g = np.multiply(p, self.weight_decay, out=self.buffer(f"wd.{s.key}", p))
                g += s.grad  # g + weight_decay * p
            d = g
            if self.momentum:
                buf = s.state["buf"]
                buf *= self.momentum
                buf += g
                d = buf
                if self.nesterov:
                    d = np.multiply(buf, self.momentum, out=upd)
                    d += g
            np.multiply(d, self.lr, out=upd)
            p -= upd


class RMSprop(BaseOptimizer):
    """RMSprop as in char-rnn (torch `optim.rmsprop`), whose defaults these are.

    cache = decay * cache + (1 - decay) * g^2; p -= lr * g / (sqrt(cache) + eps).
    """

    state_names = ("cache",)

    def __init__(
        self,
        lr: LearningRate = 2e-3,
        decay: Annotated[Decay, "how much of the squared-gradient average each step keeps"] = 0.95,
        eps: Eps = 1e-8,
        clip: Clip = 5.0,
        clip_norm: ClipNorm = None,
    ) -> None:
        super().__init__(lr, clip, clip_norm)
        self.decay, self.eps = decay, eps

    def step(self, params: Params, grads: Params) -> None:
        for s in self.slots(params, grads):
            g, cache, tmp = s.grad, s.state["cache"], self.buffer(f"tmp.{s.key}", s.param)
            np.multiply(g, g, out=tmp)
            tmp *= 1 - self.decay
            cache *= self.decay
            cache += tmp
            np.sqrt(cache, out=tmp)
            tmp += self.eps
            np.divide(g, tmp, out=tmp)
            tmp *= self.lr
            s.param -= tmp


class Adam(BaseOptimizer):
    """Adam with bias correction; the step count `t` is part of the state, so resume is exact.

    m = beta1 * m + (1 - beta1) * g; v = beta2 * v + (1 - beta2) * g^2; t += 1;
    p -= lr * m_hat / (sqrt(v_hat) + eps), with m_hat = m / (1 - beta1^t), v_hat = v / (1 - beta2^t).
    """

    state_names = ("m", "v")

    def __init__(
        self,
        lr: LearningRate = 2e-3,
        beta1: Annotated[Decay, "decay of the gradients' running average"] = 0.9,
        beta2: Annotated[Decay, "decay of the squared gradients' running average"] = 0.999,
        eps: Eps = 1e-8,
        clip: Clip = None,
        clip_norm: ClipNorm = 5.0,
    ) -> None:
        super().__init__(lr, clip, clip_norm)
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        self.weight_decay = 0.0  # AdamW's decoupled decay; plain Adam has none
        self.t = 0

    def step(self, params: Params, grads: Params) -> None:
        self.t += 1
        b1, b2 = self.beta1, self.beta2
        step_size = self.lr / (1 - b1**self.t)  # bias corrections folded into scalars, as in torch
        v_correction = math.sqrt(1 - b2**self.t)
        if self.weight_decay:
            shrink = 1 - self.lr * self.weight_decay
            for p in params.values():
                if p.ndim >= 2:
                    p *= shrink  # decoupled weight decay (AdamW), matrices only
        for s in self.slots(params, grads):
            g, m, v, tmp = s.grad, s.state["m"], s.state["v"], self.buffer(f"tmp.{s.key}", s.param)
            np.multiply(g, 1 - b1, out=tmp)
            m *= b1
            m += tmp
            np.multiply(g, g, out=tmp)
            tmp *= 1 - b2
            v *= b2
            v += tmp
            np.sqrt(v, out=tmp)
            tmp /= v_correction  # sqrt(v_hat)
            tmp += self.eps
            np.divide(m, tmp, out=tmp)
            tmp *= step_size
            s.param -= tmp

    def state_dict(self) -> dict[str, np.ndarray]:
        return super().state_dict() | {"t": np.array(self.t, dtype=np.int64)}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        state = dict(state)
        self.t = int(state.pop("t", 0))
        super().load_state_dict(state)


class AdamW(Adam):
    """Adam with decoupled weight decay (torch.optim.AdamW): p *= 1 - lr * weight_decay, then Adam.

    Only matrices (ndim >= 2: `Wxh`, `Whh`, `Why`) are decayed, never biases, as in nanoGPT.
    """

    def __init__(
        self,
        lr: LearningRate = 2e-3,
        beta1: Annotated[Decay, "decay of the gradients' running average"] = 0.9,
        beta2: Annotated[Decay, "decay of the squared gradients' running average"] = 0.999,
        eps: Eps = 1e-8,
        weight_decay: Annotated[float, Range(ge=0), "decoupled decay of the matrices (not biases)"] = 0.01,
        clip: Clip = None,
        clip_norm: ClipNorm = 5.0,
    ) -> None:
        super().__init__(lr, beta1, beta2, eps, clip, clip_norm)
        self.weight_decay = weight_decay


@hookimpl
def charrnn_optimizer(register):
    register("sgd", SGD)
    register("rmsprop", RMSprop)
    register("adam", Adam)
    register("adamw", AdamW)
