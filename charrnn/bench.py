"""`charrnn bench`: how fast a pipeline's model trains and generates, as users run it.

Training runs the real loop (`Pipeline.train`: reports, validation and checkpoints as the
pipeline configures them) after a short warm-up; generation runs the real sampling loop.
"""

from __future__ import annotations

import io
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from charrnn.pipeline import Pipeline


def blas_info() -> dict[str, Any]:
    """Which BLAS kernel NumPy runs (needs the optional `threadpoolctl`)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return {"note": "install threadpoolctl (pip install 'charrnn[bench]') to see the BLAS kernel"}
    for lib in threadpool_info():
        if lib.get("user_api") == "blas":
            return {k: lib.get(k) for k in ("internal_api", "version", "architecture", "num_threads")}
    return {}


def bench(pipeline: Pipeline, seconds: float = 10.0) -> dict[str, Any]:
    """Training chars/s, generation chars/s and peak memory, each over about `seconds` / 2."""
    config = pipeline.config
    t = config["train"]
    with tempfile.TemporaryDirectory() as tmp:
        t.update(checkpoint=str(Path(tmp) / "bench.npz"), resume=False, save_every=t["save_every"])
        t["steps"] = 5
        _, warm = pipeline.train(io.StringIO())
        per_step = warm.seconds / max(warm.steps, 1)
        t["steps"] = max(10, int(seconds / 2 / max(per_step, 1e-6)))
        loaded, result = pipeline.train(io.StringIO())
    train_cps = result.chars / result.seconds

    g = config["generate"]
    g["num_chars"] = 200
    loaded.generate()  # warm-up
    start = time.perf_counter()
    loaded.generate()
    per_char = (time.perf_counter() - start) / 200
    g["num_chars"] = max(1000, int(seconds / 2 / max(per_char, 1e-7)))
    start = time.perf_counter()
    loaded.generate()
    gen_cps = g["num_chars"] / (time.perf_counter() - start)

    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    params = sum(p.size for p in loaded.model.params.values())
    return {
        "model": config["model"],
        "optimizer": config["optimizer"]["type"],
        "batch_size": t["batch_size"],
        "seq_length": t["seq_length"],
        "parameters": int(params),
        "train_steps": result.steps,
        "train_chars_per_sec": round(train_cps),
        "final_train_loss": result.train_loss,
        "generate_chars": g["num_chars"],
        "generate_chars_per_sec": round(gen_cps),
        "peak_memory_mb": round(peak_kb / 1024, 1),
        "corpus_chars": len(pipeline.data().corpus.ids),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "machine": platform.machine(),
        "blas": blas_info(),
    }


def format_table(report: dict[str, Any]) -> str:
    rows = [
        ("model", ", ".join(f"{k}={v}" for k, v in report["model"].items())),
        ("batch x seq", f"{report['batch_size']} x {report['seq_length']}"),
        ("parameters", f"{report['parameters']:,}"),
        ("training", f"{report['train_chars_per_sec']:,} chars/s ({report['train_steps']} steps)"),
        ("generation", f"{report['generate_chars_per_sec']:,} chars/s (one stream)"),
        ("peak memory", f"{report['peak_memory_mb']:,} MB"),
        ("blas", ", ".join(f"{k}={v}" for k, v in report["blas"].items())),
        ("numpy / python", f"{report['numpy']} / {report['python']} on {report['machine']}"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


if __name__ == "__main__":  # pragma: no cover
    print(format_table(bench(Pipeline(sys.argv[1]))))
