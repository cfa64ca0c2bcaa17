"""Shared plumbing for optimizer plugins: option checks, gradient clipping, state loading.

Part of the public API so that third-party optimizers clip and checkpoint the way the
builtin ones do.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

Params = dict[str, np.ndarray]


def check_option(
    name: str, value: object, ok: Callable[[float], bool], must: str, optional: bool = False
) -> None:
    """Raise ValueError("lr must be > 0, got -1") unless `value` is a finite number passing `ok`.

    With `optional`, None is accepted too and the message says "or null".
    """
    if optional and value is None:
        return
    must = f"{must} or null" if optional else must
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a number {must}, got {value!r}")
    if not ok(value):
        raise ValueError(f"{name} must be {must}, got {value!r}")


class BaseOptimizer:
    """Learning rate, gradient clipping and per-key scratch buffers for the optimizers here.

    Subclasses call `self.clipped(grads)` once per step and never write to its arrays, which
    may be the caller's; `self.buffer(name, like)` gives a scratch array allocated once.
    """

    def __init__(self, lr: float, clip: float | None, clip_norm: float | None) -> None:
        check_option("lr", lr, lambda v: v > 0, "> 0")
        check_option("clip", clip, lambda v: v > 0, "> 0", optional=True)
        check_option("clip_norm", clip_norm, lambda v: v > 0, "> 0", optional=True)
        self.lr, self.clip, self.clip_norm = float(lr), clip, clip_norm
        self._buffers: dict[str, np.ndarray] = {}
        self._grads: Params = {}  # what `clipped` returns, reused across steps

    def buffer(self, name: str, like: np.ndarray) -> np.ndarray:
        """A scratch array called `name` (e.g. `"tmp.Wxh"`) with the shape and dtype of `like`."""
        buf = self._buffers.get(name)
        if buf is None or buf.shape != like.shape or buf.dtype != like.dtype:
            buf = self._buffers[name] = np.empty_like(like)
        return buf

    def clipped(self, grads: Params) -> Params:
        """`grads` clipped elementwise to [-clip, clip], then scaled by clip_norm / max(norm, clip_norm)."""
        if self.clip is None and self.clip_norm is None:
            return grads
        out, sq = self._grads, 0.0
        for key, g in grads.items():
            if self.clip is not None:
                g = np.clip(g, -self.clip, self.clip, out=self.buffer(f"grad.{key}", g))
            out[key] = g
            if self.clip_norm is not None:
                sq += float(np.vdot(g, g))  # global squared L2 norm over all parameters
        if self.clip_norm is not None:
            norm = math.sqrt(sq)
            if norm > self.clip_norm:
                scale = self.clip_norm / norm
                for key, g in out.items():
                    out[key] = np.multiply(g, scale, out=self.buffer(f"grad.{key}", g))
        return out


def load_arrays(state: dict[str, np.ndarray], prefixes: tuple[str, ...]) -> dict[str, Params]:
    """Split `{"m.Wxh": a, "v.Wxh": b, ...}` into `{"m": {"Wxh": a}, "v": {"Wxh": b}}` (copies)."""
    groups: dict[str, Params] = {prefix: {} for prefix in prefixes}
    for name, value in state.items():
        prefix, _, key = name.partition(".")
        if prefix not in groups or not key:
            raise ValueError(
                f"unexpected optimizer state {name!r}; expected keys {', '.join(prefixes)}.<param>"
            )
        groups[prefix][key] = np.array(value)
    return groups
