from __future__ import annotations

import json
import os

import numpy as np
import pytest
import yaml

import charrnn
import charrnn.bench
import charrnn.loaded
import charrnn.pipeline
from charrnn import machine
from charrnn.bench import bench, format_table
from charrnn.cli import main
from charrnn.pipeline import Pipeline
from charrnn_plugins.rnn import RNN
from conftest import TINY_TEXT


@pytest.mark.slow
def test_bench_reports_speeds_bound_machine_and_memory(tiny_config, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CHARRNN_LOAD_PLUGINS", "")
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(tiny_config))
    quick = ["bench", str(path), "--seconds", "0.5"]
    assert main([*quick, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["train_chars_per_sec"] > 0 and report["generate_chars_per_sec"] > 0
    assert report["train_steps"] >= 10 and report["batch_size"] == 4
    V, H, T = len(set(TINY_TEXT)), 16, 8
    assert report["parameters"] == V * H + H * H + H * V + H + V
    assert report["peak_memory_mb"] > 0
    assert not (tmp_path / "model.npz").exists()  # bench never touches the pipeline's checkpoint

    train, gen = report["bound"]["train"], report["bound"]["generate"]
    assert train["flops_per_char"] == pytest.approx(6 * H * (H + V) - 2 * H * H / T)
    assert gen["flops_per_char"] == 2 * H * (H + V)
    assert [(p["m"], p["k"], p["n"], p["count"]) for p in gen["products"]] == [(H + V, H, 1, 1)]
    for key in ("train", "generate"):
        b = report["bound"][key]
        assert b["chars_per_sec"] > 0 and b["gflops"] > 0
        assert sum(p["share_of_time"] for p in b["products"]) == pytest.approx(1)
        share = report[f"{key}_chars_per_sec"] / b["chars_per_sec"]
        assert report[f"{key}_share_of_bound"] == pytest.approx(share, rel=0.01)  # chars/s are rounded
    m = report["machine"]
    assert m["cpu"]["cpus"] >= 1 and m["cpu"]["model"]
    assert set(m["load"]) >= {"loadavg_before", "loadavg_after", "others_cpu_share"}
    assert m["blas"]

    assert main(quick) == 0
    table = capsys.readouterr().out
    assert "chars/s" in table and "peak memory" in table and "of the bound" in table
    assert "(one stream)" in table and "load" in table and "cpu" in table

    no_time = ["bench", str(path), "--seconds", "0"]
    assert main(no_time) == 2
    message = "error: --seconds must be > 0"  # a message check, not a timing
    assert capsys.readouterr().err.startswith(message)


def test_bench_generation_counts_every_stream_and_ignores_stop(tiny_config, monkeypatch):
    """Regression: with `generate.stop` the bench divided `num_chars` by the time of a text cut
    after a few characters, and with `num_samples: 8` it reported one stream's characters
    (labelled "(one stream)") for eight streams' work."""
    tiny_config["generate"].update(stop=["t", "a"], num_samples=8)  # both occur at once
    calls = []
    real = charrnn.loaded.run  # the engine, as LoadedModel.generate calls it

    def recording(requests, *args, **kwargs):
        real(requests, *args, **kwargs)
        calls.append(sum(len(text) - len(r.seed_text) for r in requests for text in r.texts))

    monkeypatch.setattr(charrnn.loaded, "run", recording)
    report = bench(Pipeline(tiny_config, load_entrypoints=False), seconds=0.3)
    assert report["generate_chars"] == calls[-1] >= 8 * 1000  # what the timed call really produced
    assert report["generate_streams"] == 8
    assert "8 streams" in format_table(report) and "one stream" not in format_table(report)


class NoShapes(RNN):
    """An rnn whose class does not state its products: `matmul_shapes` is missing."""

    matmul_shapes = property(lambda self: None)  # getattr(...) finds nothing callable


class PlainModelPlugin:
    @charrnn.hookimpl
    def charrnn_model(self, register):
        register("plain_rnn", NoShapes)


def test_bench_says_the_bound_is_unknown_for_a_model_without_matmul_shapes(tiny_config, monkeypatch):
    timed = []
    monkeypatch.setattr(machine, "time_products", lambda *a, **k: timed.append(a) or {})
    tiny_config["model"] = {"type": "plain_rnn", "hidden_size": 16}
    report = bench(Pipeline(tiny_config, plugins=[PlainModelPlugin()], load_entrypoints=False), seconds=0.3)
    assert report["bound"] is None and report["train_share_of_bound"] is None
    assert report["generate_share_of_bound"] is None and timed == []
    assert report["train_chars_per_sec"] > 0
    assert "bound: unknown" in format_table(report)


def test_bound_is_the_products_at_their_timed_speeds():
    products = [(2, 3, 4, 10), (5, 6, 7, 1)]
    times = {(2, 3, 4): 1e-6, (5, 6, 7): 4e-6}
    b = machine.bound(products, chars=7, times=times)
    assert b["flops_per_char"] == (10 * 2 * 24 + 2 * 210) / 7
    assert b["chars_per_sec"] == pytest.approx(7 / (10e-6 + 4e-6))
    assert [p["share_of_time"] for p in b["products"]] == pytest.approx([10 / 14, 4 / 14])


def test_time_product_runs_the_shapes_it_is_given(monkeypatch):
    shapes = []
    real = np.dot
    monkeypatch.setattr(
        np, "dot", lambda a, b, out=None: shapes.append((a.shape, b.shape)) or real(a, b, out=out)
    )
    timed = [machine.time_product(m, 4, n, seconds=0.01) for m, n in ((3, 5), (1, 5), (3, 1))]
    assert all(t > 0 for t in timed)  # each returned a measurement (not a claim about speed)
    assert {((3, 4), (4, 5)), ((4,), (4, 5)), ((3, 4), (4,))} == set(shapes)


def test_load_between_counts_other_processes_only():
    before = machine.LoadSnapshot(wall=0.0, busy=10.0, own=1.0, loadavg=(1.0, 1.0, 1.0))
    after = machine.LoadSnapshot(wall=2.0, busy=13.0, own=2.0, loadavg=(2.0, 1.0, 1.0))
    load = machine.load_between(before, after)
    cpus = os.cpu_count()
    assert load["others_cpu_share"] == pytest.approx((3.0 - 1.0) / (2.0 * cpus))
    assert load["loadavg_after"] == (2.0, 1.0, 1.0)
    unknown = machine.load_between(machine.LoadSnapshot(0.0, None, 0.0, None), after)
    assert unknown["others_cpu_share"] is None


def test_table_warns_when_other_processes_were_busy(tiny_config, monkeypatch):
    busy = {"loadavg_before": (3.0, 1, 1), "loadavg_after": (4.0, 1, 1), "others_cpu_share": 0.6}
    monkeypatch.setattr(machine, "load_between", lambda before, after: {**busy, "wall_seconds": 1.0})
    report = bench(Pipeline(tiny_config, load_entrypoints=False), seconds=0.3)
    table = format_table(report)
    assert "load average 3.00 -> 4.00; other processes used 60% of the CPUs" in table
    assert "other processes kept 60% of the CPUs busy: these figures are not" in table
    busy["others_cpu_share"] = 0.01
    quiet_table = format_table(bench(Pipeline(tiny_config, load_entrypoints=False), seconds=0.3))
    assert "warning" not in quiet_table


def test_bench_training_speed_leaves_out_what_a_run_pays_once(tiny_config, monkeypatch):
    """Regression: chars/s was a short run's chars over its whole time, final evaluation, sample
    and checkpoint included, which a real run pays once over thousands of steps. The loop's
    clock is replaced by one that charges 3 s per run and 10 ms per step (no wall-clock test)."""
    pipeline = Pipeline(tiny_config, load_entrypoints=False)
    real = pipeline.train

    def train(stderr, **kw):
        assert kw == {"choose_threads": False}  # a benchmark measures at a fixed thread count
        loaded, result = real(stderr, **kw)
        result.seconds = 3.0 + 0.01 * result.steps
        return loaded, result

    monkeypatch.setattr(pipeline, "train", train)
    report = bench(pipeline, seconds=0.5)
    B, T = tiny_config["train"]["batch_size"], tiny_config["train"]["seq_length"]
    assert report["train_chars_per_sec"] == round(B * T / 0.01)
    timed = report["train_seconds"]  # from the fake clock: 10 ms per step, never the wall clock
    assert timed == pytest.approx(0.01 * report["train_steps"])


def test_bench_training_speed_on_a_busy_machine_is_never_a_difference_of_noise(tiny_config, monkeypatch):
    """Regression: when the short (baseline) run took longer than the marginal part of the long
    one, the difference went to a 1e-9 floor and the bench reported 2e13 chars/s. The long run's
    own average (an upper bound on a step's time) stands then."""
    pipeline = Pipeline(tiny_config, load_entrypoints=False)
    real = pipeline.train
    runs = []

    def train(stderr, **kw):
        loaded, result = real(stderr, **kw)
        runs.append(result.steps)
        result.seconds = 30.0 if len(runs) == 2 else 3.0 + 0.01 * result.steps  # a busy baseline
        return loaded, result

    monkeypatch.setattr(pipeline, "train", train)
    report = bench(pipeline, seconds=0.5)
    B, T = tiny_config["train"]["batch_size"], tiny_config["train"]["seq_length"]
    whole = 3.0 + 0.01 * runs[-1]  # the long run's time, all of its steps
    assert report["train_chars_per_sec"] == round(B * T * runs[-1] / whole)
    assert report["train_chars_per_sec"] < B * T / 0.01  # below the fake clock's pure step rate
