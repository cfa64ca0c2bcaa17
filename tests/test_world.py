"""Data-parallel training driven by the thread-based World: the real loop, W replicas in one process."""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest

import charrnn
from charrnn import checkpoint as ckpt_io
from charrnn.errors import CharrnnError, ConfigError, PluginFailure
from charrnn.interrupts import NoInterrupts
from charrnn.pipeline import Pipeline
from charrnn.world import (
    LocalWorld,
    SharedFailure,
    ThreadWorld,
    WorldAborted,
    agree,
    detect,
    launcher_size,
    rows,
)


def distributed_config(tiny_config, tmp_path, name="model", dtype="float64", **train):
    config = dict(tiny_config)
    config["model"] = {"type": "rnn", "hidden_size": 12, "dtype": dtype}
    config["optimizer"] = {"type": "adam", "lr": 0.01}
    config["stages"] = ["train"]
    config["train"] = {
        **tiny_config["train"],
        "steps": 20,
        "batch_size": 4,
        "seq_length": 8,
        "sample_every": 10,
        "checkpoint": str(tmp_path / f"{name}.npz"),
        **train,
    }
    return config


def train_on(world_size, config):
    """Train with `world_size` thread replicas; every replica's parameters, rank order."""

    def replica(world):
        loaded, result = Pipeline(config).train(io.StringIO(), world=world, interrupts=NoInterrupts())
        return {k: v.copy() for k, v in loaded.model.params.items()}, result

    if world_size == 1:
        return [replica(LocalWorld())]
    return ThreadWorld.run(world_size, replica)


def test_thread_world_collectives():
    def body(world):
        buf = np.array([1.0, 2.0]) * (world.rank + 1)
        world.allreduce(buf)
        got = world.broadcast(f"from {world.rank}", root=1)
        gathered = world.gather(world.rank * 10)
        return buf.tolist(), got, gathered

    results = ThreadWorld.run(3, body)
    assert [r[0] for r in results] == [[6.0, 12.0]] * 3
    assert [r[1] for r in results] == ["from 1"] * 3
    assert results[0][2] == [0, 10, 20] and results[1][2] is None


def test_thread_world_error_on_one_rank_ends_all():
    def body(world):
        if world.rank == 1:
            raise ValueError("rank 1 broke")
        world.allreduce(np.zeros(1))  # would wait forever for rank 1
        return "unreachable"

    with pytest.raises(ValueError, match="rank 1 broke"):
        ThreadWorld.run(2, body)


def test_thread_world_abort():
    def body(world):
        if world.rank == 0:
            world.abort(2)
        world.allreduce(np.zeros(1))

    with pytest.raises(WorldAborted) as info:
        ThreadWorld.run(2, body)
    assert info.value.code == 2


@pytest.mark.parametrize(("dtype", "rtol"), [("float64", 1e-10), ("float32", 1e-5)])
def test_two_replicas_equal_one_process(tiny_config, tmp_path, dtype, rtol):
    one = train_on(1, distributed_config(tiny_config, tmp_path, "one", dtype))
    two = train_on(2, distributed_config(tiny_config, tmp_path, "two", dtype))
    (p1, r1), ((pa, ra), (pb, rb)) = one[0], two
    for key in p1:
        np.testing.assert_array_equal(pa[key], pb[key])  # replicas stay identical, bit for bit
        np.testing.assert_allclose(pa[key], p1[key], rtol=rtol, atol=rtol * 1e-3)
    assert ra.steps == rb.steps == r1.steps == 20
    assert ra.train_loss == pytest.approx(r1.train_loss, rel=rtol)
    assert rb.train_loss == ra.train_loss  # the loss is shared, so both ranks report the same
    saved = ckpt_io.load(tmp_path / "two.npz")
    assert saved.meta["world_size"] == 2
    for key in p1:
        np.testing.assert_array_equal(saved.params[key], pa[key])
    ref = ckpt_io.load(tmp_path / "one.npz")
    for key in ref.state:  # the gathered carried state has every stream's rows, in order
        assert saved.state[key].shape == ref.state[key].shape
        np.testing.assert_allclose(saved.state[key], ref.state[key], rtol=rtol, atol=rtol * 1e-3)


def test_distributed_checkpoint_resumes_in_one_process(tiny_config, tmp_path):
    full = distributed_config(tiny_config, tmp_path, "full", steps=20)
    train_on(1, full)
    half = distributed_config(tiny_config, tmp_path, "half", steps=10)
    train_on(2, half)
    resumed = distributed_config(tiny_config, tmp_path, "half", steps=20, resume=True)
    train_on(1, resumed)
    a, b = ckpt_io.load(tmp_path / "full.npz"), ckpt_io.load(tmp_path / "half.npz")
    assert b.meta["step"] == 20
    for key in a.params:
        np.testing.assert_allclose(b.params[key], a.params[key], rtol=1e-10, atol=1e-13)


def test_one_process_checkpoint_resumes_on_two(tiny_config, tmp_path):
    full = distributed_config(tiny_config, tmp_path, "full", steps=20)
    train_on(1, full)
    train_on(1, distributed_config(tiny_config, tmp_path, "half", steps=10))
    train_on(2, distributed_config(tiny_config, tmp_path, "half", steps=20, resume=True))
    a, b = ckpt_io.load(tmp_path / "full.npz"), ckpt_io.load(tmp_path / "half.npz")
    for key in a.params:
        np.testing.assert_allclose(b.params[key], a.params[key], rtol=1e-10, atol=1e-13)


