"""BLAS threads chosen while training (`charrnn.threads`) and the tuning switches (`charrnn.tuning`)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from charrnn import machine, threads, tuning
from charrnn.threads import ThreadChooser
from conftest import ROOT


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


LOAD = {"others": 0.0}  # other processes' share of the CPUs, as the chooser's probe of /proc/stat sees it


def run(chooser: ThreadChooser, clock: Clock, step_time, steps: int) -> None:
    """`steps` training steps whose duration is `step_time(threads now)`."""
    loop = SimpleNamespace(state=SimpleNamespace(step=0))
    LOAD["others"] = 0.5 if step_time is shared else 0.0
    for _ in range(steps):
        clock.now += step_time(chooser.current)
        loop.state.step += 1
        chooser.on_step_end(loop)


def chooser(**kw):
    clock, calls, lines = Clock(), [], []
    c = ThreadChooser(
        2,
        clock=clock,
        setter=calls.append,
        log=lines.append,
        window=0.5,
        min_steps=3,
        others=lambda: LOAD["others"],
        **kw,
    )
    c.on_train_begin(None)
    return c, clock, calls, lines


def quiet(n):
    return 0.010 if n == 2 else 0.014  # two threads faster on a quiet machine


def shared(n):
    return 0.060 if n == 2 else 0.020  # one core busy: two threads wait on each other


def test_a_quiet_machine_keeps_all_threads_and_never_probes():
    c, clock, calls, lines = chooser()
    run(c, clock, quiet, 2000)  # 20 s
    assert c.current == 2 and calls == [] and c.switches == [] and lines == []


def test_without_a_load_reading_the_first_window_probes_once():
    c, clock, calls, lines = chooser()
    c.others = lambda: None  # no /proc/stat
    run(c, clock, quiet, 2000)
    assert c.current == 2 and calls == [1, 2] and lines == []


def test_a_busy_core_moves_training_to_one_thread_and_back_when_it_ends():
    c, clock, calls, lines = chooser()
    run(c, clock, quiet, 300)
    run(c, clock, shared, 300)
    assert c.current == 1 or c.probing == 1  # on one thread, or probing two from it
    assert c.switches[-1][1:] == (2, 1)
    assert "BLAS on 1 thread" in lines[-1] and "another process" in lines[-1]
    run(c, clock, quiet, 1500)  # the other process ended: the periodic probe finds two faster
    assert c.current == 2
    assert c.switches[-1][1:] == (1, 2)
    assert "back on 2 threads" in lines[-1]


def test_a_machine_shared_from_the_start_is_found_by_the_first_probe():
    c, clock, calls, _ = chooser()
    run(c, clock, shared, 200)
    assert c.current == 1 and calls[0] == 1


def test_while_shared_one_thread_stays_between_probes():
    c, clock, calls, _ = chooser()
    run(c, clock, shared, 2000)
    assert c.current == 1
    assert calls.count(2) == calls.count(1) - 1  # each probe of two threads went back to one


def test_training_ends_on_the_thread_count_it_started_with():
    c, clock, calls, _ = chooser()
    run(c, clock, shared, 200)
    c.on_train_end(None)
    assert calls[-1] == 2 and c.current == 2


def test_threadpoolctl_is_a_runtime_dependency_so_the_chooser_works_after_a_plain_install():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert any(dep.startswith("threadpoolctl") for dep in project["dependencies"])
    extras = project["optional-dependencies"]
    assert not any(dep.startswith("threadpoolctl") for deps in extras.values() for dep in deps)


def test_no_chooser_where_threadpoolctl_finds_no_blas(monkeypatch):
    for name in threads.THREAD_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CHARRNN_TUNING", "blas_threads")
    monkeypatch.setattr(threads, "blas_threads", lambda: None)
    assert threads.for_training(print) is None


def test_no_chooser_when_the_user_chose_a_thread_count(monkeypatch):
    monkeypatch.setenv("CHARRNN_TUNING", "on")
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")
    assert threads.for_training(print) is None
    monkeypatch.delenv("OPENBLAS_NUM_THREADS")
    monkeypatch.setenv("CHARRNN_TUNING", "off")
    assert threads.for_training(print) is None


@pytest.fixture
def blas_restored(monkeypatch):
    """No user pin in the environment; NumPy's BLAS threads as they were afterwards."""
    for name in threads.THREAD_VARS:
        monkeypatch.delenv(name, raising=False)
    before = machine.blas_threads()
    yield
    machine.set_blas_threads(before)


def test_the_chooser_sets_numpys_blas_threads(monkeypatch, blas_restored):
    monkeypatch.setenv("CHARRNN_TUNING", "blas_threads")
    machine.set_blas_threads(2)
    c = threads.for_training(print)
    assert c is not None and c.many == 2
    c._set(1)
    assert machine.blas_threads() == 1
    c.on_train_end(None)
    assert machine.blas_threads() == 2


