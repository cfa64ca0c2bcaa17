"""Speed of charrnn against a naive NumPy RNN and PyTorch on tiny-shakespeare, in one process.

Run as `env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python tests/bench_speed.py [--seconds S]
[--rounds R] [--configs classic,big,lstm] [--json]` (not collected by pytest). Contenders alternate over R rounds of windows of
about S seconds each. Before a window the script waits while other processes keep the CPUs busy
(up to `--wait` seconds in all); a window during which they used more than 10% of the CPUs is run
again once, and kept but counted as noisy if it is noisy again. Medians (over the quiet windows
when there are any), ranges and ratios follow.

- training (chars/s): `charrnn` as users run it at a terminal (`Pipeline(...).train`, with the
  progress bar, the default reports and samples and the final checkpoint, no validation split as
  in the defaults; start-up excluded), the same with a 0.1 validation split evaluated at each
  report, the bare kernel loop (`model.train_step` + `optimizer.step`), the naive float64
  reference (`reference_rnn.py`, batch 1 at both sizes, Adagrad inline) and PyTorch (nn.RNN +
  nn.Linear + Adagrad, 2 threads). All read the training split in the pipeline's order (B streams,
  chunks of T) and clip gradients elementwise at 5, as charrnn's Adagrad does by default.
  The `lstm` configuration (the Shakespeare model: 2x512, dropout 0.25, Adam, norm clip 5) has
  no naive contender; PyTorch runs `nn.LSTM` there.
- generation (sampled chars/s, priming included): one stream at hidden 512, priming with 100
  characters, then sampling `--gen-chars`.
- share of the bound: each speed over the model's matrix-product bound on this machine
  (`charrnn.machine`: its products timed at their own shapes), for every contender, PyTorch too.
- peak memory of a short training run of the big configuration in a fresh subprocess, against an
  estimate of what it must hold.
"""

from __future__ import annotations

import argparse
import inspect
import io
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SHAKESPEARE = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "tinyshakespeare.txt"
CORPUS = Path(os.environ.get("CHARRNN_BENCH_CORPUS", SHAKESPEARE))  # or --corpus; a worktree elsewhere
NOISE_LIMIT = 0.10  # share of all CPUs other processes may use during a window
CLIP = 5.0  # elementwise gradient clip, charrnn's Adagrad default
GEN_HIDDEN, GEN_PRIME = 512, 100
TORCH_THREADS = 2


@dataclass(frozen=True)
class TrainConfig:
    name: str
    hidden: int
    batch: int
    seq: int
    lr: float
    dtype: str = "float32"
    model: str = "rnn"
    layers: int = 1
    dropout: float = 0.0
    optimizer: str = "adagrad"

    def describe(self) -> str:
        layers = f"{self.layers}x" if self.layers > 1 else ""
        return f"{self.name} {self.model} {layers}H{self.hidden} B{self.batch} T{self.seq}"


CONFIGS = (
    TrainConfig("classic", 100, 1, 25, 0.1),
    TrainConfig("big", 512, 64, 64, 0.01),
    TrainConfig("lstm", 512, 32, 64, 3e-3, model="lstm", layers=2, dropout=0.25, optimizer="adam"),
)
# charrnn / torch and charrnn's share of the bound, from issue 12 (the ratios for Zen 4)
TARGETS = (("big", 1.55), ("lstm", 1.1), ("classic", 6.0), ("generation", 4.0))
BOUND_TARGETS = {"big": 0.80, "lstm": 0.78}


def pipeline_config(
    cfg: TrainConfig, steps: int, checkpoint: str, val_fraction: float = 0.1
) -> dict[str, Any]:
    """A pipeline dict with the default reporting (sample_every, sample_length, eval, metrics)."""
    model = {"type": cfg.model, "hidden_size": cfg.hidden, "dtype": cfg.dtype}
    if cfg.layers > 1:
        model.update(num_layers=cfg.layers, dropout=cfg.dropout)
    optimizer = {"type": "adagrad", "lr": cfg.lr, "clip": CLIP}  # adam: its default norm clip 5
    return {
        "seed": 0,
        "corpus": {"type": "text", "path": str(CORPUS), "val_fraction": val_fraction},
        "model": model,
        "optimizer": optimizer if cfg.optimizer == "adagrad" else {"type": cfg.optimizer, "lr": cfg.lr},
        "sampler": {"type": "temperature", "temperature": 1.0},
        "stages": ["train"],
        "train": {"steps": steps, "batch_size": cfg.batch, "seq_length": cfg.seq, "checkpoint": checkpoint},
    }