def test_batch_must_divide_by_world_size(tiny_config, tmp_path):
    config = distributed_config(tiny_config, tmp_path, batch_size=4)
    with pytest.raises(
        SharedFailure, match=r"batch_size \(4\) must be divisible by the number of processes \(3\)"
    ) as info:
        train_on(3, config)
    assert info.value.code == 2


def test_rows_split_the_global_layout():
    class Fake:
        size = 4

        def __init__(self, rank):
            self.rank = rank

    assert [rows(Fake(r), 8) for r in range(4)] == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)]


def test_agree_names_the_difference():
    def body(world):
        agree(world, "corpus digest", "abc" if world.rank == 0 else "abd")

    with pytest.raises(CharrnnError, match="rank 1 differs from rank 0 in corpus digest"):
        ThreadWorld.run(2, body)


def test_detect_without_launcher_is_local(monkeypatch):
    assert isinstance(detect("auto", {}), LocalWorld)
    assert isinstance(detect(False, {"PMI_SIZE": "2"}), LocalWorld)  # YAML reads a bare `off` as false
    assert isinstance(detect("off", {"PMI_SIZE": "2"}), LocalWorld)
    with pytest.raises(ConfigError, match="no MPI launcher started this process"):
        detect("mpi", {})
    assert launcher_size({"OMPI_COMM_WORLD_SIZE": "3"}) == 3 and launcher_size({}) == 1


def test_early_stopping_is_decided_once_for_all_ranks(tiny_config, tmp_path):
    config = distributed_config(tiny_config, tmp_path, steps=200, sample_every=2, patience=1)
    config["optimizer"] = {"type": "adam", "lr": 0.5}  # jumpy: some evaluation gets worse soon
    results = train_on(2, config)
    assert results[0][1].steps == results[1][1].steps < 200
    assert results[0][1].stopped_early and results[1][1].stopped_early


def test_an_error_on_one_rank_ends_the_run(tiny_config, tmp_path):
    class Breaks:
        def __init__(self):
            self.rank1 = threading.local()

        @charrnn.hookimpl
        def charrnn_checkpoint_saved(self, path, step):
            raise RuntimeError("disk on fire")

    config = distributed_config(tiny_config, tmp_path, save_every=5)

    def replica(world):
        Pipeline(config, plugins=[Breaks()]).train(io.StringIO(), world=world, interrupts=NoInterrupts())

    with pytest.raises(
        PluginFailure, match=r"\(charrnn_checkpoint_saved\) failed: RuntimeError: disk on fire"
    ):
        ThreadWorld.run(2, replica)


def test_a_corpus_missing_on_one_rank_fails_every_rank_with_its_message(tiny_config, tmp_path):
    config = distributed_config(tiny_config, tmp_path)

    def replica(world):
        mine = dict(config, corpus=dict(config["corpus"]))
        if world.rank == 1:
            mine["corpus"]["path"] = str(tmp_path / "missing.txt")
        Pipeline(mine).train(io.StringIO(), world=world, interrupts=NoInterrupts())

    with pytest.raises(SharedFailure, match=r"^rank 1: corpus file not found: .*missing.txt$") as info:
        ThreadWorld.run(2, replica)
    assert info.value.code == 2


def test_dropout_resumes_only_under_the_same_number_of_processes(tiny_config, tmp_path):
    config = distributed_config(tiny_config, tmp_path, "drop", steps=10)
    config["model"] = {"type": "rnn", "hidden_size": 12, "dtype": "float64", "num_layers": 2, "dropout": 0.2}
    train_on(2, config)
    assert "rng_ranks" in ckpt_io.load(tmp_path / "drop.npz").meta  # each rank's dropout stream is kept
    resumed = dict(config, train={**config["train"], "steps": 20, "resume": True})
    with pytest.raises(
        CharrnnError, match=r"trained by 2 process\(es\) with dropout.*resume it with 2 process"
    ):
        train_on(1, resumed)
    train_on(2, resumed)  # the same number of processes resumes
    assert ckpt_io.load(tmp_path / "drop.npz").meta["step"] == 20


class TermAt:
    """Interrupts that see SIGTERM (exit status 143) at the loop's `at`-th look, on one rank only."""

    stop = False

    def __init__(self, at: int) -> None:
        self.at, self.looks = at, 0

    @property
    def abort(self) -> int | None:
        self.looks += 1
        return 143 if self.looks >= self.at else None

    def __enter__(self) -> TermAt:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


@pytest.mark.parametrize(("steps", "step"), [(None, 7), (6, 6)])  # mid-run; during the last step's saves
def test_sigterm_on_one_rank_stops_every_rank_at_one_step_with_its_status(tiny_config, tmp_path, steps, step):
    from charrnn.interrupts import Aborted

    config = distributed_config(tiny_config, tmp_path, steps=steps, save_every=3)

    def replica(world):
        interrupts = TermAt(7) if world.rank == 1 else NoInterrupts()
        try:
            Pipeline(config).train(io.StringIO(), world=world, interrupts=interrupts)
        except Aborted as exc:
            return exc.code, str(exc)
        return None

    results = ThreadWorld.run(2, replica)
    assert (
        ckpt_io.load(tmp_path / "model.npz").meta["step"] == step
    )  # the step rank 1's request was shared at
    assert results == [(143, f"interrupted: saved step {step} to {tmp_path / 'model.npz'}")] * 2
