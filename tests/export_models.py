"""Tiny checkpoints of every builtin model, for the export tests (the page's and ONNX's).

Each is trained two steps through `run_pipeline` (a real checkpoint, with its metadata), then
given random weights at a scale where the logits spread over a few nats and the gates are
neither saturated nor flat, and saved again with `charrnn.checkpoint.save`.
"""

from __future__ import annotations

import io

import numpy as np

import charrnn
from charrnn import checkpoint as ckpt_io

TEXT = (
    "The miller kept a crow that could count to seven. It sat on the wheel and watched the sacks "
    "go up, and every evening it told the miller how many there had been.\n"
) * 6
#: UTF-8 text with two- and three-byte characters, for a byte-encoded model
BYTES_TEXT = "Café crème, naïve façade — déjà vu: “Ünïcödé” über alles. " * 12

#: (model type, layers, dtype) of the float models tested everywhere
MODELS = [(kind, layers, "float32") for kind in ("rnn", "lstm", "gru") for layers in (1, 2, 3)] + [
    ("rnn", 2, "float64"),
    ("lstm", 3, "float64"),
    ("gru", 1, "float64"),
]


def model_id(spec) -> str:
    kind, layers, dtype = spec
    return f"{kind}-{layers}" + ("-f64" if dtype == "float64" else "")


def make_checkpoint(
    directory,
    kind: str,
    layers: int,
    dtype: str = "float32",
    hidden: int = 12,
    text: str = TEXT,
    encoding: str = "utf-8",
    seed: int = 0,
    randomize: bool = True,
):
    """A checkpoint of a `kind` model with random weights; returns its path (a str)."""
    name = f"{kind}{layers}{dtype}{encoding}{hidden}"
    corpus = directory / f"{name}.txt"
    corpus.write_text(text, encoding="utf-8")
    path = directory / f"{name}.npz"
    config = {
        "seed": 1,
        "corpus": {"type": "text", "path": str(corpus), "val_fraction": 0.0, "encoding": encoding},
        "model": {"type": kind, "hidden_size": hidden, "num_layers": layers, "dtype": dtype},
        "optimizer": {"type": "adam", "lr": 0.01},
        "sampler": {"type": "top_k", "k": 5, "temperature": 0.8},
        "stages": ["train"],
        "train": {"steps": 2, "batch_size": 2, "seq_length": 8, "sample_every": 10, "sample_length": 0,
                  "metrics": False, "plot": False, "checkpoint": str(path)},
        "generate": {"num_chars": 120, "seed_text": text[:4]},
    }  # fmt: skip
    charrnn.run_pipeline(config, stdout=io.StringIO(), stderr=io.StringIO())
    if randomize:
        saved = ckpt_io.load(path)
        rng = np.random.default_rng(seed)
        for key in sorted(saved.params):
            p = saved.params[key]
            scale = (2.0 if key == "Why" else 1.0) / np.sqrt(p.shape[0]) if p.ndim == 2 else 0.5
            saved.params[key] = (rng.standard_normal(p.shape) * scale).astype(p.dtype)
        ckpt_io.save(path, saved)
    return str(path)


def reference_logits(model, ids: np.ndarray, state: dict) -> tuple[np.ndarray, dict]:
    """charrnn's own logits (B, T, V) for ids (B, T) from `state`, one `model.step` at a time."""
    out = []
    for t in range(ids.shape[1]):
        logits, state = model.step(ids[:, t], state)
        out.append(logits)
    return np.stack(out, axis=1), state


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
