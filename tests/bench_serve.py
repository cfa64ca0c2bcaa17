"""Aggregate throughput of `charrnn serve` with 1, 4, 16 and 64 concurrent streaming clients.

Run as `python tests/bench_serve.py [--chars N] [--hidden 256 512] [--json]` (not collected by
pytest). For each hidden size it writes an untrained checkpoint of the default model (configs/
default.yaml: a one-layer RNN; speed does not depend on the weights' values), starts
`charrnn serve` in a subprocess on 127.0.0.1:0 (the clients' threads here do not share its GIL), and measures generated characters per second over all clients:

- serial: the same number of requests as the largest concurrency, one at a time;
- C concurrent: C clients, each streaming one request of `--chars` characters at once.

The ratio to serial is what batching buys: the worker steps all admitted requests together.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
import charrnn  # noqa: E402


def checkpoint(folder: Path, hidden: int) -> str:
    """The default pipeline's model at `hidden`, trained for one step (a valid checkpoint)."""
    corpus = folder / "input.txt"
    corpus.write_text((ROOT / "data" / "input.txt").read_text(encoding="utf-8")[:20000], encoding="utf-8")
    path = str(folder / f"h{hidden}.npz")
    charrnn.run_pipeline(
        str(ROOT / "configs" / "default.yaml"),
        overrides=[
            f"corpus.path={corpus}",
            f"model.hidden_size={hidden}",
            "train.steps=1",
            "stages=[train]",
            f"train.checkpoint={path}",
        ],
        stdout=io.StringIO(),
        stderr=io.StringIO(),
    )
    return path


def stream_one(port: int, chars: int, seed: int) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = {"model": "model", "prompt": "THE ", "max_tokens": chars, "seed": seed, "stream": True}
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    got = 0
    for line in resp.read().split(b"\n\n"):  # one read: the client's own CPU cost stays small
        if line.startswith(b"data: {"):
            got += sum(len(c["text"]) for c in json.loads(line[6:])["choices"])
    conn.close()
    if resp.status != 200 or got != chars:
        raise RuntimeError(f"status {resp.status}, {got} of {chars} characters")
    return got


def concurrent(port: int, clients: int, chars: int) -> float:
    """Characters per second over `clients` simultaneous streaming requests."""
    counts = [0] * clients
    start = threading.Barrier(clients + 1)

    def run(i: int) -> None:
        start.wait()
        counts[i] = stream_one(port, chars, i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - t0)


def serial(port: int, requests: int, chars: int) -> float:
    t0 = time.perf_counter()
    total = sum(stream_one(port, chars, i) for i in range(requests))
    return total / (time.perf_counter() - t0)


def step_ceiling(path: str, clients: list[int]) -> dict[int, float]:
    """What batching can buy at most: the model's own step, C rows at once against one row.

    Characters per second of the bare generation step (`charrnn.generate.stepper`, BLAS on one
    thread as the server runs it) with C rows, divided by that with one row: no sampling, no
    HTTP. The server's ratio cannot exceed this.
    """
    from threadpoolctl import threadpool_limits

    from charrnn.engine import stepper
    from charrnn.loaded import LoadedModel

    model = LoadedModel.load(path, load_entrypoints=False).model
    rates = {}
    with threadpool_limits(1, user_api="blas"):
        for rows in sorted({1, *clients}):
            step, x = stepper(model, model.init_state(rows)), np.zeros(rows, np.int64)
            best = float("inf")
            for _ in range(5):
                t0 = time.perf_counter()
                for _ in range(200):
                    step(x)
                best = min(best, (time.perf_counter() - t0) / 200)
            rates[rows] = rows / best
    return {c: rates[c] / rates[1] for c in clients}


def blas() -> str:
    try:
        config = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        from threadpoolctl import threadpool_info

        kernels = {i.get("architecture") for i in threadpool_info() if i.get("user_api") == "blas"}
        return f"{config['name']} {config.get('version', '')} ({', '.join(sorted(map(str, kernels)))})"
    except Exception:
        return "unknown"


def cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f", {os.cpu_count()} CPUs"
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chars", type=int, default=400, help="characters per request (default 400)")
    parser.add_argument("--hidden", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for hidden in args.hidden:
            path = checkpoint(Path(tmp), hidden)
            proc = subprocess.Popen(
                [sys.executable, "-m", "charrnn", "serve", path, "--name", "model", "--port", "0",
                 "--max-batch", str(max(args.clients)), "--queue-size", str(max(args.clients))],
                stderr=subprocess.PIPE, text=True, env=dict(os.environ, CHARRNN_LOAD_PLUGINS=""),
            )  # fmt: skip
            try:
                port = int(re.search(r":(\d+)/", proc.stderr.readline()).group(1))
                threading.Thread(target=proc.stderr.read, daemon=True).start()  # the request log
                stream_one(port, 50, 0)  # warm up
                base = serial(port, min(16, max(args.clients)), args.chars)
                row = {"hidden": hidden, "serial": base, "ceiling": step_ceiling(path, args.clients)}
                for c in args.clients:
                    row[c] = concurrent(port, c, args.chars)
                rows.append(row)
            finally:
                proc.terminate()
                proc.wait()
    if args.json:
        print(json.dumps({"cpu": cpu(), "blas": blas(), "chars": args.chars, "rows": rows}))
        return
    print(f"CPU: {cpu()}; BLAS: {blas()}; {args.chars} characters per request")
    head = "| hidden | serial | " + " | ".join(f"{c} clients" for c in args.clients) + " |"
    print(head)
    print("|" + " --- |" * (2 + len(args.clients)))
    for row in rows:
        cells = [f"{row[c]:,.0f} ({row[c] / row['serial']:.1f}x)" for c in args.clients]
        print(f"| {row['hidden']} | {row['serial']:,.0f} | " + " | ".join(cells) + " |")
    print("\nCeiling: the bare model step with C rows against one row (BLAS on one thread, no HTTP):")
    for row in rows:
        print(f"hidden {row['hidden']}: " + ", ".join(f"{c}: {row['ceiling'][c]:.1f}x" for c in args.clients))


if __name__ == "__main__":
    main()
