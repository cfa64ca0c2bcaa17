"""Tiny checkpoints of every builtin model, for the export tests (the page's and ONNX's).

Each is trained through `run_pipeline` on a short text, long enough that greedy generation
writes varied text rather than one repeated character, and saved as any training run saves.
`conftest.export_checkpoints` builds them once per test session.
"""

from __future__ import annotations

import io

import numpy as np

import charrnn

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
    hidden: int = 16,
    text: str = TEXT,
    encoding: str = "utf-8",
    steps: int = 150,
) -> str:
    """The checkpoint of a `kind` model trained `steps` steps on `text`; returns its path."""
    name = f"{kind}{layers}{dtype}{encoding}{hidden}"
    corpus = directory / f"{name}.txt"
    corpus.write_text(text, encoding="utf-8")
    path = directory / f"{name}.npz"
    model = {"type": kind, "hidden_size": hidden, "num_layers": layers, "dtype": dtype}
    if kind == "rnn":
        model["init_scale"] = 0.3  # from the default 0.01, 150 steps leave a 3-layer rnn writing spaces
    config = {
        "seed": 1,
        "corpus": {"type": "text", "path": str(corpus), "val_fraction": 0.0, "encoding": encoding},
        "model": model,
        "optimizer": {"type": "adam", "lr": 0.02},
        "sampler": {"type": "top_k", "k": 5, "temperature": 0.8},
        "stages": ["train"],
        "train": {"steps": steps, "batch_size": 8, "seq_length": 16, "sample_every": 1000, "sample_length": 0,
                  "metrics": False, "plot": False, "checkpoint": str(path)},
        "generate": {"num_chars": 120, "seed_text": text[:4]},
    }  # fmt: skip
    charrnn.run_pipeline(config, stdout=io.StringIO(), stderr=io.StringIO())
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
