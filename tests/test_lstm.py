"""LSTM against its reference; the tests it shares with GRU and RNN are in test_recurrent_models.py."""

from __future__ import annotations

import numpy as np
from test_recurrent_models import assert_one_layer_matches_reference

from charrnn_plugins.lstm import LSTM
from reference_rnn import reference_lstm_loss


def test_forget_gate_bias_starts_at_one(rng):
    model = LSTM(7, rng, hidden_size=6, num_layers=2)
    for bh in (model.params["bh"], model.params["bh1"]):  # [o, i, f, g]: forget gate bias 1
        np.testing.assert_array_equal(bh, np.repeat([0, 0, 1, 0], 6))


def test_one_layer_matches_reference_for_every_stream():
    def reference(params, inputs, targets, state):
        loss, h, c = reference_lstm_loss(params, inputs, targets, state["h"], state["c"])
        return loss, {"h": h, "c": c}

    assert_one_layer_matches_reference(LSTM, reference)
