"""Training speed of `mingru` against the 2x512 LSTM of configs/shakespeare.yaml, side by side in one process.

Run as `env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python tests/bench_mingru.py [--rounds R]
[--corpus PATH]` (not collected by pytest). Each round runs one training step (`train_step` +
the optimizer) of every contender in turn, on tiny-shakespeare chunks (B 32, T 64, state carried,
dropout drawn from the rng), so a busy machine slows all of them alike; ratios are medians of the
per-round ratios, with CPU-time ratios beside them (less sensitive to other processes). Every
fifth round times each model's products at its own shapes (`charrnn.machine`), for the share of
the matrix-product bound. Then, for the first contender, the share of a step spent in the
minGRU's time loops (rerun alone on the model's own buffers) and in the matrix products.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from charrnn import machine
from charrnn.types import Corpus
from charrnn_plugins.lstm import LSTM
from charrnn_plugins.mingru import MinGRU
from charrnn_plugins.optimizers import Adam, AdamW
from conftest import SHAKESPEARE

B, T = 32, 64
MINGRU = {
    "hidden_size": 256,
    "num_layers": 4,
    "expansion": 1.5,
    "ffn_mult": 4,
    "conv_kernel": 4,
    "dropout": 0.2,
}


def contenders(V: int, rng: np.random.Generator) -> dict:
    out = {
        f"mingru {act}": (MinGRU(V, rng, **MINGRU, activation=act), AdamW(lr=3e-3, weight_decay=0.1))
        for act in ("gelu", "silu", "relu")
    }
    out["lstm 2x512"] = (LSTM(V, rng, hidden_size=512, num_layers=2, dropout=0.25), Adam(lr=3e-3))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=24)
    parser.add_argument("--corpus", default=str(SHAKESPEARE))
    args = parser.parse_args()
    corpus = Corpus.from_text(open(args.corpus, encoding="utf-8").read())
    span = len(corpus.ids) // B
    streams = np.stack([corpus.ids[b * span : (b + 1) * span] for b in range(B)]).astype(np.int64)
    rng = np.random.default_rng(0)
    models = contenders(len(corpus.vocab), rng)
    state = {k: m.init_state(B) for k, (m, _) in models.items()}
    pos = dict.fromkeys(models, 0)

    def step(k: str) -> None:
        model, optimizer = models[k]
        p = pos[k]
        if p + T + 1 > span:
            p, state[k] = 0, model.init_state(B)
        _, grads, state[k] = model.train_step(
            streams[:, p : p + T], streams[:, p + 1 : p + T + 1], state[k], rng=rng
        )
        optimizer.step(model.params, grads)
        pos[k] = p + T

    wall, cpu, bound = ({k: [] for k in models} for _ in range(3))
    for k in models:
        step(k)
        step(k)  # warm-up: buffers, BLAS
    for r in range(args.rounds):
        for k, (model, _) in models.items():
            t0, c0 = time.perf_counter(), time.process_time()
            step(k)
            wall[k].append(B * T / (time.perf_counter() - t0))
            cpu[k].append(B * T / (time.process_time() - c0))
            if r % 5 == 0:
                shapes = model.matmul_shapes(B, T)["train"]
                times = machine.time_products(shapes, 0.6)
                bound[k].append(machine.bound(shapes, B * T, times)["chars_per_sec"])
    cpu_info = machine.cpu_info()
    print(
        f"{cpu_info['model']} (family {cpu_info.get('family')}, model {cpu_info.get('model_number')}); B {B}, T {T}"
    )
    ref = "lstm 2x512"
    for k, (model, _) in models.items():
        s, c = np.array(wall[k]), np.array(cpu[k])
        ratio = s / np.array(wall[ref])
        mflop = machine.flops(model.matmul_shapes(B, T)["train"]) / (B * T) / 1e6
        print(
            f"{k:12s} median {np.median(s):6,.0f} chars/s; vs lstm {np.median(ratio):.2f}x "
            f"(quartiles {np.percentile(ratio, 25):.2f}-{np.percentile(ratio, 75):.2f}), CPU time "
            f"{np.median(c / np.array(cpu[ref])):.2f}x; best {s.max():,.0f} = {s.max() / max(bound[k]):.0%} "
            f"of the best bound {max(bound[k]):,.0f}; {mflop:.2f} MFLOP/char"
        )
    first = next(iter(models))
    print(f"{first}: " + step_shares(models[first][0], streams[:, : T + 1]))


def step_shares(model: MinGRU, ids: np.ndarray, steps: int = 5) -> str:
    """Shares of a train_step: matrix products (np.dot timed), the time loops, the rest."""
    state, rng, spent = model.init_state(B), np.random.default_rng(1), [0.0]
    real = np.dot

    def timed(a, b, out=None):
        t0 = time.perf_counter()
        result = real(a, b, out=out)
        spent[0] += time.perf_counter() - t0
        return result

    model.train_step(ids[:, :-1], ids[:, 1:], state, rng=rng)
    np.dot = timed
    try:
        t0 = time.perf_counter()
        for _ in range(steps):
            model.train_step(ids[:, :-1], ids[:, 1:], state, rng=rng)
        total = time.perf_counter() - t0
    finally:
        np.dot = real
    buffers = model._buffers[ids.shape[0], ids.shape[1] - 1]
    t0 = time.perf_counter()
    for _ in range(steps):
        for blk in buffers.blocks:
            for omz_t, zh_t, h_prev, h_t in blk.forward_steps:
                np.multiply(omz_t, h_prev, out=h_t)
                np.add(h_t, zh_t, out=h_t)
            for G_t, G_next, omz_next in blk.backward_steps:
                np.multiply(G_next, omz_next, out=buffers.tmp_h)
                np.add(G_t, buffers.tmp_h, out=G_t)
    loops = time.perf_counter() - t0
    return (
        f"step {total / steps * 1e3:.0f} ms: products (and sums done as products) {spent[0] / total:.0%}, "
        f"time loops {loops / total:.1%}, other elementwise work {1 - (spent[0] + loops) / total:.0%}"
    )


if __name__ == "__main__":
    main()
