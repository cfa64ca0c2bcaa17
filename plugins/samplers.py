"""Samplers for k parallel streams: `temperature`, `greedy`, `top_k`, `top_p` and `min_p`.

Each call turns logits (k, V) into k ids in a few vectorised NumPy operations:

1. `adjust`: divide by the temperature and apply the repetition penalty (a fresh (k, V) array);
2. `filter`: set the logits outside the kept set to -inf, in place (`top_k`, `top_p`, `min_p`);
3. Gumbel-max: argmax(z + Gumbel noise) ~ softmax(z), exact for the filtered, renormalised
   softmax because -inf logits never win.

The filters act on the temperature-scaled distribution (as in Hugging Face `generate`), and
tokens tied with the last one kept are kept too. All samplers take the CTRL-style repetition
penalty (`RepetitionPenalty`); `repetition_penalty: 1.0` (the default) turns it off.
"""

from __future__ import annotations

import math
from typing import Annotated

import numpy as np

from charrnn import hookimpl
from charrnn.options import Range

NOISE_ROWS = 256  # rows of Gumbel noise drawn at once

#: the options the samplers share, described once (see `charrnn.options`)
Temperature_ = Annotated[
    float, Range(gt=0, le=100), "divides the logits: below 1 is more conservative, above 1 more random"
]
Penalty = Annotated[
    float,
    Range(gt=0, le=100),
    "above 1 discourages characters seen in the window, below 1 favours them; 1 is off",
]
Window = Annotated[int, Range(ge=1, le=10_000), "how many of the last characters the penalty looks at"]


class RepetitionPenalty:
    """CTRL-style repetition penalty over the last `repetition_window` observed ids, per stream.

    A logit l of an id seen in the window becomes l / penalty if l > 0, else l * penalty (once,
    however often the id was seen). A penalty > 1 discourages repeats, < 1 encourages them, 1 is
    off. The generation loop calls `reset(k)` and then `observe(ids)` with every id it feeds the
    model, seed text included; a change in the number of streams starts a new history.
    """

    def __init__(self, repetition_penalty: Penalty = 1.0, repetition_window: Window = 20) -> None:
        self.repetition_penalty = float(repetition_penalty)
        self.repetition_window = int(repetition_window)
        self._on = self.repetition_penalty != 1.0
        self._history = np.zeros((0, self.repetition_window), np.intp)  # (k, window) ring of ids
        self._rows = np.zeros((0, 1), np.intp)  # (k, 1) row index for fancy indexing
        self._filled = self._next = 0

    def reset(self, k: int) -> None:
        """Forget the history; `k` streams follow."""
        if self._on and len(self._history) != k:
            self._history = np.zeros((k, self.repetition_window), np.intp)
            self._rows = np.arange(k)[:, None]
        self._filled = self._next = 0

    def observe(self, ids: np.ndarray) -> None:
        """Record the (k,) ids just fed to the model."""
        if not self._on:
            return
        if len(ids) != len(self._history):
            self.reset(len(ids))
        self._history[:, self._next] = ids
        self._next = (self._next + 1) % self.repetition_window
        self._filled = min(self._filled + 1, self.repetition_window)

    def penalise(self, z: np.ndarray) -> None:
        """Apply the penalty to logits z (k, V) in place."""
        if not self._filled:
            return
        if len(z) != len(self._history):
            raise ValueError(f"observed {len(self._history)} streams but got logits for {len(z)}")
        seen = self._history[:, : self._filled]  # (k, n) ids, order irrelevant
        v = z[self._rows, seen]  # (k, n) their logits
        p = self.repetition_penalty
        z[self._rows, seen] = np.where(v > 0, v / p, v * p)  # duplicates write the same value