def streams(ids: np.ndarray, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """(B, L) inputs and targets: the layout the Trainer reads, chunk after chunk."""
    L = (len(ids) - 1) // batch
    return ids[: batch * L].reshape(batch, L), ids[1 : batch * L + 1].reshape(batch, L)


# -- environment ---------------------------------------------------------------------------


def bound_of(pipeline: Any, vocab_size: int, cfg: TrainConfig, generate: bool = False) -> dict[str, Any]:
    """The model's matrix-product bound on this machine (`charrnn.machine`), for training or one stream."""
    from charrnn import machine

    model = pipeline.model(vocab_size)
    B, T = (1, 1) if generate else (cfg.batch, cfg.seq)
    products = model.matmul_shapes(B, T)["generate" if generate else "train"]
    times = machine.time_products(products, seconds=1.5)
    return machine.bound(products, B if generate else B * T, times)


def cpu_times() -> tuple[float, float] | None:
    """(busy seconds of all CPUs, CPU seconds of this process), or None without /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    hz = os.sysconf("SC_CLK_TCK")
    busy = sum(x for i, x in enumerate(fields) if i not in (3, 4)) / hz  # all but idle and iowait
    t = os.times()
    return busy, t.user + t.system


# -- training contenders ---------------------------------------------------------------------
# Each has `label` and `run(seconds) -> (chars, seconds, loss)`; construction is not timed.


class StepLoop:
    """A contender that trains one step per `step()` call; `run` loops for about `seconds`."""

    chars_per_step = 0

    def step(self) -> float:
        raise NotImplementedError

    def run(self, seconds: float) -> tuple[int, float, float]:
        self.step()  # warm: buffers, caches, thread pools
        n, losses, t0 = 0, [], time.perf_counter()
        while True:
            losses.append(self.step())
            n += 1
            elapsed = time.perf_counter() - t0
            if elapsed >= seconds:
                return n * self.chars_per_step, elapsed, float(np.mean(losses))


class Terminal(io.StringIO):
    """A stderr that says it is a terminal, so the training loop draws its progress bar."""

    def isatty(self) -> bool:
        return True


class CharrnnPipeline:
    """`charrnn.Pipeline(config).train(stderr)`: the loop users run; chars / TrainResult.seconds.

    stderr is a `Terminal`, so the run pays for the progress bar as it does at a user's terminal.

    A run covers whole report cycles (`sample_every` steps, each ending with a sample and an
    evaluation), at least one even when that takes longer than the window, so the share of the
    reports is that of a long run. The first window runs one cycle and sets the count for the rest.
    """

    def __init__(self, cfg: TrainConfig, val_fraction: float = 0.1) -> None:
        import charrnn

        self.charrnn, self.cfg, self.val_fraction = charrnn, cfg, val_fraction
        with tempfile.TemporaryDirectory() as tmp:
            pipeline = charrnn.Pipeline(self.config(1, tmp))
        self.cycle = pipeline.config["train"]["sample_every"] or 100
        self.steps = 0

    def config(self, steps: int, folder: str) -> dict[str, Any]:
        return pipeline_config(self.cfg, steps, str(Path(folder) / "model.npz"), self.val_fraction)

    def run(self, seconds: float) -> tuple[int, float, float]:
        steps = self.steps or self.cycle
        with tempfile.TemporaryDirectory() as tmp:
            _, result = self.charrnn.Pipeline(self.config(steps, tmp)).train(Terminal())
        if not self.steps:
            self.steps = self.cycle * max(1, round(seconds / max(result.seconds, 1e-6)))
        return result.chars, result.seconds, result.train_loss


class CharrnnKernel(StepLoop):
    """The pipeline's model and optimizer in a bare loop: `train_step` + `optimizer.step`."""

    label = "charrnn kernel"

    def __init__(self, cfg: TrainConfig, pipeline: Any, train_ids: np.ndarray, vocab_size: int) -> None:
        self.model = pipeline.model(vocab_size)
        self.optimizer = pipeline.build("optimizer", pipeline.config["optimizer"])
        self.x, self.y = streams(train_ids, cfg.batch)
        self.B, self.T = cfg.batch, cfg.seq
        self.chars_per_step = cfg.batch * cfg.seq
        self.pos, self.state = 0, self.model.init_state(cfg.batch)
        wants_rng = "rng" in inspect.signature(self.model.train_step).parameters  # models with dropout
        self.kwargs = {"rng": np.random.default_rng(1)} if wants_rng else {}

    def step(self) -> float:
        if self.pos + self.T > self.x.shape[1]:
            self.pos, self.state = 0, self.model.init_state(self.B)
        chunk = slice(self.pos, self.pos + self.T)
        loss, grads, self.state = self.model.train_step(
            self.x[:, chunk], self.y[:, chunk], self.state, **self.kwargs
        )
        self.optimizer.step(self.model.params, grads)
        self.pos += self.T
        return loss


class NaiveReference(StepLoop):
    """tests/reference_rnn.py: float64, one sequence, one time step at a time; Adagrad inline."""

    label = "naive numpy"

    def __init__(self, cfg: TrainConfig, train_ids: np.ndarray, vocab_size: int) -> None:
        from reference_rnn import reference_loss_and_grads

        self.loss_and_grads = reference_loss_and_grads
        V, H = vocab_size, cfg.hidden
        rng = np.random.default_rng(0)
        self.params = {
            "Wxh": rng.standard_normal((V, H)) * 0.01,
            "Whh": rng.standard_normal((H, H)) * 0.01,
            "Why": rng.standard_normal((H, V)) * 0.01,
            "bh": np.zeros(H),
            "by": np.zeros(V),
        }
        self.mem = {k: np.zeros_like(p) for k, p in self.params.items()}
        self.ids, self.T, self.lr = np.asarray(train_ids, np.int64), cfg.seq, cfg.lr
        self.chars_per_step = cfg.seq  # batch 1, as in min-char-rnn, for both sizes
        self.pos, self.h = 0, np.zeros(H)

    def step(self) -> float:
        if self.pos + self.T + 1 > len(self.ids):
            self.pos, self.h = 0, np.zeros_like(self.h)
        x = self.ids[self.pos : self.pos + self.T]
        y = self.ids[self.pos + 1 : self.pos + self.T + 1]
        loss, grads, self.h = self.loss_and_grads(self.params, x, y, self.h)
        for k, p in self.params.items():  # Adagrad as in min-char-rnn
            g = np.clip(grads[k], -CLIP, CLIP, out=grads[k])
            self.mem[k] += g * g
            p += -self.lr * g / np.sqrt(self.mem[k] + 1e-8)
        self.pos += self.T
        return loss


class TorchTrain(StepLoop):
    """nn.RNN(tanh) + nn.Linear + cross_entropy + Adagrad, float32, hidden state carried (detached)."""

    label = "torch"

    def __init__(self, cfg: TrainConfig, train_ids: np.ndarray, vocab_size: int) -> None:
        import torch

        self.torch, self.F = torch, torch.nn.functional
        torch.manual_seed(0)
        V, H = vocab_size, cfg.hidden
        self.rnn = torch.nn.RNN(V, H, nonlinearity="tanh", batch_first=True)
        self.out = torch.nn.Linear(H, V)
        self.params = [*self.rnn.parameters(), *self.out.parameters()]
        self.opt = torch.optim.Adagrad(self.params, lr=cfg.lr)
        x, y = streams(train_ids, cfg.batch)
        self.x, self.y = torch.from_numpy(x.astype(np.int64)), torch.from_numpy(y.astype(np.int64))
        self.V, self.B, self.H, self.T = V, cfg.batch, H, cfg.seq
        self.chars_per_step = cfg.batch * cfg.seq
        self.pos, self.h = 0, torch.zeros(1, cfg.batch, H)

    def step(self) -> float:
        torch, F, T = self.torch, self.F, self.T
        if self.pos + T > self.x.shape[1]:
            self.pos, self.h = 0, torch.zeros(1, self.B, self.H)
        x, y = self.x[:, self.pos : self.pos + T], self.y[:, self.pos : self.pos + T]
        hs, h = self.rnn(F.one_hot(x, self.V).float(), self.h)  # (B, T, H)
        loss = F.cross_entropy(self.out(hs).reshape(-1, self.V), y.reshape(-1))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_value_(self.params, CLIP)
        self.opt.step()
        self.h = h.detach()
        self.pos += T
        return loss.item()


class TorchLSTMTrain(StepLoop):
    """nn.LSTM (layers, dropout) + nn.Linear + cross_entropy + Adam, gradient norm clipped at 5."""

    label = "torch"

    def __init__(self, cfg: TrainConfig, train_ids: np.ndarray, vocab_size: int) -> None:
        import torch

        self.torch, self.F = torch, torch.nn.functional
        torch.manual_seed(0)
        V, H = vocab_size, cfg.hidden
        self.rnn = torch.nn.LSTM(V, H, num_layers=cfg.layers, dropout=cfg.dropout, batch_first=True)
        self.out = torch.nn.Linear(H, V)
        self.drop = torch.nn.Dropout(cfg.dropout)  # charrnn drops the output layer's inputs too
        self.params = [*self.rnn.parameters(), *self.out.parameters()]
        self.opt = torch.optim.Adam(self.params, lr=cfg.lr)
        x, y = streams(train_ids, cfg.batch)
        self.x, self.y = torch.from_numpy(x.astype(np.int64)), torch.from_numpy(y.astype(np.int64))
        self.V, self.B, self.H, self.T, self.L = V, cfg.batch, H, cfg.seq, cfg.layers
        self.chars_per_step = cfg.batch * cfg.seq
        self.pos, self.state = 0, self.zeros()

    def zeros(self) -> tuple[Any, Any]:
        return self.torch.zeros(self.L, self.B, self.H), self.torch.zeros(self.L, self.B, self.H)

    def step(self) -> float:
        F, T = self.F, self.T
        if self.pos + T > self.x.shape[1]:
            self.pos, self.state = 0, self.zeros()
        x, y = self.x[:, self.pos : self.pos + T], self.y[:, self.pos : self.pos + T]
        hs, (h, c) = self.rnn(F.one_hot(x, self.V).float(), self.state)  # (B, T, H)
        loss = F.cross_entropy(self.out(self.drop(hs)).reshape(-1, self.V), y.reshape(-1))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.torch.nn.utils.clip_grad_norm_(self.params, 5.0)
        self.opt.step()
        self.state = (h.detach(), c.detach())
        self.pos += T
        return loss.item()


# -- generation contenders -------------------------------------------------------------------


class GenLoop:
    """A contender that generates `n` characters per `generate()` call (priming included)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def generate(self) -> None:
        raise NotImplementedError

    def run(self, seconds: float) -> tuple[int, float, float]:
        self.generate()  # warm
        calls, t0 = 0, time.perf_counter()
        while True:
            self.generate()
            calls += 1
            elapsed = time.perf_counter() - t0
            if elapsed >= seconds:
                return calls * self.n, elapsed, math.nan


class CharrnnGenerate(GenLoop):
    """`charrnn.generate.generate` with the pipeline's model and `temperature` sampler."""

    label = "charrnn"

    def __init__(self, pipeline: Any, corpus: Any, seed_text: str, n: int) -> None:
        from charrnn.generate import generate

        super().__init__(n)
        self.fn, self.corpus, self.seed_text = generate, corpus, seed_text
        self.model = pipeline.model(len(corpus.vocab))
        self.sampler = pipeline.sampler(corpus.vocab)
        self.rng = np.random.default_rng(0)

    def generate(self) -> None:
        [text] = self.fn(self.model, self.sampler, self.corpus, self.rng, self.seed_text, self.n)
        assert len(text) == len(self.seed_text) + self.n


class NaiveGenerate(GenLoop):
    """min-char-rnn's `sample`: float64, one-hot input, `choice` over the softmax."""

    label = "naive numpy"

    def __init__(self, seed_ids: np.ndarray, vocab_size: int, n: int) -> None:
        super().__init__(n)
        V, H = vocab_size, GEN_HIDDEN
        rng = np.random.default_rng(0)
        self.Wxh, self.Whh, self.Why = (rng.standard_normal(s) * 0.01 for s in ((V, H), (H, H), (H, V)))
        self.bh, self.by = np.zeros(H), np.zeros(V)
        self.seed_ids, self.V = [int(i) for i in seed_ids], V
        self.choice = np.random.RandomState(0).choice  # np.random.choice's implementation, own state

    def generate(self) -> None:
        V = self.V
        h = np.zeros(len(self.bh))
        for i in self.seed_ids[:-1]:
            x = np.zeros(V)
            x[i] = 1
            h = np.tanh(x @ self.Wxh + h @ self.Whh + self.bh)
        ix, out = self.seed_ids[-1], []
        for _ in range(self.n):
            x = np.zeros(V)
            x[ix] = 1
            h = np.tanh(x @ self.Wxh + h @ self.Whh + self.bh)
            y = h @ self.Why + self.by
            p = np.exp(y - y.max())
            ix = self.choice(V, p=p / p.sum())
            out.append(ix)


class TorchGenerate(GenLoop):
    """nn.RNN + nn.Linear called one character at a time; softmax and torch.multinomial."""

    label = "torch"

    def __init__(self, seed_ids: np.ndarray, vocab_size: int, n: int) -> None:
        import torch

        super().__init__(n)
        self.torch = torch
        torch.manual_seed(0)
        self.rnn = torch.nn.RNN(vocab_size, GEN_HIDDEN, nonlinearity="tanh", batch_first=True)
        self.out = torch.nn.Linear(GEN_HIDDEN, vocab_size)
        self.eye = torch.eye(vocab_size)  # one-hot rows
        self.seed = torch.from_numpy(np.asarray(seed_ids, np.int64))

    def generate(self) -> None:
        torch = self.torch
        with torch.inference_mode():
            _, h = self.rnn(self.eye[self.seed[:-1]][None])  # prime in one call
            ix, out = self.seed[-1:], []
            for _ in range(self.n):
                hs, h = self.rnn(self.eye[ix][None], h)  # (1, 1, H)
                p = torch.softmax(self.out(hs[0, -1]), dim=-1)
                ix = torch.multinomial(p, 1)
                out.append(ix.item())


# -- measurement -----------------------------------------------------------------------------


class Quiet:
    """Waits before a window until other processes leave the CPUs, within a total time budget."""

    def __init__(self, budget: float) -> None:
        self.budget, self.waited = budget, 0.0

    @staticmethod
    def others(
        before: tuple[float, float] | None, after: tuple[float, float] | None, wall: float
    ) -> float | None:
        """Share of all CPUs used by other processes between two `cpu_times()` readings."""
        if before is None or after is None or wall <= 0:
            return None
        return ((after[0] - before[0]) - (after[1] - before[1])) / (wall * (os.cpu_count() or 1))

    def wait(self) -> None:
        """Sleep 0.3 s (the previous contender's worker threads stop spinning), longer while busy."""
        while True:
            before, t0 = cpu_times(), time.perf_counter()
            time.sleep(0.3)
            wall = time.perf_counter() - t0
            share = self.others(before, cpu_times(), wall)
            if share is None or share <= NOISE_LIMIT or self.waited >= self.budget:
                return
            self.waited += wall


def window(contender: Any, seconds: float, retries: int, quiet: Quiet) -> dict[str, Any]:
    """chars/s over one window; run again (up to `retries` times) if other processes were busy."""
    for attempt in range(retries + 1):
        quiet.wait()
        before, t0 = cpu_times(), time.perf_counter()
        chars, elapsed, loss = contender.run(seconds)
        others = quiet.others(before, cpu_times(), time.perf_counter() - t0)
        noisy = others is not None and others > NOISE_LIMIT
        if not noisy or attempt == retries:
            return {
                "cps": chars / elapsed,
                "loss": loss,
                "others": others,
                "noisy": noisy,
                "attempts": attempt + 1,
            }
    raise AssertionError("unreachable")


def summarise(windows: list[dict[str, Any]]) -> dict[str, Any]:
    """Median and range over the quiet windows (over all of them if none was quiet)."""
    calm = [w["cps"] for w in windows if not w["noisy"]]
    values = calm or [w["cps"] for w in windows]
    losses = [w["loss"] for w in windows if not math.isnan(w["loss"])]
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "windows": [round(w["cps"]) for w in windows],
        "noisy": sum(w["noisy"] for w in windows),
        "retried": sum(w["attempts"] > 1 for w in windows),
        "last_loss": losses[-1] if losses else None,
    }


