"""The `adagrad` optimizer, as in min-char-rnn and char-rnn."""

from __future__ import annotations

import numpy as np

from charrnn import hookimpl
from charrnn.optim import BaseOptimizer, check_option, load_arrays


class Adagrad(BaseOptimizer):
    """Adagrad with gradient clipping (elementwise `clip`, global-norm `clip_norm`; null turns either off).

    g <- clipped g; mem += g * g; p -= lr * g / sqrt(mem + eps).
    """

    def __init__(
        self, lr: float = 0.1, eps: float = 1e-8, clip: float | None = 5.0, clip_norm: float | None = None
    ) -> None:
        super().__init__(lr, clip, clip_norm)
        check_option("eps", eps, lambda v: v > 0, "> 0")
        self.eps = eps
        self.mem: dict[str, np.ndarray] = {}

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> None:
        grads = self.clipped(grads)
        for key, p in params.items():
            if key not in self.mem:
                self.mem[key] = np.zeros_like(p)
            g, mem, tmp = grads[key], self.mem[key], self.buffer(f"tmp.{key}", p)
            np.multiply(g, g, out=tmp)
            mem += tmp
            np.add(mem, self.eps, out=tmp)
            np.sqrt(tmp, out=tmp)
            np.divide(g, tmp, out=tmp)
            tmp *= self.lr
            p -= tmp

    def state_dict(self) -> dict[str, np.ndarray]:
        return {f"mem.{k}": v for k, v in self.mem.items()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.mem = load_arrays(state, ("mem",))["mem"]


@hookimpl
def charrnn_optimizer(register):
    register("adagrad", Adagrad)
