"""Shared plumbing for optimizer plugins: the common options, packed updates, state loading.

Part of the public API so that third-party optimizers take their options and checkpoint the
way the builtin ones do. Clipping is not here: the training loop clips every optimizer's
gradients before `step` (`charrnn.transforms`), reading the `clip` and `clip_norm` options.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated

import numpy as np

from charrnn.options import Range

Params = dict[str, np.ndarray]


#: the options every builtin optimizer takes, described once (see `charrnn.options`)
LearningRate = Annotated[float, Range(gt=0), "the learning rate (a schedule multiplies it)"]
Clip = Annotated[
    float | None, Range(gt=0), "clip each gradient entry to [-clip, clip] before the update; null: off"
]
ClipNorm = Annotated[
    float | None,
    Range(gt=0),
    "then rescale all gradients together so that their global L2 norm is at most this; null: off",
]
Eps = Annotated[float, Range(gt=0), "added to the denominator, for stability"]
Decay = Annotated[float, Range(ge=0, lt=1)]


def pack(arrays: Params, dtype: np.dtype | str | None = None) -> Params:
    """Copies of `arrays` as consecutive views of one flat buffer, in order and without gaps.

    A model that keeps its parameters and its gradients this way (the builtin ones do) lets the
    optimizers here update everything with a few NumPy calls per step instead of a few per
    parameter: at min-char-rnn's size that halves the optimizer's share of a training step.
    """
    arrays = {k: np.asarray(a) for k, a in arrays.items()}
    dtype = np.result_type(*arrays.values()) if dtype is None else np.dtype(dtype)
    out = pack_views(np.empty(sum(a.size for a in arrays.values()), dtype), arrays)
    for key, a in arrays.items():
        out[key][...] = a
    return out


def packed_buffer(arrays: Sequence[np.ndarray]) -> np.ndarray | None:
    """The flat buffer that `arrays` are consecutive views of (as `pack` makes them), else None."""
    base = arrays[0].base if arrays else None
    if not isinstance(base, np.ndarray) or base.ndim != 1 or not base.flags.c_contiguous:
        return None
    start, pos = base.ctypes.data, 0
    for a in arrays:
        if a.base is not base or not a.flags.c_contiguous or a.ctypes.data - start != pos * base.itemsize:
            return None
        pos += a.size
    return base if pos == base.size else None


@dataclass
class Slot:
    """What one update works on: a parameter, its gradient (clipped already) and its state arrays.

    `key` is the parameter's name, or `"*"` when one slot covers all parameters packed together.
    """

    key: str
    param: np.ndarray
    grad: np.ndarray
    state: dict[str, np.ndarray]


class _Packed:
    """The packed layout seen at the last step: the arrays (kept, so identity checks are sound)
    and the flat buffers behind them."""

    def __init__(self, params: Params, grads: Params, flat_p: np.ndarray, flat_g: np.ndarray) -> None:
        self.keys = tuple(params)
        self.params, self.grads = tuple(params.values()), tuple(grads.values())
        self.flat_p, self.flat_g = flat_p, flat_g
        self.state: dict[str, np.ndarray] = {}

    def matches(self, params: Params, grads: Params) -> bool:
        return (
            len(params) == len(self.keys)
            and all(a is b for a, b in zip(params.values(), self.params, strict=False))
            and all(a is b for a, b in zip(grads.values(), self.grads, strict=False))
            and tuple(params) == self.keys
        )


class BaseOptimizer:
    """Learning rate, clipping settings, per-parameter state and scratch buffers for optimizers.

    A subclass names its per-parameter state arrays in `state_names` (saved as `"<name>.<param>"`)
    and updates in `step` by looping over `self.slots(params, grads)`: one slot per parameter, or
    a single slot over flat buffers when the model packs its parameters and gradients (see `pack`);
    elementwise updates give bit-identical results either way. `self.buffer(name, like)` gives a
    scratch array allocated once.

    `clip` and `clip_norm` are settings only: no optimizer clips on its own. The training loop
    reads them and clips the gradients before `step` as a gradient transform
    (`charrnn.transforms.clipping`), after averaging them over processes, for every optimizer alike.
    """

    state_names: tuple[str, ...] = ()

    def __init__(self, lr: LearningRate, clip: Clip, clip_norm: ClipNorm) -> None:
        self.lr, self.clip, self.clip_norm = float(lr), clip, clip_norm
        self.state: dict[str, Params] = {}  # name -> parameter -> array, filled on first use
        self._buffers: dict[str, np.ndarray] = {}
        self._packed: _Packed | None = None

    def buffer(self, name: str, like: np.ndarray) -> np.ndarray:
        """A scratch array called `name` (e.g. `"tmp.Wxh"`) with the shape and dtype of `like`."""
        buf = self._buffers.get(name)
        if buf is None or buf.shape != like.shape or buf.dtype != like.dtype:
            buf = self._buffers[name] = np.empty_like(like)
        return buf

    def slots(self, params: Params, grads: Params) -> list[Slot]:
        """The gradients with their parameters and state (created as zeros on first use)."""
        packed = self._packed
        if packed is None or not packed.matches(params, grads):
            packed = self._packed = self._pack(params, grads)
        if packed is None:
            return [Slot(key, p, grads[key], self._state_of(key, p)) for key, p in params.items()]
        return [Slot("*", packed.flat_p, packed.flat_g, packed.state)]

    def _state_of(self, key: str, like: np.ndarray) -> dict[str, np.ndarray]:
        out = {}
        for name in self.state_names:
            arrays = self.state.setdefault(name, {})
            if key not in arrays:
                arrays[key] = np.zeros_like(like)
            out[name] = arrays[key]
        return out

    def _pack(self, params: Params, grads: Params) -> _Packed | None:
        """Use flat buffers when params and grads are packed alike; state then lives in flat buffers too."""
        if tuple(params) != tuple(grads):
            return None
        flat_p = packed_buffer(list(params.values()))
        flat_g = packed_buffer(list(grads.values()))
        if flat_p is None or flat_g is None or flat_p.size != flat_g.size or flat_p.dtype != flat_g.dtype:
            return None
        if any(p.shape != g.shape for p, g in zip(params.values(), grads.values(), strict=True)):
            return None
        packed = _Packed(params, grads, flat_p, flat_g)
        for name in self.state_names:
            # loaded or earlier per-parameter state moves into the flat buffer
            old = self.state.get(name, {})
            packed.state[name] = flat = np.zeros_like(flat_p)
            views = pack_views(flat, params)
            for key, view in views.items():
                if key in old:
                    view[...] = old[key]
            self.state[name] = views
        return packed

    def state_dict(self) -> dict[str, np.ndarray]:
        """Every state array by `"<name>.<param>"` (views: copy them to keep a snapshot)."""
        return {
            f"{name}.{key}": a for name in self.state_names for key, a in self.state.get(name, {}).items()
        }

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.state = load_arrays(state, self.state_names)
        self._packed = None  # the next step packs the loaded arrays afresh


def pack_views(flat: np.ndarray, like: Params) -> Params:
    """Views of `flat` shaped and ordered as the arrays of `like` (the layout `pack` makes)."""
    out, pos = {}, 0
    for key, a in like.items():
        out[key] = flat[pos : pos + a.size].reshape(a.shape)
        pos += a.size
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
