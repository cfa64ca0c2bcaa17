from __future__ import annotations

import math

import pytest

from charrnn import ConfigError, hookimpl, run_pipeline
from charrnn_plugins.schedules import Constant, Cosine, StepDecay
from conftest import FrozenPlugin, option_problem


def test_constant():
    assert [Constant()(s, 10) for s in range(3)] == [1.0, 1.0, 1.0]


def test_step_decay_like_char_rnn():
    sched = StepDecay(every=10, factor=0.97, start=20)
    assert sched(0, None) == 1.0 and sched(29, None) == 1.0
    assert sched(30, None) == pytest.approx(0.97) and sched(45, None) == pytest.approx(0.97**2)


def test_cosine_with_warmup():
    sched = Cosine(warmup_steps=4, min_factor=0.1)
    assert [sched(s, 105) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert sched(4, 105) == pytest.approx(1.0)
    assert sched(54, 105) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert sched(104, 105) == pytest.approx(0.1) and sched(500, 105) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="needs train.steps"):
        Cosine()(10, None)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"every": 0}, "every: must be >= 1, got 0"),
        ({"factor": 0}, "factor: must be in (0, 1], got 0"),
        ({"factor": 1.5}, "factor: must be in (0, 1], got 1.5"),
        ({"start": -1}, "start: must be >= 0, got -1"),
    ],
)
def test_step_decay_rejects_bad_options(bad, message):
    assert option_problem(StepDecay, "schedule", **bad) == message


def test_schedule_from_yaml_sets_the_optimizer_rate(tiny_config):
    tiny_config["schedule"] = {"type": "cosine", "warmup_steps": 2, "min_factor": 0.0}
    tiny_config["train"].update(steps=4, sample_every=1)
    lrs = [h["lr"] for h in run_pipeline(tiny_config).train.history]
    assert lrs == pytest.approx([0.05, 0.1, 0.1, 0.0])


def test_schedule_needs_an_optimizer_with_lr(tiny_config):
    tiny_config["optimizer"] = {"type": "frozen"}  # has no lr
    tiny_config["schedule"] = {"type": "step"}
    with pytest.raises(ConfigError, match="schedule 'step' needs an optimizer with an `lr` attribute"):
        run_pipeline(tiny_config, plugins=[FrozenPlugin()])


class CountingSchedule:
    def __init__(self, constant):
        self.constant, self.calls = constant, 0

    def __call__(self, step, total_steps):
        self.calls += 1
        return 1.0


@pytest.mark.parametrize("constant", [True, False])
def test_a_schedule_that_says_it_is_constant_is_not_called_per_step(tiny_config, constant):
    """`constant = True` (as the builtin `constant` has) lets the loop skip the call; others are called."""
    made = []

    class Plugin:
        @hookimpl
        def charrnn_schedule(self, register):
            register("counting", lambda: made.append(CountingSchedule(constant)) or made[-1])

    tiny_config["schedule"] = {"type": "counting"}
    tiny_config["train"]["steps"] = 5
    run_pipeline(tiny_config, plugins=[Plugin()])
    assert made[-1].calls == (0 if constant else 2 + 5)  # 2 start-up checks, then each step
    assert Constant.constant is True
