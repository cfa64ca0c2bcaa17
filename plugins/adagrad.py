"""The `adagrad` optimizer, as in min-char-rnn and char-rnn."""

from __future__ import annotations

import numpy as np

from charrnn import hookimpl
from charrnn.optim import BaseOptimizer, Clip, ClipNorm, Eps, LearningRate


class Adagrad(BaseOptimizer):
    """Adagrad: mem += g * g; p -= lr * g / sqrt(mem + eps).

    `clip` (elementwise) and `clip_norm` (global norm; null turns either off) are applied to g
    by the training loop before `step`, as for every optimizer.
    """

    state_names = ("mem",)

    def __init__(
        self, lr: LearningRate = 0.1, eps: Eps = 1e-8, clip: Clip = 5.0, clip_norm: ClipNorm = None
    ) -> None:
        super().__init__(lr, clip, clip_norm)
        self.eps = eps

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> None:
        for s in self.slots(params, grads):
            g, mem, tmp = s.grad, s.state["mem"], self.buffer(f"tmp.{s.key}", s.param)
            np.multiply(g, g, out=tmp)
            mem += tmp
            np.add(mem, self.eps, out=tmp)
            np.sqrt(tmp, out=tmp)
            np.divide(g, tmp, out=tmp)
            tmp *= self.lr
            s.param -= tmp


@hookimpl
def charrnn_optimizer(register):
    register("adagrad", Adagrad)
