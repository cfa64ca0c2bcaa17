from __future__ import annotations

import numpy as np
import yaml

import charrnn
from charrnn.cli import main


class Bigram:
    """logits = W[x] + b; `bug` scales the gradient of W to simulate a broken backward pass."""

    def __init__(self, vocab_size, rng, bug: float = 1.0, dtype: str = "float32"):
        self.bug = bug
        self.params = {"W": np.zeros((vocab_size, vocab_size), dtype), "b": np.zeros(vocab_size, dtype)}

    def init_state(self, batch_size):
        return {}

    def _probs(self, inputs):
        z = self.params["W"][inputs] + self.params["b"]
        p = np.exp(z - z.max(-1, keepdims=True))
        return p / p.sum(-1, keepdims=True)

    def loss(self, inputs, targets, state):
        p = self._probs(inputs)
        return float(-np.log(np.take_along_axis(p, targets[..., None], -1)).mean()), state

    def train_step(self, inputs, targets, state):
        p = self._probs(inputs)
        loss = float(-np.log(np.take_along_axis(p, targets[..., None], -1)).mean())
        d = p.copy()
        np.put_along_axis(d, targets[..., None], np.take_along_axis(d, targets[..., None], -1) - 1, -1)
        d /= inputs.size
        gW = np.zeros_like(self.params["W"])
        np.add.at(gW, inputs, d)
        return charrnn.StepResult(loss, {"W": gW * self.bug, "b": d.sum((0, 1))}, state)

    def step(self, ids, state):
        return self.params["W"][ids] + self.params["b"], state


def write_plugin(tmp_path):
    plugin = tmp_path / "bigram_plugin.py"
    plugin.write_text(
        "import charrnn\nfrom test_gradcheck import Bigram\n\n"
        "@charrnn.hookimpl\ndef charrnn_model(register):\n    register('bigram', Bigram)\n"
    )
    return plugin


def test_gradcheck_passes_a_correct_model_and_fails_a_broken_one(tmp_path, capsys, corpus_file):
    config = {
        "plugins": [str(write_plugin(tmp_path))],
        "corpus": {"type": "text", "path": str(corpus_file)},
        "model": {"type": "bigram"},
    }
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["gradcheck", str(path), "--entries", "0"]) == 0
    out = capsys.readouterr().out
    assert "W        (5, 5)             25 entries" in out and "FAIL" not in out
    assert main(["gradcheck", str(path), "--set", "model.bug=1.01"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out.splitlines()[1] and out.splitlines()[2].endswith("ok")


def test_gradcheck_of_the_default_rnn(capsys):
    from conftest import ROOT

    assert (
        main(
            [
                "gradcheck",
                str(ROOT / "configs" / "default.yaml"),
                "--set",
                "model.hidden_size=6",
                "--entries",
                "0",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.count(" ok") == 5