def test_a_server_runs_on_one_thread_unless_the_user_chose(blas_restored):
    machine.set_blas_threads(2)
    assert threads.for_serving({"OPENBLAS_NUM_THREADS": "2"}) is None
    assert machine.blas_threads() == 2
    assert threads.for_serving({}) == 1
    assert machine.blas_threads() == 1


def test_an_mpi_rank_gets_its_share_of_the_node_unless_the_user_chose(blas_restored, monkeypatch):
    monkeypatch.setattr(threads, "usable_cpus", lambda: 8)
    machine.set_blas_threads(2)
    assert threads.for_mpi_rank({"OMP_NUM_THREADS": "3", "MPI_LOCALNRANKS": "2"}) is None
    assert machine.blas_threads() == 2
    assert threads.for_mpi_rank({"MPI_LOCALNRANKS": "8"}) == 1
    assert machine.blas_threads() == 1
    assert threads.for_mpi_rank({"MPI_LOCALNRANKS": "4"}) == 2
    assert threads.for_mpi_rank({"MPI_LOCALNRANKS": "16"}) == 1  # never below one


def test_a_child_process_is_pinned_as_a_user_would_pin_it():
    env = threads.environment(3)
    assert set(env) == set(threads.THREAD_VARS) and set(env.values()) == {"3"}
    assert threads.user_pinned(env) and not threads.user_pinned({})


def test_a_training_run_has_the_chooser_only_when_tuning_allows(monkeypatch, tiny_config):
    import io

    import charrnn

    for name in threads.THREAD_VARS:
        monkeypatch.delenv(name, raising=False)
    found = []
    original = ThreadChooser.on_train_begin
    monkeypatch.setattr(
        ThreadChooser, "on_train_begin", lambda self, loop: (found.append(self), original(self, loop))
    )
    for setting in ("off", "on"):
        monkeypatch.setenv("CHARRNN_TUNING", setting)
        found.clear()
        tiny_config["train"]["steps"] = 3
        charrnn.run_pipeline(tiny_config, stdout=io.StringIO(), stderr=io.StringIO())
        assert bool(found) == (setting == "on")  # two CPUs or more here


@pytest.mark.parametrize(
    ("setting", "pad", "chooser"),
    [("off", False, False), ("on", True, True), ("pad_gemv", True, False), ("-blas_threads", None, False)],
)
def test_tuning_switches(monkeypatch, setting, pad, chooser):
    monkeypatch.setenv("CHARRNN_TUNING", setting)
    if pad is not None:
        assert tuning.enabled("pad_gemv") is pad
    assert tuning.enabled("blas_threads") is chooser
    with pytest.raises(ValueError, match="unknown tuning trick"):
        tuning.enabled("warp_drive")


def test_tricks_follow_the_table_of_measured_machines(monkeypatch):
    monkeypatch.delenv("CHARRNN_TUNING", raising=False)
    classes = ((("AuthenticAMD", 26, 2), True), (("AuthenticAMD", 25, 1), False), (None, False))
    for cls, pad in classes:
        monkeypatch.setattr(tuning, "machine_class", lambda cls=cls: cls)
        assert tuning.enabled("pad_gemv") is pad  # measured to pay on Zen 5 (26) only
        assert tuning.enabled("blas_threads")  # measures itself: on everywhere


def test_a_noisy_quiet_machine_does_not_move_threads():
    """Step times that wander by 15% (a shared host) and a slow report step now and then."""
    import numpy as np

    noise = np.random.default_rng(0)
    step = iter(range(10**6))

    def wandering(n):
        slow = 20 if next(step) % 97 == 0 else 1  # a report, a checkpoint
        return slow * quiet(n) * noise.uniform(0.85, 1.15) * (1.0 + 0.1 * np.sin(clock.now))

    c, clock, calls, lines = chooser()
    run(c, clock, wandering, 5000)
    assert c.current == 2 and c.switches == [] and lines == []


@pytest.mark.parametrize("setting", ["pad", "pad_gemv,warp", "-blas"])
def test_a_misspelt_tuning_setting_is_a_one_line_error(monkeypatch, setting):
    from charrnn.errors import CharrnnError

    monkeypatch.setenv("CHARRNN_TUNING", setting)
    with pytest.raises(CharrnnError, match="CHARRNN_TUNING names an unknown trick"):
        tuning.enabled("pad_gemv")


def test_a_misspelt_tuning_setting_stops_the_cli_with_status_2(tmp_path, cli_env):
    import subprocess
    import sys

    env = dict(cli_env, CHARRNN_TUNING="fast")
    out = subprocess.run(
        [sys.executable, "-m", "charrnn", "run", "configs/default.yaml", "--set", "train.steps=2",
         "--set", f"train.checkpoint={tmp_path / 'm.npz'}", "--set", "stages=[train]"],
        capture_output=True, text=True, env=env, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 2
    assert (
        out.stderr.strip().splitlines()[-1].startswith("error: CHARRNN_TUNING names an unknown trick 'fast'")
    )
    assert "Traceback" not in out.stderr
