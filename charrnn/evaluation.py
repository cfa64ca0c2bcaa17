"""Scoring a model on text: its loss in nats/char beside what counting characters achieves."""

from __future__ import annotations

from typing import Any

import numpy as np

from charrnn.types import Model

EVAL_STREAMS = 32  # evaluation runs in at least this many parallel streams: forward-only, so wide is cheap


def evaluate(model: Model, ids: np.ndarray, batch_size: int, seq_length: int) -> float:
    """Mean loss in nats/char over `ids`, cut into up to `batch_size` streams of whole chunks.

    Characters that do not fill a whole chunk at the end of a stream are not scored.
    """
    T = seq_length
    B = max(1, min(batch_size, (len(ids) - 1) // T))
    L = (len(ids) - 1) // B
    x, y = ids[: B * L].reshape(B, L), ids[1 : B * L + 1].reshape(B, L)
    state = model.init_state(B)
    total, count = 0.0, 0
    for pos in range(0, L - T + 1, T):
        loss, state = model.loss(x[:, pos : pos + T], y[:, pos : pos + T], state)
        total += loss * B * T
        count += B * T
    return total / count


def ngram_baselines(train_ids: np.ndarray, ids: np.ndarray, V: int) -> tuple[float, float]:
    """Mean loss in nats/char of add-one smoothed unigram and bigram models fit on `train_ids`."""
    train = np.asarray(train_ids, dtype=np.int64)
    ids = np.asarray(ids, dtype=np.int64)
    uni = np.bincount(train, minlength=V) + 1.0
    uni_loss = float(-np.log(uni[ids] / uni.sum()).mean())
    pairs = np.bincount(train[:-1] * V + train[1:], minlength=V * V).reshape(V, V) + 1.0
    cond = pairs / pairs.sum(axis=1, keepdims=True)  # (V, V): P(next | current)
    bi_loss = float(-np.log(cond[ids[:-1], ids[1:]]).mean())
    return uni_loss, bi_loss


def format_evaluation(e: dict[str, Any]) -> str:
    ln2 = np.log(2)
    rows = [("model", e["loss"]), ("unigram baseline", e["unigram"]), ("bigram baseline", e["bigram"])]
    lines = [f"evaluation on {e['source']} ({e['chars']:,} characters); baselines fit on the training text"]
    lines += [f"{name:<17} {loss:.4f} nats/char  {loss / ln2:.3f} bits/char" for name, loss in rows]
    return "\n".join(lines)
