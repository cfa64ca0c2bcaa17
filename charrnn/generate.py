"""Priming and sampling: turns a model, a sampler and a seed text into new text."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from charrnn.types import Corpus, Model, Sampler


def start_ids(vocab: Corpus, seed_text: str) -> np.ndarray:
    """The ids that prime the state: the seed text, or a newline (else id 0) when it is empty."""
    if seed_text:
        return vocab.encode(seed_text)
    return np.array([vocab.index.get("\n", 0)], dtype=np.int64)


def sample(
    model: Model,
    sampler: Sampler | Callable[[np.ndarray, np.random.Generator], np.ndarray],
    vocab: Corpus,
    rng: np.random.Generator,
    seed_text: str,
    num_chars: int,
) -> str:
    """`seed_text` followed by exactly `num_chars` generated characters.

    Every seed character but the last primes the hidden state; the last one is the first
    input of the sampling loop.
    """
    ids = start_ids(vocab, seed_text)
    state = model.init_state(1)
    for i in ids[:-1]:
        _, state = model.step(np.array([i]), state)
    x = ids[-1:]
    out = np.empty(num_chars, dtype=np.int64)
    for n in range(num_chars):
        logits, state = model.step(x, state)  # (1, V)
        x = sampler(logits, rng)  # (1,)
        out[n] = x[0]
    return seed_text + vocab.decode(out)
