"""The `adagrad` optimizer, as in min-char-rnn and char-rnn."""

from __future__ import annotations

import numpy as np

from charrnn import hookimpl


class Adagrad:
    """Adagrad with elementwise gradient clipping.

    g <- clip(g, -clip, clip); mem += g * g; p -= lr * g / sqrt(mem + eps).
    `clip: null` turns clipping off.
    """

    def __init__(self, lr: float = 0.1, eps: float = 1e-8, clip: float | None = 5.0) -> None:
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if clip is not None and not clip > 0:
            raise ValueError(f"clip must be > 0 or null, got {clip}")
        self.lr, self.eps, self.clip = lr, eps, clip
        self.mem: dict[str, np.ndarray] = {}
        self._buf: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # per-key scratch, no allocation per step

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> None:
        for key, p in params.items():
            if key not in self.mem:
                self.mem[key] = np.zeros_like(p)
            if key not in self._buf:
                self._buf[key] = (np.empty_like(p), np.empty_like(p))
            mem, (clipped, tmp) = self.mem[key], self._buf[key]
            g = grads[key]
            if self.clip is not None:
                g = np.clip(g, -self.clip, self.clip, out=clipped)
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
        self.mem = {k.removeprefix("mem."): np.array(v) for k, v in state.items()}


@hookimpl
def charrnn_optimizer(register):
    register("adagrad", Adagrad)
