"""`charrnn bench`: how fast a pipeline's model trains and generates, and how close to this machine's limit.

Training runs the real loop (`Pipeline.train`: reports, validation and checkpoints as the
pipeline configures them) after a short warm-up; generation runs the real sampling loop. Between
the two, the machine is measured at the model's own matrix-product shapes (`charrnn.machine`),
which gives the model's bound: the chars/s it would reach if it did nothing but its matrix
products at this machine's speed. The share of that bound is the figure to compare across
machines; chars/s alone mostly measures the machine.
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

from charrnn import machine, tuning
from charrnn.machine import blas_info
from charrnn.pipeline import Pipeline

__all__ = ["bench", "format_table"]

MACHINE_SHARE, MACHINE_MAX_SECONDS = 0.2, 2.0  # of the time budget, for timing the products
WARM_STEPS = 5  # steps of the warm-up and of the baseline run
BUSY = 0.10  # share of all CPUs used by other processes from which the table warns


def bench(pipeline: Pipeline, seconds: float = 10.0) -> dict[str, Any]:
    """Training and generation chars/s (each over about `seconds` * 0.4), their share of the bound, memory.

    Training speed is marginal: after a warm-up run, a run of `WARM_STEPS` steps and one of
    `WARM_STEPS` + n steps are timed, and chars/s is n * B * T over the difference, so the costs paid once per run
    (the final evaluation, sample and checkpoint) cancel; the reports within the n steps stay.

    The bound needs the model's optional `matmul_shapes(batch_size, seq_length)`; without it
    the report says the bound is unknown. Generation runs `generate.num_samples` streams with
    `generate.stop` ignored (a stop string ends the text early, not the work per character).
    """
    config = pipeline.config
    t, g = config["train"], config["generate"]
    B, T, k = t["batch_size"], t["seq_length"], g["num_samples"]
    budget = seconds * (1 - MACHINE_SHARE) / 2
    load_before = machine.load_snapshot()
    with tempfile.TemporaryDirectory() as tmp:
        t.update(checkpoint=str(Path(tmp) / "bench.npz"), resume=False, save_every=t["save_every"])

        def train(steps: int) -> tuple[Any, Any]:
            t["steps"] = steps
            return pipeline.train(io.StringIO(), choose_threads=False)  # the machine at its thread count

        loaded, _ = train(WARM_STEPS)  # the warm-up
        shapes_of = getattr(loaded.model, "matmul_shapes", None)
        shapes = (
            {"train": shapes_of(B, T)["train"], "generate": shapes_of(k, 1)["generate"]}
            if shapes_of
            else None
        )
        times = {}
        if shapes is not None:
            products = shapes["train"] + shapes["generate"]
            times = machine.time_products(products, min(MACHINE_MAX_SECONDS, MACHINE_SHARE * seconds))
        _, short = train(WARM_STEPS)  # warm: the baseline; an upper bound on a step's time
        extra = max(10, int(budget / max(short.seconds / WARM_STEPS, 1e-6)))
        loaded, result = train(WARM_STEPS + extra)
    # The marginal time of the extra steps: what a run pays once (the final evaluation, sample
    # and checkpoint) cancels, as it does in a run of thousands of steps.
    marginal = result.seconds - short.seconds

    g["stop"] = []
    g["num_chars"] = 200
    loaded.generate()  # warm-up
    start = time.perf_counter()
    loaded.generate()
    per_step = (time.perf_counter() - start) / 200
    g["num_chars"] = max(1000, int(budget / max(per_step, 1e-7)))
    start = time.perf_counter()
    loaded.generate()
    gen_cps = g["num_chars"] * k / (time.perf_counter() - start)
    load = machine.load_between(load_before, machine.load_snapshot())

    bound: dict[str, Any] | None = None
    if shapes is not None:
        bound = {
            "train": machine.bound(shapes["train"], B * T, times),
            "generate": machine.bound(shapes["generate"], k, times),
        }
    # On a busy machine the baseline can take longer than the marginal part of the long run: a
    # difference of noise, faster than the products alone allow (or negative). The long run's own
    # average (an upper bound on a step's time) stands then.
    fastest = (bound or {}).get("train", {}).get("chars_per_sec")
    train_seconds = marginal
    if marginal <= 0 or (fastest is not None and extra * B * T / marginal > fastest):
        train_seconds = result.seconds * extra / (WARM_STEPS + extra)
    train_cps = extra * B * T / train_seconds
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    params = sum(p.size for p in loaded.model.params.values())
    return {
        "model": config["model"],
        "optimizer": config["optimizer"]["type"],
        "batch_size": B,
        "seq_length": T,
        "parameters": int(params),
        "train_steps": extra,
        "train_seconds": train_seconds,
        "train_chars_per_sec": round(train_cps),
        "train_share_of_bound": _share(train_cps, bound, "train"),
        "final_train_loss": result.train_loss,
        "generate_streams": k,
        "generate_chars": g["num_chars"] * k,
        "generate_chars_per_sec": round(gen_cps),
        "generate_share_of_bound": _share(gen_cps, bound, "generate"),
        "bound": bound,
        "peak_memory_mb": round(peak_kb / 1024, 1),
        "corpus_chars": len(pipeline.data().corpus.ids),
        "machine": {"cpu": machine.cpu_info(), "blas": blas_info(), "load": load, "tuning": tuning.state()},
        "python": platform.python_version(),
        "numpy": np.__version__,
    }


def _share(cps: float, bound: dict[str, Any] | None, key: str) -> float | None:
    limit = None if bound is None else bound[key]["chars_per_sec"]
    return cps / limit if limit else None


def _tuning_line(state: dict[str, Any]) -> str:
    """`pad_gemv off, blas_threads on` and where CHARRNN_TUNING set it; training runs at fixed threads here."""
    tricks = ", ".join(f"{t} {'on' if state[t] else 'off'}" for t in tuning.TRICKS)
    source = f"CHARRNN_TUNING={state['setting']}" if state["setting"] else "this machine's table"
    return f"{tricks} ({source}; measured here at fixed BLAS threads)"


def format_table(report: dict[str, Any]) -> str:
    """The report as aligned `name  value` lines."""
    bound, cpu, load = report["bound"], report["machine"]["cpu"], report["machine"]["load"]
    k = report["generate_streams"]
    streams = "one stream" if k == 1 else f"{k} streams together"

    def speed(key: str, text: str) -> str:
        share = report[f"{key}_share_of_bound"]
        if bound is None:
            return f"{text}; bound: unknown (the model states no matmul_shapes)"
        b = bound[key]
        return (
            f"{text}; {share:.0%} of the bound {b['chars_per_sec']:,.0f} chars/s "
            f"({b['flops_per_char'] / 1e6:,.3g} MFLOP/char at {b['gflops']:,.1f} GFLOP/s)"
        )

    family = f" (family {cpu['family']}, model {cpu['model_number']})" if "family" in cpu else ""
    avg = load["loadavg_before"], load["loadavg_after"]
    others = load["others_cpu_share"]
    rows = [
        ("model", ", ".join(f"{k}={v}" for k, v in report["model"].items())),
        ("batch x seq", f"{report['batch_size']} x {report['seq_length']}"),
        ("parameters", f"{report['parameters']:,}"),
        (
            "training",
            speed("train", f"{report['train_chars_per_sec']:,} chars/s ({report['train_steps']} steps)"),
        ),
        ("generation", speed("generate", f"{report['generate_chars_per_sec']:,} chars/s ({streams})")),
        ("peak memory", f"{report['peak_memory_mb']:,} MB"),
        ("cpu", f"{cpu['model']}{family}, {cpu['usable_cpus']} of {cpu['cpus']} CPUs usable"),
        ("blas", ", ".join(f"{k}={v}" for k, v in report["machine"]["blas"].items())),
        ("tuning", _tuning_line(report["machine"]["tuning"])),
        (
            "load",
            ("load average " + " -> ".join("?" if a is None else f"{a[0]:.2f}" for a in avg))
            + ("" if others is None else f"; other processes used {others:.0%} of the CPUs meanwhile"),
        ),
        ("numpy / python", f"{report['numpy']} / {report['python']} on {platform.machine()}"),
    ]
    if others is not None and others > BUSY:
        rows.append(
            (
                "warning",
                f"other processes kept {others:.0%} of the CPUs busy: these figures are not this machine's",
            )
        )
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


if __name__ == "__main__":  # pragma: no cover
    print(format_table(bench(Pipeline(sys.argv[1]))))
