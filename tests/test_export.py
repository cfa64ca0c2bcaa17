"""`charrnn export`: the builtin exporters' conventions, the ONNX graph in onnxruntime, the page's file.

The page itself, in Chromium, is tested in test_export_page.py.
"""

from __future__ import annotations

import base64
import json
import re
import sys

import numpy as np
import pytest
from export_models import BYTES_TEXT, MODELS, TEXT, make_checkpoint, model_id, reference_logits

from charrnn.cli import main
from charrnn.loaded import LoadedModel
from charrnn.types import ExportNetwork
from charrnn_plugins.export import FORMATS, load
from charrnn_plugins.export.page import model_json, render
from conftest import IN_CI

try:
    import onnxruntime
except ImportError:  # pragma: no cover - depends on the environment
    onnxruntime = None

needs_onnxruntime = pytest.mark.skipif(
    onnxruntime is None and not IN_CI, reason="needs onnx and onnxruntime: pip install '.[onnx]'"
)


@pytest.fixture
def checkpoints(export_checkpoints):
    return export_checkpoints


@pytest.fixture
def bytes_checkpoint(export_checkpoints):
    return export_checkpoints["bytes"]


def every_model():
    return [pytest.param(spec, id=model_id(spec)) for spec in MODELS]


def random_state(model, B, seed):
    rng = np.random.default_rng(seed)
    return {k: rng.uniform(-0.9, 0.9, v.shape).astype(model.dtype) for k, v in model.init_state(B).items()}


def onnx_semantics(net: ExportNetwork, ids: np.ndarray, state: dict) -> tuple[np.ndarray, dict]:
    """ONNX's RNN, LSTM and GRU equations (forward, default activations) in float64, written from the spec."""

    def sigmoid(a):
        return 1 / (1 + np.exp(-a))

    V = net.by.shape[0]
    x = np.eye(V)[ids]  # (B, T, V) one-hot
    final = {}
    for layer in net.layers:
        W, R, Wb, Rb = (np.asarray(a, np.float64) for a in (layer.W, layer.R, layer.Wb, layer.Rb))
        H = R.shape[1]
        h = np.asarray(state[layer.state[0]], np.float64)
        c = np.asarray(state[layer.state[1]], np.float64) if layer.op == "LSTM" else None
        hs = []
        for t in range(ids.shape[1]):
            gx, gh = x[:, t] @ W.T + Wb, h @ R.T + Rb  # (B, G) each
            if layer.op == "RNN":
                h = np.tanh(gx + gh)
            elif layer.op == "LSTM":  # [i, o, f, c]
                a = gx + gh
                i, o, f = (sigmoid(a[:, k * H : (k + 1) * H]) for k in range(3))
                c = f * c + i * np.tanh(a[:, 3 * H :])
                h = o * np.tanh(c)
            else:  # GRU [z, r, h], linear_before_reset = 1
                z = sigmoid(gx[:, :H] + gh[:, :H])
                r = sigmoid(gx[:, H : 2 * H] + gh[:, H : 2 * H])
                n = np.tanh(gx[:, 2 * H :] + r * gh[:, 2 * H :])
                h = (1 - z) * n + z * h
            hs.append(h)
        final[layer.state[0]] = h
        if c is not None:
            final[layer.state[1]] = c
        x = np.stack(hs, axis=1)  # (B, T, H)
    return x @ np.asarray(net.Why, np.float64) + net.by, final


@pytest.mark.parametrize("spec", every_model())
def test_builtin_exporters_follow_the_onnx_operators(checkpoints, spec):
    """The exported network, run by ONNX's equations, is the model: gate orders and biases right."""
    source = load(checkpoints[spec])
    loaded = LoadedModel.load(checkpoints[spec])
    model = loaded.model
    ops = {"rnn": "RNN", "lstm": "LSTM", "gru": "GRU"}
    assert [layer.op for layer in source.network.layers] == [ops[spec[0]]] * spec[1]
    ids = np.random.default_rng(3).integers(0, model.vocab_size, (3, 9))
    state = random_state(model, 3, seed=4)
    want, want_state = reference_logits(model, ids, state)
    got, got_state = onnx_semantics(source.network, ids, state)
    tol = 1e-10 if spec[2] == "float64" else 1e-5
    np.testing.assert_allclose(got, want, atol=tol, rtol=0)
    assert set(got_state) == set(want_state)
    for key in want_state:
        np.testing.assert_allclose(got_state[key], want_state[key], atol=tol, rtol=0)


