"""GRU against its reference; the tests it shares with LSTM and RNN are in test_recurrent_models.py."""

from __future__ import annotations

from test_recurrent_models import assert_one_layer_matches_reference

from charrnn_plugins.gru import GRU
from reference_rnn import reference_gru_loss


def test_one_layer_matches_reference_for_every_stream():
    def reference(params, inputs, targets, state):
        loss, h = reference_gru_loss(params, inputs, targets, state["h"])
        return loss, {"h": h}

    assert_one_layer_matches_reference(GRU, reference)
