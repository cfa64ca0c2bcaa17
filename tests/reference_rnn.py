"""A naive min-char-rnn style reference RNN: one sequence, float64, one time step at a time.

Used as an oracle for `charrnn_plugins.rnn.RNN` (same parameter names, shapes and row-vector
layout) and as a benchmark baseline. Written to be obviously correct, not fast.
"""

from __future__ import annotations

import numpy as np


def reference_loss_and_grads(params, inputs, targets, h0):
    """Mean cross-entropy over T steps, its gradients, and the last hidden state.

    params: `Wxh` (V, H), `Whh` (H, H), `Why` (H, V), `bh` (H,), `by` (V,);
    inputs, targets: (T,) ids; h0: (H,). Returns (loss, grads, h_last).
    """
    p = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    V, H = p["Wxh"].shape
    T = len(inputs)
    hs = {-1: np.asarray(h0, dtype=np.float64).copy()}
    probs = {}
    loss = 0.0
    for t in range(T):
        x = np.zeros(V)
        x[inputs[t]] = 1.0  # one-hot
        hs[t] = np.tanh(x @ p["Wxh"] + hs[t - 1] @ p["Whh"] + p["bh"])
        logits = hs[t] @ p["Why"] + p["by"]
        e = np.exp(logits - logits.max())
        probs[t] = e / e.sum()
        loss -= np.log(probs[t][targets[t]])

    grads = {k: np.zeros_like(v) for k, v in p.items()}
    dh_next = np.zeros(H)
    for t in reversed(range(T)):
        dlogits = probs[t].copy()
        dlogits[targets[t]] -= 1.0
        dlogits /= T  # gradient of the mean loss
        grads["Why"] += np.outer(hs[t], dlogits)
        grads["by"] += dlogits
        dh = dlogits @ p["Why"].T + dh_next
        draw = (1.0 - hs[t] ** 2) * dh
        x = np.zeros(V)
        x[inputs[t]] = 1.0
        grads["Wxh"] += np.outer(x, draw)
        grads["Whh"] += np.outer(hs[t - 1], draw)
        grads["bh"] += draw
        dh_next = draw @ p["Whh"].T
    return loss / T, grads, hs[T - 1]
