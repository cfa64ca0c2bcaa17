"""Naive reference models (one sequence, float64, one time step at a time) and a gradient check.

Used as oracles for the `rnn`, `lstm` and `gru` models (same parameter names, shapes and
row-vector layout) and as a benchmark baseline. Written to be obviously correct, not fast.
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


def _sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


def _nll(logits, target):
    z = logits - logits.max()
    return np.log(np.exp(z).sum()) - z[target]


def reference_lstm_loss(params, inputs, targets, h0, c0):
    """Mean cross-entropy of a one-layer LSTM over one sequence, and the last (h, c).

    Gates side by side in `Wxh` (V, 4H), `Whh` (H, 4H), `bh` (4H,) in the order [o, i, f, g].
    """
    p = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    H = len(h0)
    h, c, loss = np.asarray(h0, np.float64), np.asarray(c0, np.float64), 0.0
    for x, y in zip(inputs, targets, strict=True):
        a = p["Wxh"][x] + h @ p["Whh"] + p["bh"]
        o, i, f = _sigmoid(a[:H]), _sigmoid(a[H : 2 * H]), _sigmoid(a[2 * H : 3 * H])
        g = np.tanh(a[3 * H :])
        c = f * c + i * g
        h = o * np.tanh(c)
        loss += _nll(h @ p["Why"] + p["by"], y)
    return loss / len(inputs), h, c


def reference_gru_loss(params, inputs, targets, h0):
    """Mean cross-entropy of a one-layer GRU over one sequence, and the last h.

    Gates [r, z, n] side by side in `Wxh` (V, 3H), `Whh` (H, 3H), `bh` (3H,); `bhn` (H,) is the
    candidate's recurrent bias, inside the reset gate (as in torch.nn.GRU).
    """
    p = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    H = len(h0)
    h, loss = np.asarray(h0, np.float64), 0.0
    for x, y in zip(inputs, targets, strict=True):
        a, u = p["Wxh"][x] + p["bh"], h @ p["Whh"]
        r, z = _sigmoid(a[:H] + u[:H]), _sigmoid(a[H : 2 * H] + u[H : 2 * H])
        n = np.tanh(a[2 * H :] + r * (u[2 * H :] + p["bhn"]))
        h = (1 - z) * n + z * h
        loss += _nll(h @ p["Why"] + p["by"], y)
    return loss / len(inputs), h


def randomize(model, seed=1):
    """Parameters at a scale where gradients are far from zero and the gates far from saturation."""
    rng = np.random.default_rng(seed)
    for p in model.params.values():
        p[...] = rng.standard_normal(p.shape) * (0.5 / np.sqrt(p.shape[0]) if p.ndim == 2 else 0.5)
    return model


def random_batch(V, B, T, seed=1):
    ids = np.random.default_rng(seed).integers(0, V, size=(B, T + 1))
    return ids[:, :-1], ids[:, 1:]


def random_state(model, B, seed=2):
    rng = np.random.default_rng(seed)
    return {k: rng.uniform(-0.9, 0.9, v.shape) for k, v in model.init_state(B).items()}


def gradient_mismatches(model, inputs, targets, state, dropout_seed=None, eps=1e-5):
    """Entries of `train_step`'s gradients that differ from central differences of the loss.

    Every entry of every parameter is checked; one mismatches if |a - n| > 1e-6 (|a| + |n|) and
    |a - n| > 1e-9 (the floor: rounding in the loss makes differences of ~1e-11 noise). With
    `dropout_seed`, each forward pass gets a fresh generator with that seed, so the dropout
    masks are the same every time and the loss is the one `train_step` reports.
    """

    def rng():
        return {} if dropout_seed is None else {"rng": np.random.default_rng(dropout_seed)}

    grads = {k: g.copy() for k, g in model.train_step(inputs, targets, state, **rng()).grads.items()}
    bad = []
    for key, param in model.params.items():
        for i in np.ndindex(param.shape):
            old = param[i]
            param[i] = old + eps
            plus = model.train_step(inputs, targets, state, **rng()).loss
            param[i] = old - eps
            minus = model.train_step(inputs, targets, state, **rng()).loss
            param[i] = old
            numeric, analytic = (plus - minus) / (2 * eps), grads[key][i]
            diff = abs(numeric - analytic)
            if diff > 1e-6 * (abs(numeric) + abs(analytic)) and diff > 1e-9:
                bad.append((key, i, analytic, numeric))
    return bad


def speed_vs_torch(model, torch_rnn, optimizer, B=32, T=64, rounds=7, steps=5, seed=0):
    """Training steps/s of `model` + `optimizer` over those of PyTorch, medians of alternating rounds.

    The PyTorch side is `torch_rnn` (an `nn.LSTM`/`nn.GRU` fed one-hot inputs, batch first) +
    `nn.Linear` + cross-entropy + `torch.optim.Adam` (lr 2e-3, no clipping), on 2 threads, with the
    state carried between chunks as in truncated BPTT; `optimizer` should match it. Returns
    (ratio, charrnn seconds per step, torch seconds per step). Benchmarks only: imports torch.
    """
    import time

    import torch

    torch.set_num_threads(2)
    V, H = model.vocab_size, model.hidden_size
    ids = np.random.default_rng(seed).integers(0, V, size=(B, T * 50 + 1))
    linear = torch.nn.Linear(H, V)
    torch_opt = torch.optim.Adam([*torch_rnn.parameters(), *linear.parameters()], lr=2e-3)
    ids_t = torch.from_numpy(ids)
    state = {"np": model.init_state(B), "torch": None, "pos": 0}

    def chunk():
        pos = state["pos"] if state["pos"] + T < ids.shape[1] else 0
        state["pos"] = pos + T
        return slice(pos, pos + T), slice(pos + 1, pos + T + 1)

    def charrnn_steps():
        for _ in range(steps):
            x, y = chunk()
            _, grads, state["np"] = model.train_step(ids[:, x], ids[:, y], state["np"])
            optimizer.step(model.params, grads)

    def torch_steps():
        for _ in range(steps):
            x, y = chunk()
            out, hx = torch_rnn(torch.nn.functional.one_hot(ids_t[:, x], V).float(), state["torch"])
            loss = torch.nn.functional.cross_entropy(linear(out).reshape(-1, V), ids_t[:, y].reshape(-1))
            torch_opt.zero_grad(set_to_none=True)
            loss.backward()
            torch_opt.step()
            state["torch"] = tuple(h.detach() for h in hx) if isinstance(hx, tuple) else hx.detach()

    times = {charrnn_steps: [], torch_steps: []}
    for run in times:
        run()  # warm-up: buffers, BLAS and torch's allocator
    for _ in range(rounds):
        for run, spent in times.items():
            start = time.perf_counter()
            run()
            spent.append((time.perf_counter() - start) / steps)
    ours, theirs = (float(np.median(spent)) for spent in times.values())
    return theirs / ours, ours, theirs