@needs_onnxruntime
@pytest.mark.parametrize("spec", every_model())
def test_onnxruntime_logits_and_final_state_match_charrnn(checkpoints, spec, tmp_path):
    path = tmp_path / "model.onnx"
    assert main(["export", checkpoints[spec], "-o", str(path)]) == 0
    model = LoadedModel.load(checkpoints[spec]).model
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [s for s in model.init_state(1)]
    assert [i.name for i in session.get_inputs()] == ["ids", *names]
    assert [o.name for o in session.get_outputs()] == ["logits", *(f"{n}_final" for n in names)]
    ids = np.random.default_rng(5).integers(0, model.vocab_size, (3, 11))
    for state in (model.init_state(3), random_state(model, 3, seed=6)):
        feeds = {"ids": ids, **{k: v.astype(np.float32) for k, v in state.items()}}
        logits, *finals = session.run(None, feeds)
        want, want_state = reference_logits(model, ids, state)
        assert logits.shape == (3, 11, model.vocab_size) and logits.dtype == np.float32
        np.testing.assert_allclose(logits, want, atol=1e-4, rtol=0)
        for name, final in zip(names, finals, strict=True):
            np.testing.assert_allclose(final, want_state[name], atol=1e-4, rtol=0)


@needs_onnxruntime
def test_onnx_graph_uses_the_recurrent_operators_and_keeps_the_vocabulary(checkpoints, tmp_path):
    import onnx

    for kind, op in (("rnn", "RNN"), ("lstm", "LSTM"), ("gru", "GRU")):
        path = tmp_path / f"{kind}.onnx"
        assert main(["export", checkpoints[(kind, 2, "float32")], "-o", str(path)]) == 0
        graph = onnx.load(str(path))
        nodes = [n for n in graph.graph.node if n.op_type == op]
        assert len(nodes) == 2
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
        assert attributes["hidden_size"] == 16
        assert attributes.get("linear_before_reset", 0) == (1 if op == "GRU" else 0)
        props = {p.key: p.value for p in graph.metadata_props}
        vocab = LoadedModel.load(checkpoints[(kind, 2, "float32")]).vocab.vocab
        assert json.loads(props["charrnn.vocab"]) == vocab and props["charrnn.encoding"] == "utf-8"


@needs_onnxruntime
def test_onnx_of_a_byte_model(bytes_checkpoint, tmp_path):
    path = tmp_path / "bytes.onnx"
    assert main(["export", bytes_checkpoint, "-o", str(path)]) == 0
    loaded = LoadedModel.load(bytes_checkpoint)
    ids = loaded.vocab.encode(BYTES_TEXT[:30])[None]  # (1, T) bytes of the UTF-8 text
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    state = loaded.model.init_state(1)
    logits = session.run(["logits"], {"ids": ids, **state})[0]
    np.testing.assert_allclose(logits, reference_logits(loaded.model, ids, state)[0], atol=1e-4, rtol=0)


