"""Data-parallel training speed: one process with all BLAS threads vs `mpiexec -n W` with one per rank.

Not a test: a benchmark. Each contender is the real `charrnn run` as users launch it; its speed is
read from the run's metrics file (chars/s over the report windows after the first, saves and
evaluation excluded, all processes together), so start-up and MPI initialisation do not count.
Contenders alternate, and the ratio is taken within each round (these machines are shared and
noisy). It also times the per-step allreduce alone at the model's gradient size, to give its
share of a step.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python tests/bench_mpi.py [--rounds 3] [--steps 60]

Needs the `mpi` extra (`pip install '.[mpi]'`). The corpus is tiny-shakespeare beside the checkout
when present, else the embedded data/input.txt.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def corpus() -> str:
    return str(SHAKESPEARE if SHAKESPEARE.exists() else ROOT / "data" / "input.txt")


def overrides(tmp: str, steps: int, hidden: int, batch: int, seq: int) -> list[str]:
    sets = [
        f"corpus={{type: text, path: {corpus()}}}",
        f"model={{type: rnn, hidden_size: {hidden}}}",
        "optimizer={type: adagrad, lr: 0.01}",
        f"train.steps={steps}",
        f"train.batch_size={batch}",
        f"train.seq_length={seq}",
        f"train.sample_every={max(steps // 4, 1)}",
        "train.sample_length=0",
        f"train.checkpoint={tmp}/model.npz",
        "train.plot=false",
        "stages=[train]",
    ]
    return [a for s in sets for a in ("--set", s)]


def speed(metrics: Path) -> float:
    """chars/s over the report windows after the first (the first includes warm-up)."""
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    later = [r["chars_per_sec"] for r in records[1:]] or [records[-1]["chars_per_sec"]]
    return statistics.median(later)


def run(command: list[str], env: dict[str, str]) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        argv = [c.replace("{tmp}", tmp) for c in command]
        done = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=ROOT)
        if done.returncode:
            raise SystemExit(f"failed: {' '.join(argv)}\n{done.stderr}")
        return speed(Path(tmp) / "model.metrics.jsonl")


def allreduce_share(mpiexec: str, world: int, hidden: int, vocab: int) -> dict[str, float]:
    """Median seconds of one in-place float32 allreduce of the model's gradient buffer."""
    size = vocab * hidden + hidden * hidden + hidden * vocab + hidden + vocab
    code = (
        "import time, numpy as np\nfrom mpi4py import MPI\n"
        f"buf = np.ones({size}, np.float32); c = MPI.COMM_WORLD; ts = []\n"
        "for _ in range(50):\n    c.Barrier(); t = time.perf_counter()\n"
        "    c.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM); ts.append(time.perf_counter() - t)\n"
        "ts.sort()\nprint(ts[len(ts) // 2]) if c.rank == 0 else None\n"
    )
    out = subprocess.run(
        [mpiexec, "-n", str(world), sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    return {"gradient_floats": size, "allreduce_seconds": float(out.strip())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq", type=int, default=64)
    args = parser.parse_args()
    mpiexec = shutil.which("mpiexec", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    if mpiexec is None:
        raise SystemExit("needs mpiexec: pip install '.[mpi]'")
    sets = overrides("{tmp}", args.steps, args.hidden, args.batch, args.seq)
    charrnn = [sys.executable, "-m", "charrnn", "run", str(ROOT / "configs" / "default.yaml"), *sets]
    cores = len(os.sched_getaffinity(0))
    one_env = {**os.environ, "OMP_NUM_THREADS": str(cores), "OPENBLAS_NUM_THREADS": str(cores)}
    mpi_env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    rows = []
    for r in range(args.rounds):
        one = run(charrnn, one_env)
        many = run([mpiexec, "-n", str(args.world), *charrnn, "--set", "train.distributed=mpi"], mpi_env)
        rows.append((one, many))
        print(f"round {r + 1}: one process {one:,.0f} chars/s, mpiexec -n {args.world} {many:,.0f} chars/s, "
              f"ratio {many / one:.2f}", flush=True)  # fmt: skip
    ratio = statistics.median(m / o for o, m in rows)
    share = allreduce_share(mpiexec, args.world, args.hidden, 65)
    step_chars = args.batch * args.seq
    step_seconds = step_chars / statistics.median(m for _, m in rows)
    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), ""
    )
    print(f"CPU: {cpu} ({cores} cores), Python {platform.python_version()}")
    print(f"hidden {args.hidden}, batch {args.batch}, seq {args.seq}: one process with {cores} BLAS threads "
          f"{statistics.median(o for o, _ in rows):,.0f} chars/s; mpiexec -n {args.world} with 1 thread per rank "
          f"{statistics.median(m for _, m in rows):,.0f} chars/s; ratio {ratio:.2f} (median of {args.rounds})")  # fmt: skip
    print(f"allreduce of {share['gradient_floats']:,} float32 gradients: {share['allreduce_seconds'] * 1e3:.2f} ms, "
          f"{100 * share['allreduce_seconds'] / step_seconds:.1f}% of a {step_seconds * 1e3:.1f} ms step")  # fmt: skip


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"({time.time() - t0:.0f} s)")