class Temperature(RepetitionPenalty):
    """Sample from softmax(logits / temperature); temperature 1 samples the model's softmax.

    Uses the Gumbel-max trick, argmax(z + Gumbel noise) ~ softmax(z), which is exact and costs
    one vectorised draw for all k streams instead of a `choice` call per stream. Subclasses
    restrict the support by overriding `filter`.
    """

    def __init__(
        self,
        temperature: Temperature_ = 1.0,
        repetition_penalty: Penalty = 1.0,
        repetition_window: Window = 20,
    ) -> None:
        super().__init__(repetition_penalty, repetition_window)
        self.temperature = float(temperature)
        self._block: np.ndarray | None = None  # Gumbel noise drawn ahead, rows used up to _used
        self._block_rng: np.random.Generator | None = None
        self._block_scale, self._used = 1.0, 0
        # temperature alone: neither a filter nor another call (a subclass's) that the noise would not describe
        self._plain = (
            not self._on
            and type(self).filter is Temperature.filter
            and type(self).__call__ is Temperature.__call__
        )

    def adjust(self, logits: np.ndarray) -> np.ndarray:
        """Fresh logits (k, V) divided by the temperature, with the repetition penalty applied."""
        z = logits / self.temperature  # (k, V)
        self.penalise(z)
        return z

    def filter(self, z: np.ndarray) -> np.ndarray:
        """Set the logits outside the kept set to -inf, in place; returns z. Keeps all here."""
        return z

    def __call__(self, logits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if self._plain:  # argmax(z / T + g) = argmax(z + T * g): no division, no copy of the logits
            g = self.noise(rng, logits.shape, self.temperature)
            g += logits
            return g.argmax(1)  # (k,); a positional axis parses faster than axis=-1
        z = self.filter(self.adjust(logits))  # (k, V)
        g = self.noise(rng, z.shape)
        g += z
        return g.argmax(1)

    def perturb(self, rng: np.random.Generator, k: int, V: int, steps: int = 1) -> np.ndarray | None:
        """Noise P (steps, k, V) with the next `steps` calls' ids = argmax(logits_t + P[t]), or None.

        None when the ids need more than the logits plus noise (a filter, the repetition
        penalty). Lets a caller that runs many samplers on one batch (the server) add every
        request's noise to the shared logits and take one argmax per step, instead of calling
        each sampler: the noise is the rows the calls would have drawn, so the ids are too.
        Samplers that give their noise ignore `observe`; the caller may skip it meanwhile.
        """
        if not self._plain:
            return None
        return self.noise(rng, (steps * k, V), self.temperature).reshape(steps, k, V)

    def noise(self, rng: np.random.Generator, shape: tuple[int, int], scale: float = 1.0) -> np.ndarray:
        """The next (k, V) rows of Gumbel noise times `scale`, from blocks of NOISE_ROWS rows.

        Generation calls the sampler once per character, where a separate draw of 65 numbers
        costs about as much as the rest of the sampler. The rows form one stream per generator
        and scale (blocks drawn in turn, none skipped), so the noise does not depend on how many
        rows each call takes: one call of 2k rows gets what two calls of k rows get.
        """
        k, V = shape
        block, used = self._block, self._used
        if block is None or rng is not self._block_rng or scale != self._block_scale or V != block.shape[1]:
            block, used = None, 0  # a new stream
        elif used + k <= len(block):
            self._used = used + k
            return block[used : used + k]
        parts = [] if block is None else [block[used:]]
        have = len(parts[0]) if parts else 0
        while have < k:
            block = gumbel(rng, (NOISE_ROWS, V), scale)
            used = min(NOISE_ROWS, k - have)
            parts.append(block[:used])
            have += used
        self._block, self._block_rng, self._block_scale, self._used = block, rng, scale, used
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


def gumbel(rng: np.random.Generator, shape: tuple[int, int], scale: float = 1.0) -> np.ndarray:
    """Gumbel(0, scale) noise in float32, as -scale * log(E) with E ~ Exp(1).

    4x faster than `rng.gumbel` (float32 ziggurat draws and one vectorised log). E is kept
    above the smallest normal float32, so the noise is finite (at most 87.3 * scale) and a
    -inf logit never wins.
    """
    e = rng.standard_exponential(shape, dtype=np.float32)
    np.maximum(e, np.finfo(np.float32).tiny, out=e)
    np.log(e, out=e)
    e *= np.float32(-scale)
    return e


class TopK(Temperature):
    """Sample among the `k` largest logits of each stream, renormalised."""

    def __init__(
        self,
        k: Annotated[int, Range(ge=1), "how many of the most likely characters to sample among"] = 40,
        temperature: Temperature_ = 1.0,
        repetition_penalty: Penalty = 1.0,
        repetition_window: Window = 20,
    ) -> None:
        super().__init__(temperature, repetition_penalty, repetition_window)
        self.k = int(k)

    def filter(self, z: np.ndarray) -> np.ndarray:
        V = z.shape[-1]
        if self.k < V:
            kth = np.partition(z, V - self.k, axis=-1)[:, V - self.k, None]  # (k, 1) k-th largest
            np.copyto(z, -np.inf, where=z < kth)
        return z


class TopP(Temperature):
    """Nucleus sampling: the smallest set of most likely ids with total probability >= `p`.

    The most likely id is always kept; `p: 1.0` keeps everything.
    """

    def __init__(
        self,
        p: Annotated[float, Range(gt=0, le=1), "the probability the kept characters hold together"] = 0.9,
        temperature: Temperature_ = 1.0,
        repetition_penalty: Penalty = 1.0,
        repetition_window: Window = 20,
    ) -> None:
        super().__init__(temperature, repetition_penalty, repetition_window)
        self.p = float(p)

    def filter(self, z: np.ndarray) -> np.ndarray:
        if self.p >= 1.0:
            return z
        zs = np.sort(z, axis=-1)[:, ::-1]  # (k, V) descending
        probs = np.exp(zs - zs[:, :1])  # unnormalised, largest is 1
        cum = np.cumsum(probs, axis=-1)  # (k, V)
        cut = self.p * cum[:, -1:]  # (k, 1) p times the total mass
        cum -= probs  # mass of the strictly more likely ids
        n_keep = (cum < cut).sum(axis=-1)  # (k,) >= 1
        last = zs[np.arange(len(zs)), n_keep - 1, None]  # (k, 1) smallest kept logit
        np.copyto(z, -np.inf, where=z < last)
        return z


class MinP(Temperature):
    """Sample among the ids whose probability is at least `min_p` times the largest one's."""

    def __init__(
        self,
        min_p: Annotated[
            float, Range(ge=0, le=1), "keep characters at least this many times as likely as the best"
        ] = 0.05,
        temperature: Temperature_ = 1.0,
        repetition_penalty: Penalty = 1.0,
        repetition_window: Window = 20,
    ) -> None:
        super().__init__(temperature, repetition_penalty, repetition_window)
        self.min_p = float(min_p)
        self._log_min_p = math.log(self.min_p) if self.min_p > 0 else -math.inf

    def filter(self, z: np.ndarray) -> np.ndarray:
        if self.min_p > 0:
            cut = z.max(axis=-1, keepdims=True) + self._log_min_p  # p >= min_p * p_max in logits
            np.copyto(z, -np.inf, where=z < cut)
        return z


class Greedy(RepetitionPenalty):
    """The most likely id of each stream (after the repetition penalty, if any)."""

    def __init__(self, repetition_penalty: Penalty = 1.0, repetition_window: Window = 20) -> None:
        super().__init__(repetition_penalty, repetition_window)

    def adjust(self, logits: np.ndarray) -> np.ndarray:
        """Fresh logits (k, V) with the repetition penalty applied."""
        z = logits.copy()
        self.penalise(z)
        return z

    def __call__(self, logits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return (self.adjust(logits) if self._filled else logits).argmax(axis=-1)  # (k,)

    def perturb(self, rng: np.random.Generator, k: int, V: int, steps: int = 1) -> np.ndarray | None:
        """No noise (see `Temperature.perturb`), unless the repetition penalty is on (or a subclass
        calls otherwise)."""
        if self._on or type(self).__call__ is not Greedy.__call__:
            return None
        return np.zeros((steps, k, V), np.float32)


@hookimpl
def charrnn_sampler(register):
    register("temperature", Temperature)
    register("greedy", Greedy)
    register("top_k", TopK)
    register("top_p", TopP)
    register("min_p", MinP)