def test_onnx_without_the_extra_is_one_line(checkpoints, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx raises ImportError
    out = tmp_path / "model.onnx"
    assert main(["export", checkpoints[("lstm", 1, "float32")], "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == "error: writing .onnx needs the onnx package: pip install 'charrnn[onnx]'\n"
    assert not out.exists()


def test_an_unknown_suffix_lists_the_formats(checkpoints, tmp_path, capsys):
    assert main(["export", checkpoints[("rnn", 1, "float32")], "-o", str(tmp_path / "model.tflite")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.tflite" in err
    assert all(suffix in err for suffix in FORMATS)
    assert not list(tmp_path.iterdir())


def test_the_command_says_what_it_wrote(checkpoints, tmp_path, capsys):
    out = tmp_path / "page.html"
    assert main(["export", checkpoints[("lstm", 2, "float32")], "-o", str(out)]) == 0
    line = capsys.readouterr().out
    size = out.stat().st_size
    assert re.fullmatch(
        rf"wrote {re.escape(str(out))} \([\d.]+ kB\): lstm, 2 layers of 16, \d+ symbols, [\d,]+ parameters\n",
        line,
    )
    assert f"({size / 1000:.1f} kB)" in line


def test_a_model_type_without_an_exporter_is_named_with_its_plugin(tmp_path, capsys):
    plugin = tmp_path / "plain_rnn_plugin.py"
    plugin.write_text(
        "import charrnn\nfrom charrnn_plugins.rnn import RNN\n\n"
        "@charrnn.hookimpl\ndef charrnn_model(register):\n    register('plain_rnn', RNN)\n"
    )
    corpus = tmp_path / "text.txt"
    corpus.write_text(TEXT)
    config = tmp_path / "p.yaml"
    config.write_text(
        f"plugins: [{plugin}]\ncorpus: {{type: text, path: {corpus}, val_fraction: 0}}\n"
        "model: {type: plain_rnn, hidden_size: 8}\nstages: [train]\n"
        f"train: {{steps: 2, batch_size: 2, seq_length: 8, sample_length: 0, plot: false, metrics: false, "
        f"checkpoint: {tmp_path / 'm.npz'}}}\n"
    )
    assert main(["run", str(config)]) == 0
    capsys.readouterr()
    for suffix in FORMATS:
        code = main(
            ["export", str(tmp_path / "m.npz"), "-o", str(tmp_path / f"m{suffix}"), "--plugin", str(plugin)]
        )
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1, err
        assert f"model 'plain_rnn' (plugin '{plugin}') cannot be exported" in err
        assert "charrnn_exporter" in err


def test_page_file_is_self_contained_and_holds_the_weights(checkpoints, bytes_checkpoint, tmp_path):
    for path in (checkpoints[("lstm", 3, "float64")], bytes_checkpoint):
        source = load(path)
        page = render(source)
        assert re.findall(r'(?:src|href)="([^"]*)"', page) == ["data:,"]  # nothing to load
        assert not re.findall(r"(?:https?|wss?|ftp)://", page)
        assert "default-src 'none'" in page  # and the browser is told to load nothing
        assert page.count("</script>") == 2 and page.count("<script") == 2
        blob = re.search(r'<script type="application/json" id="charrnn-model">(.*?)</script>', page, re.S)
        spec = json.loads(blob.group(1))
        assert spec["vocab"] == source.vocab and spec["encoding"] == source.encoding
        floats = np.frombuffer(base64.b64decode(spec["weights"]), "<f4")
        assert floats.size == spec["floats"]

        def array(ref, floats=floats):
            n = int(np.prod(ref["shape"]))
            return floats[ref["offset"] : ref["offset"] + n].reshape(ref["shape"])

        for n, (layer, entry) in enumerate(zip(source.network.layers, spec["layers"], strict=True)):
            W = array(entry["E"]).T if n == 0 else array(entry["W"])
            for got, want in ((W, layer.W), (array(entry["R"]), layer.R), (array(entry["Rb"]), layer.Rb)):
                np.testing.assert_array_equal(got, np.asarray(want, np.float32))
        np.testing.assert_array_equal(array(spec["WhyT"]).T, np.asarray(source.network.Why, np.float32))


def test_page_defaults_are_the_saved_generation_settings(checkpoints):
    spec = model_json(load(checkpoints[("rnn", 1, "float32")]))
    assert spec["defaults"] == {
        "seed_text": TEXT[:4],
        "num_chars": 120,
        "sampler": "top_k",
        "temperature": 0.8,
        "top_k": 5,
    }


@pytest.mark.slow
def test_a_2x512_lstm_page_is_under_30_mb(tmp_path, capsys):
    vocab = "".join(chr(c) for c in range(32, 97))  # 65 symbols, as tinyshakespeare has
    assert len(vocab) == 65
    path = make_checkpoint(tmp_path, "lstm", 2, hidden=512, text=vocab * 4, steps=1)
    out = tmp_path / "big.html"
    assert main(["export", path, "-o", str(out)]) == 0
    assert "65 symbols, 3,316,289 parameters" in capsys.readouterr().out
    assert out.stat().st_size < 30_000_000
