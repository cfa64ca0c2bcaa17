"""Gradient transforms: what happens to the gradients between `train_step` and `optimizer.step`.

One mechanism for every optimizer, as optax chains them: averaging over the processes of a
data-parallel run, then elementwise clipping, then global-norm clipping. A transform takes the
gradients (a dict of arrays, the keys of the model's `params`) and returns them, changed in
place: the model overwrites its gradient buffers at its next step anyway. When the model packs
its gradients into one flat buffer (`charrnn.optim.pack`), each transform is one NumPy call.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from charrnn.optim import packed_buffer
from charrnn.world import World

Params = dict[str, np.ndarray]
Transform = Callable[[Params], Params]


class _Flat:
    """The flat buffer behind packed gradients, found once while the model hands back the same arrays.

    Checking the layout costs microseconds (`packed_buffer` reads every array's address): at
    min-char-rnn's size that would be a few percent of a step, so it is done again only when the
    gradient arrays change.
    """

    def __init__(self) -> None:
        self.arrays: tuple[np.ndarray, ...] = ()
        self.buffer: np.ndarray | None = None

    def __call__(self, grads: Params) -> np.ndarray | None:
        arrays = tuple(grads.values())
        if len(arrays) != len(self.arrays) or any(
            a is not b for a, b in zip(arrays, self.arrays, strict=False)
        ):
            self.arrays, self.buffer = arrays, packed_buffer(list(arrays)) if arrays else None
        return self.buffer


def global_norm(grads: Params) -> float:
    """The L2 norm of all gradients together, summed parameter by parameter (the same number,
    packed or not)."""
    return math.sqrt(sum(float(np.vdot(g, g)) for g in grads.values()))


def clip_by_value(clip: float) -> Transform:
    """Clip every gradient entry to [-clip, clip]."""

    flat_of = _Flat()

    def transform(grads: Params) -> Params:
        buffer = flat_of(grads)
        for g in (buffer,) if buffer is not None else grads.values():
            np.clip(g, -clip, clip, out=g)
        return grads

    return transform


def clip_by_global_norm(max_norm: float) -> Transform:
    """Scale all gradients together so that their global L2 norm is at most `max_norm`."""

    flat_of = _Flat()

    def transform(grads: Params) -> Params:
        norm = global_norm(grads)
        if norm > max_norm:
            scale = max_norm / norm
            buffer = flat_of(grads)
            for g in (buffer,) if buffer is not None else grads.values():
                g *= scale
        return grads

    return transform


def allreduce_mean(world: World) -> Transform:
    """Average the gradients over the processes of `world`: one in-place allreduce of one buffer.

    A model that does not pack its gradients has them copied into one buffer and back.
    """
    scratch: dict[str, np.ndarray] = {}
    flat_of = _Flat()

    def transform(grads: Params) -> Params:
        buffer = flat_of(grads)
        if buffer is not None:
            world.allreduce(buffer)
            buffer /= world.size
            return grads
        size = sum(g.size for g in grads.values())
        dtype = np.result_type(*grads.values())
        buf = scratch.get("buf")
        if buf is None or buf.size != size or buf.dtype != dtype:
            buf = scratch["buf"] = np.empty(size, dtype)
        pos = 0
        for g in grads.values():
            buf[pos : pos + g.size] = g.ravel()
            pos += g.size
        world.allreduce(buf)
        buf /= world.size
        out, pos = {}, 0
        for key, g in grads.items():
            out[key] = buf[pos : pos + g.size].reshape(g.shape)
            pos += g.size
        return out

    return transform


def chain(*transforms: Transform | None) -> Transform | None:
    """The transforms applied in order (None entries skipped); None when there is nothing to do."""
    steps: Sequence[Transform] = [t for t in transforms if t is not None]
    if not steps:
        return None
    if len(steps) == 1:
        return steps[0]

    def transform(grads: Params) -> Params:
        for t in steps:
            grads = t(grads)
        return grads

    return transform


def clipping(clip: float | None, clip_norm: float | None) -> Transform | None:
    """Elementwise clipping then global-norm clipping, as the optimizer's `clip`/`clip_norm` ask."""
    return chain(
        clip_by_value(clip) if clip is not None else None,
        clip_by_global_norm(clip_norm) if clip_norm is not None else None,
    )