def interleave(
    contenders: dict[str, Any], rounds: int, seconds: float, retries: int, quiet: Quiet, log: Any
) -> dict[str, Any]:
    results: dict[str, list[dict[str, Any]]] = {k: [] for k in contenders}
    for r in range(rounds):
        for key, contender in contenders.items():
            w = window(contender, seconds, retries, quiet)
            results[key].append(w)
            log(
                f"  round {r + 1}/{rounds} {key}: {w['cps']:,.0f} chars/s"
                + (" (noisy)" if w["noisy"] else "")
            )
    return {k: summarise(v) for k, v in results.items()}


def add_ratios(rows: dict[str, dict[str, Any]], bound: dict[str, Any]) -> None:
    for base in ("torch", "naive numpy"):
        ref = rows.get(base, {}).get("median")
        for row in rows.values():
            row[f"vs {base}"] = row["median"] / ref if ref else None
    for row in rows.values():
        row["of bound"] = row["median"] / bound["chars_per_sec"]


# -- memory ----------------------------------------------------------------------------------


def peak_rss_mib() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 2**20 if sys.platform == "darwin" else kb / 1024  # bytes on macOS, KiB elsewhere


def vm_hwm_mib() -> float | None:
    """Peak RSS of this process's own address space (Linux); unlike ru_maxrss, not inherited."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        return None


def memory_child(steps: int) -> dict[str, Any]:
    """Train the big configuration for `steps` steps through the pipeline; runs in its own process."""
    import charrnn

    cfg = next(c for c in CONFIGS if c.name == "big")
    with tempfile.TemporaryDirectory() as tmp:
        pipeline = charrnn.Pipeline(pipeline_config(cfg, steps, str(Path(tmp) / "model.npz")))
        base, base_hwm = peak_rss_mib(), vm_hwm_mib()
        loaded, result = pipeline.train(io.StringIO())
        model, corpus = loaded.model, pipeline.data().corpus
    peak, peak_hwm = peak_rss_mib(), vm_hwm_mib()
    V, H, B, T = len(corpus.vocab), cfg.hidden, cfg.batch, cfg.seq
    item = np.dtype(cfg.dtype).itemsize
    n_params = sum(p.size for p in model.params.values())
    parts = {
        "params + grads + adagrad memory": 3 * n_params * item,
        "activations (4 B x T x H buffers)": 4 * B * T * H * item,
        "logits (2 B x T x V buffers)": 2 * B * T * V * item,
        "encoded corpus": corpus.ids.nbytes,
    }
    estimate = sum(parts.values()) / 2**20
    return {
        "steps": result.steps,
        "peak_mib": peak,
        "baseline_mib": base,
        "increase_mib": peak - base,
        "estimate_mib": estimate,
        "estimate_parts_mib": {k: v / 2**20 for k, v in parts.items()},
        "ratio": (peak - base) / estimate,
        "vm_hwm_mib": peak_hwm,
        "vm_hwm_increase_mib": None if peak_hwm is None or base_hwm is None else peak_hwm - base_hwm,
    }


def measure_memory(steps: int = 20) -> dict[str, Any]:
    """Peak memory of `memory_child` in a fresh process.

    Linux hands a process's ru_maxrss on across exec, so this runs while this process is still
    small (before torch and the contenders are loaded).
    """
    proc = subprocess.run(
        [sys.executable, __file__, "--memory-child", str(steps)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout)


# -- report ----------------------------------------------------------------------------------


def ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}x"


def format_report(report: dict[str, Any]) -> str:
    header = (
        "configuration",
        "contender",
        "chars/s (median, min–max)",
        "of bound",
        "vs torch",
        "vs naive",
        "noisy",
    )
    rows = []
    for section in report["results"]:
        for label, r in section["rows"].items():
            speed = f"{r['median']:,.0f} ({r['min']:,.0f}–{r['max']:,.0f})"
            noisy = f"{r['noisy']}/{len(r['windows'])}"
            share = f"{r['of bound']:.0%}"
            rows.append(
                (
                    section["name"],
                    label,
                    speed,
                    share,
                    ratio(r["vs torch"]),
                    ratio(r["vs naive numpy"]),
                    noisy,
                )
            )
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    fmt = " | ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), "-+-".join("-" * w for w in widths), *(fmt.format(*row) for row in rows)]
    lines.append("")
    for section in report["results"]:
        b = section["bound"]
        lines.append(
            f"bound, {section['name']}: {b['chars_per_sec']:,.0f} chars/s = {b['flops_per_char'] / 1e6:.3g} "
            f"MFLOP/char at {b['gflops']:.1f} GFLOP/s (float32 products at the model's shapes)"
        )
    for t in report["targets"]:
        status = "n/a (no torch)" if t["pass"] is None else ("PASS" if t["pass"] else "FAIL")
        kernel = f"; kernel {ratio(t['kernel_ratio'])}" if t.get("kernel_ratio") is not None else ""
        lines.append(
            f"target {t['name']}: charrnn >= {t['target']}x torch: {ratio(t['ratio'])} {status}{kernel}"
        )
    for t in report["bound_targets"]:
        status = "PASS" if t["pass"] else "FAIL"
        lines.append(
            f"target {t['name']}: charrnn >= {t['target']:.0%} of the bound: {t['share']:.0%} {status}"
        )
    for key, shares in report["share_of_kernel_speed"].items():
        parts = ", ".join(f"{k} {v:.0%}" for k, v in shares.items() if k != "charrnn kernel")
        lines.append(f"speed as a share of the charrnn kernel loop, {key}: {parts}")
    m = report["memory"]
    if "error" in m:
        lines.append(f"memory: the subprocess failed: {m['error']}")
    elif m:
        parts = ", ".join(f"{k} {v:.1f}" for k, v in m["estimate_parts_mib"].items())
        lines.append(
            f"memory (big, {m['steps']} steps, fresh process): peak RSS {m['peak_mib']:.1f} MiB, "
            f"{m['increase_mib']:.1f} MiB above the {m['baseline_mib']:.1f} MiB after start-up; estimate "
            f"{m['estimate_mib']:.1f} MiB ({parts}); ratio {m['ratio']:.2f}"
            + ("" if m["vm_hwm_mib"] is None else f" (VmHWM {m['vm_hwm_mib']:.1f} MiB)")
        )
    cpu = report["cpu"]
    family = f" (family {cpu['family']}, model {cpu['model_number']})" if "family" in cpu else ""
    lines.append(f"machine: {cpu['model']}{family}, {cpu['usable_cpus']} of {cpu['cpus']} CPUs usable")
    blas = ", ".join(f"{k}={v}" for k, v in report["blas"].items())
    lines.append(f"blas: {blas}")
    env = {k: v for k, v in report["openblas_env"].items() if v is not None}
    if env:
        lines.append(f"warning: {env} is set; run with `env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE`")
    lines.append(
        f"torch: {report['torch'] or 'not installed (torch rows skipped)'}; numpy {report['numpy']}; "
        f"python {report['python']}; {report['cpus']} CPUs; {report['rounds']} rounds of "
        f"{report['seconds']} s windows; {report['noisy_windows']} noisy window(s) kept "
        f"(other processes > {NOISE_LIMIT:.0%} of the CPUs); waited {report['waited_seconds']:.0f} s for quiet; "
        f"total {report['total_seconds']:.0f} s"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    global CORPUS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="length of one window (default 3)")
    parser.add_argument("--rounds", type=int, default=3, help="windows per contender (default 3)")
    parser.add_argument("--gen-chars", type=int, default=2000, help="characters sampled per generation")
    parser.add_argument("--retries", type=int, default=1, help="reruns of a noisy window (default 1)")
    parser.add_argument(
        "--wait", type=float, default=30.0, help="seconds in all to wait for a quiet machine (default 30)"
    )
    parser.add_argument(
        "--configs",
        default=",".join(c.name for c in CONFIGS),
        help=f"training configurations to run (default {','.join(c.name for c in CONFIGS)})",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--corpus", type=Path, help=f"tiny-shakespeare's path (default {CORPUS})")
    parser.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.corpus is not None:
        os.environ["CHARRNN_BENCH_CORPUS"] = str(args.corpus)  # the memory subprocess reads it too
        CORPUS = args.corpus
    if args.memory_child is not None:
        print(json.dumps(memory_child(args.memory_child)))
        return 0
    if args.seconds <= 0 or args.rounds < 1 or args.gen_chars < 1 or args.retries < 0 or args.wait < 0:
        parser.error("--seconds must be > 0, --rounds and --gen-chars >= 1, --retries and --wait >= 0")
    names = args.configs.split(",")
    unknown = set(names) - {c.name for c in CONFIGS}
    if unknown:
        parser.error(f"unknown --configs {sorted(unknown)}; known: {[c.name for c in CONFIGS]}")
    if not CORPUS.is_file():
        print(
            f"error: {CORPUS} not found; the benchmark trains on tiny-shakespeare (--corpus)", file=sys.stderr
        )
        return 2

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    started = time.perf_counter()
    log("peak memory of the big configuration (subprocess)")
    memory = measure_memory()
    from charrnn import machine

    blas, cpu = machine.blas_info(), machine.cpu_info()  # before torch is imported
    import charrnn

    try:
        import torch

        torch.set_num_threads(TORCH_THREADS)
        torch_version: str | None = torch.__version__
    except ImportError:
        torch_version = None

    quiet = Quiet(args.wait)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for cfg in (c for c in CONFIGS if c.name in names):
            log(f"training {cfg.describe()}")
            pipeline = charrnn.Pipeline(pipeline_config(cfg, 1, str(Path(tmp) / "unused.npz")))
            data = pipeline.data()
            corpus, train_ids = data.corpus, data.train_ids
            V = len(corpus.vocab)
            rnn = cfg.model == "rnn"
            contenders: dict[str, Any] = {
                "charrnn": CharrnnPipeline(cfg, val_fraction=0.0)
            }  # defaults: no split
            if rnn:  # plus a whole-split evaluation at each report (an LSTM window is already long)
                contenders["charrnn, val 0.1"] = CharrnnPipeline(cfg)
            contenders["charrnn kernel"] = CharrnnKernel(cfg, pipeline, train_ids, V)
            if rnn:
                contenders["naive numpy"] = NaiveReference(cfg, train_ids, V)
            if torch_version:
                contenders["torch"] = (TorchTrain if rnn else TorchLSTMTrain)(cfg, train_ids, V)
            quiet.wait()
            bound = bound_of(pipeline, V, cfg)
            rows = interleave(contenders, args.rounds, args.seconds, args.retries, quiet, log)
            add_ratios(rows, bound)
            results.append({"name": cfg.describe(), "key": cfg.name, "rows": rows, "bound": bound})

        log(f"generation H{GEN_HIDDEN}, one stream, {GEN_PRIME} primed + {args.gen_chars} sampled")
        gen_cfg = TrainConfig("generation", GEN_HIDDEN, 1, 25, 0.01)
        pipeline = charrnn.Pipeline(pipeline_config(gen_cfg, 1, str(Path(tmp) / "unused.npz")))
        corpus = pipeline.data().corpus
        seed_ids = corpus.ids[:GEN_PRIME]
        seed_text = corpus.decode(seed_ids)
        V = len(corpus.vocab)
        contenders = {
            "charrnn": CharrnnGenerate(pipeline, corpus, seed_text, args.gen_chars),
            "naive numpy": NaiveGenerate(seed_ids, V, args.gen_chars),
        }
        if torch_version:
            contenders["torch"] = TorchGenerate(seed_ids, V, args.gen_chars)
        quiet.wait()
        bound = bound_of(pipeline, V, gen_cfg, generate=True)
        rows = interleave(contenders, args.rounds, args.seconds, args.retries, quiet, log)
        add_ratios(rows, bound)
        results.append(
            {"name": f"generation H{GEN_HIDDEN}", "key": "generation", "rows": rows, "bound": bound}
        )

    overhead = {
        s["key"]: {k: s["rows"][k]["median"] / s["rows"]["charrnn kernel"]["median"] for k in s["rows"]}
        for s in results
        if "charrnn kernel" in s["rows"]
    }
    targets = []
    for key, target in TARGETS:
        rows = next((s["rows"] for s in results if s["key"] == key), None)
        if rows is None:
            continue
        value = rows["charrnn"]["vs torch"]
        kernel = rows.get("charrnn kernel", {}).get("vs torch")
        targets.append(
            {
                "name": key,
                "target": target,
                "ratio": value,
                "pass": None if value is None else value >= target,
                "kernel_ratio": kernel,
            }
        )
    bound_targets = [
        {"name": s["key"], "target": BOUND_TARGETS[s["key"]], "share": s["rows"]["charrnn"]["of bound"]}
        for s in results
        if s["key"] in BOUND_TARGETS
    ]
    for t in bound_targets:
        t["pass"] = t["share"] >= t["target"]
    report = {
        "results": results,
        "targets": targets,
        "bound_targets": bound_targets,
        "share_of_kernel_speed": overhead,
        "memory": memory,
        "blas": blas,
        "cpu": cpu,
        "date": time.strftime("%Y-%m-%d"),
        "openblas_env": {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")},
        "torch": torch_version,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "rounds": args.rounds,
        "seconds": args.seconds,
        "gen_chars": args.gen_chars,
        "waited_seconds": quiet.waited,
        "noisy_windows": sum(r["noisy"] for s in results for r in s["rows"].values()),
        "total_seconds": time.perf_counter() - started,
    }
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
