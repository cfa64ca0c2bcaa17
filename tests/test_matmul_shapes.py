"""The models' stated matrix products (`matmul_shapes`) against the products they really perform."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

import charrnn_plugins.recurrent as recurrent
import charrnn_plugins.rnn as rnn_module
from charrnn.engine import stepper
from charrnn.machine import flops
from charrnn_plugins.gru import GRU
from charrnn_plugins.lstm import LSTM
from charrnn_plugins.rnn import RNN

V, H, B, T = 7, 5, 3, 4  # all different, so every product's shape says which one it is


@pytest.fixture
def recorded(monkeypatch):
    """Every NumPy matrix product the models run, as (m, k, n); vector sides count as 1.

    The one-hot product that scatters dWxh for small vocabularies is switched off (the sparse
    path has no product), since `matmul_shapes` leaves that shortcut out on purpose.
    """
    seen: list[tuple[int, int, int]] = []

    def wrap(fn):
        def counted(a, b, *args, **kwargs):
            a, b = np.asarray(a), np.asarray(b)
            if a.ndim <= 2 and b.ndim <= 2 and max(a.ndim, b.ndim) == 2:
                m = a.shape[0] if a.ndim == 2 else 1
                n = b.shape[1] if b.ndim == 2 else 1
                seen.append((m, a.shape[-1], n))
            return fn(a, b, *args, **kwargs)

        return counted

    monkeypatch.setattr(np, "dot", wrap(np.dot))
    monkeypatch.setattr(np, "matmul", wrap(np.matmul))
    monkeypatch.setattr(rnn_module, "fast_dot", wrap(rnn_module.fast_dot))
    monkeypatch.setattr(recurrent, "DENSE_SCATTER_MAX_VOCAB", 0)
    return seen


def expand(products):
    total = Counter()
    for m, k, n, count in products:
        total[(m, k, n)] += count
    return +total  # drops zero counts


def without_ones_sums(seen):
    """Drop the sums over positions or vocabulary done as products with a ones vector."""
    return Counter(s for s in seen if 1 not in s)  # B, T > 1: no model product has a side of 1


@pytest.mark.parametrize("cls", [RNN, LSTM, GRU])
@pytest.mark.parametrize("layers", [1, 2, 3])
def test_train_products_are_those_the_step_performs(cls, layers, recorded, rng):
    model = cls(V, rng, hidden_size=H, num_layers=layers)
    inputs, targets = rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))
    state = model.init_state(B)
    recorded.clear()
    model.train_step(inputs, targets, state)
    stated = model.matmul_shapes(B, T)["train"]
    assert without_ones_sums(recorded) == expand(stated)


@pytest.mark.parametrize("cls", [RNN, LSTM, GRU])
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("k", [1, 3])
def test_generate_products_are_those_one_step_performs(cls, layers, k, recorded, rng):
    model = cls(V, rng, hidden_size=H, num_layers=layers)
    step = stepper(model, model.init_state(k))  # what the generation loop uses
    recorded.clear()
    step(rng.integers(0, V, k))
    stated = model.matmul_shapes(k, 1)["generate"]
    seen = Counter(recorded)
    if cls is RNN and layers == 1 and k == 1:  # the stepper's zero rows (`padded_rows`) are not model work
        [(rows, h, n)] = seen
        seen = Counter({(H + V, h, n): 1})
        assert rows >= H + V
    assert seen == expand(stated)


def test_flops_per_char_match_the_closed_forms(rng):
    """The formulas in the docstring (and the issue's 6H(H+V), 72H^2 + 6HV) from the stated shapes."""
    Hb, Vb, Bb, Tb = 24, 13, 6, 16  # small: building the models is the cost here
    one = RNN(Vb, rng, hidden_size=Hb)
    assert flops(one.matmul_shapes(Bb, Tb)["train"]) / (Bb * Tb) == pytest.approx(
        6 * Hb * (Hb + Vb) - 2 * Hb * Hb / Tb
    )
    assert flops(one.matmul_shapes(1, 1)["generate"]) == 2 * Hb * (Hb + Vb)
    lstm = LSTM(Vb, rng, hidden_size=Hb, num_layers=2)
    per_char = flops(lstm.matmul_shapes(32, Tb)["train"]) / (32 * Tb)
    assert per_char == pytest.approx(72 * Hb * Hb + 6 * Hb * Vb - 16 * Hb * Hb / Tb)
    assert flops(lstm.matmul_shapes(1, 1)["generate"]) == 3 * 2 * Hb * 4 * Hb + 2 * Hb * Vb
    gru = GRU(Vb, rng, hidden_size=Hb, num_layers=2)
    G = 3 * Hb
    per_char = flops(gru.matmul_shapes(Bb, Tb)["train"]) / (Bb * Tb)
    assert per_char == pytest.approx(2 * (6 - 2 / Tb) * Hb * G + 6 * Hb * G + 6 * Hb * Vb)
