"""The `beam` sampler: beam search for the most likely continuation of each stream.

Beam search cannot work one step's logits at a time: it keeps `beam_width` candidate texts per
stream, each with its own hidden state, and must run the model on all of them and reorder the
states as candidates are dropped. So instead of a separate hook it is a sampler with a
`search(model, state, last_ids, num_chars, rng)` method, to which the generation loop hands the
whole generation; it stays selectable like any sampler (`sampler: {type: beam}`) and adds no
hook. Called one step at a time, like any sampler, it falls back to greedy argmax.

All candidates have exactly `num_chars` characters, so the result is simply the one with the
highest total log-probability; no length penalty is needed. It is deterministic (`rng` unused).
Beam search is not guaranteed to beat greedy (the greedy prefix can fall out of the beam), and
on a character model the most likely text tends to repeat itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import numpy as np

from charrnn import Model, hookimpl
from charrnn.memory import check as check_memory
from charrnn.options import Range

#: candidates kept per stream; a search costs about width times a sampled generation
MAX_BEAM_WIDTH = 1024


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)  # (n, V) stable
    z -= np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return z


class Beam:
    """Beam search with `beam_width` candidates per stream; greedy when called per step."""

    def __init__(
        self,
        beam_width: Annotated[int, Range(ge=1, le=MAX_BEAM_WIDTH), "candidate texts kept per stream"] = 5,
    ) -> None:
        self.beam_width = int(beam_width)

    def __call__(self, logits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return logits.argmax(axis=-1)  # (k,)

    def memory_bytes(self, state: dict[str, np.ndarray], k: int, num_chars: int, V: int) -> int:
        """About the memory `search` needs: back-pointers and ids for every character, the
        states of k * beam_width candidates (three copies at a step) and a step's (k, W, V) scores."""
        W = self.beam_width
        row = sum(a[:1].nbytes for a in state.values())  # one stream's state
        return num_chars * k * (W * 8 + 8) + 3 * k * W * row + 4 * k * W * V * 8

    def search(
        self,
        model: Model,
        state: dict[str, np.ndarray],
        last_ids: np.ndarray,
        num_chars: int,
        rng: np.random.Generator | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> np.ndarray | None:
        """The most likely `num_chars` ids (k, num_chars) found for each of k primed streams.

        `state` is the primed state for k streams and `last_ids` (k,) the first input. All
        k * beam_width candidates advance in one `model.step` call per character. `cancelled()`
        is asked between steps: when it says the caller is gone, the search stops (None).
        """
        k, W = len(last_ids), self.beam_width
        check_memory(
            self.memory_bytes(state, k, num_chars, getattr(model, "vocab_size", 0)),
            f"beam search with beam_width={W} over {num_chars} characters"
            + (f" for {k} streams" if k > 1 else ""),
            "beam states, scores and back-pointers",
        )
        ids = np.repeat(np.asarray(last_ids), W)  # (k*W,) row s*W + b is beam b of stream s
        state = {name: np.repeat(a, W, axis=0) for name, a in state.items()}
        scores = np.full((k, W), -np.inf)  # (k, W) total log-probability of each beam
        scores[:, 0] = 0.0  # one live beam per stream to start: the copies are all the same
        tokens = np.empty((num_chars, k, W), np.int32)  # id chosen by each beam at each step
        parents = np.empty((num_chars, k, W), np.int32)  # the beam it extended
        first_row = (np.arange(k) * W)[:, None]  # (k, 1)
        for t in range(num_chars):
            if cancelled is not None and cancelled():
                return None
            logits, state = model.step(ids, state)  # (k*W, V)
            V = logits.shape[-1]
            cand = scores[:, :, None] + _log_softmax(logits).reshape(k, W, V)  # (k, W, V)
            best = np.argsort(-cand.reshape(k, W * V), axis=-1, kind="stable")[:, :W]  # (k, W)
            scores = np.take_along_axis(cand.reshape(k, W * V), best, axis=-1)  # descending
            parent, token = np.divmod(best, V)
            parents[t], tokens[t] = parent, token
            rows = (first_row + parent).ravel()  # (k*W,) the state each new beam continues
            state = {name: a[rows] for name, a in state.items()}
            ids = token.ravel()
        out = np.empty((k, num_chars), np.int64)
        streams, beam = np.arange(k), np.zeros(k, np.intp)  # beam 0 scores highest
        for t in range(num_chars - 1, -1, -1):  # follow the back-pointers
            out[:, t] = tokens[t, streams, beam]
            beam = parents[t, streams, beam]
        return out


@hookimpl
def charrnn_sampler(register):
    register("beam", Beam)
