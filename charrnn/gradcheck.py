"""`charrnn gradcheck`: compare a model's analytic gradients with central differences.

Any model plugin can prove its backward pass with it. The model is built in float64 when its
factory takes a `dtype` option, its parameters and incoming state are drawn at a scale where
gradients are far from zero, and each checked entry is perturbed by +-eps.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np

from charrnn.pipeline import Pipeline

ABS_FLOOR = 1e-10  # central differences of a float64 loss of ~1 carry ~1e-11 of rounding


def gradcheck(
    pipeline: Pipeline,
    vocab_size: int = 5,
    batch_size: int = 2,
    seq_length: int = 4,
    entries: int | None = 30,
    eps: float = 1e-5,
    tol: float = 1e-6,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """One row per parameter: entries checked, the worst relative error and whether it passed.

    `entries=None` checks every entry. An entry passes when |a - n| / (|a| + |n|) < `tol` or
    |a - n| <= `ABS_FLOOR` (a and n the analytic and numeric derivatives): central differences of
    a float64 loss carry rounding noise of about that size, which near-zero gradients cannot beat.
    """
    section = dict(pipeline.config["model"])
    factory = pipeline.registry.get("model", section["type"]).factory
    if "dtype" in inspect.signature(factory).parameters:
        section["dtype"] = "float64"
    model = pipeline.build("model", section, vocab_size=vocab_size, rng=np.random.default_rng(seed))
    rng = np.random.default_rng(seed + 1)
    for p in model.params.values():  # ~unit pre-activations: gradients neither vanish nor saturate
        p[...] = rng.standard_normal(p.shape) * (0.5 / np.sqrt(p.shape[0]) if p.ndim >= 2 else 0.5)
    state = {k: rng.standard_normal(v.shape) * 0.5 for k, v in model.init_state(batch_size).items()}
    inputs = rng.integers(0, vocab_size, (batch_size, seq_length))
    targets = rng.integers(0, vocab_size, (batch_size, seq_length))
    takes_rng = "rng" in inspect.signature(model.train_step).parameters

    def loss_and_grads() -> tuple[float, dict[str, np.ndarray]]:
        extra = (
            {"rng": np.random.default_rng(seed + 2)} if takes_rng else {}
        )  # the same dropout masks each time
        loss, grads, _ = model.train_step(inputs, targets, {k: v.copy() for k, v in state.items()}, **extra)
        return loss, grads

    _, grads = loss_and_grads()
    analytic = {k: np.array(g, dtype=np.float64) for k, g in grads.items()}
    rows = []
    for name, p in model.params.items():
        flat = p.reshape(-1)
        count = flat.size if entries is None else min(entries, flat.size)
        picks = np.arange(flat.size) if count == flat.size else rng.choice(flat.size, count, replace=False)
        worst = worst_abs = 0.0
        ok = True
        for i in picks:
            old = flat[i]
            flat[i] = old + eps
            plus, _ = loss_and_grads()
            flat[i] = old - eps
            minus, _ = loss_and_grads()
            flat[i] = old
            numeric = (plus - minus) / (2 * eps)
            a = analytic[name].reshape(-1)[i]
            diff = abs(a - numeric)
            rel = diff / max(abs(a) + abs(numeric), 1e-300)
            worst, worst_abs = max(worst, rel), max(worst_abs, diff)
            ok &= rel < tol or diff <= ABS_FLOOR  # below the floor, the difference is rounding in the loss
        rows.append(
            {
                "param": name,
                "shape": list(p.shape),
                "checked": int(count),
                "max_rel_error": worst,
                "max_abs_error": worst_abs,
                "ok": bool(ok),
            }
        )
    return rows


def format_rows(rows: list[dict[str, Any]], dtype: str) -> str:
    lines = [
        f"gradient check ({dtype}): worst relative |a - n| / (|a| + |n|) and absolute |a - n| per parameter; "
        f"an entry passes below 1e-6 relative or {ABS_FLOOR:.0e} absolute"
    ]
    lines += [
        f"{r['param']:<8} {str(tuple(r['shape'])):<14} {r['checked']:>6} entries  "
        f"rel {r['max_rel_error']:.1e}  abs {r['max_abs_error']:.1e}  " + ("ok" if r["ok"] else "FAIL")
        for r in rows
    ]
    return "\n".join(lines)
