"""Learning-rate schedules: `constant`, `step` (char-rnn's decay) and `cosine` with warm-up."""

from __future__ import annotations

import math
from typing import Annotated

from charrnn import hookimpl
from charrnn.options import Range


class Constant:
    """The base learning rate throughout (`constant = True`: the loop need not call it)."""

    constant = True

    def __call__(self, step: int, total_steps: int | None) -> float:
        return 1.0


class StepDecay:
    """Multiply the rate by `factor` every `every` steps once `start` steps have passed.

    char-rnn decays by 0.97 per epoch after epoch 10; here the period is in steps.
    """

    def __init__(
        self,
        every: Annotated[int, Range(ge=1), "steps between two decays"] = 1000,
        factor: Annotated[float, Range(gt=0, le=1), "what each decay multiplies the rate by"] = 0.97,
        start: Annotated[int, Range(ge=0), "steps before the first decay"] = 0,
    ) -> None:
        self.every, self.factor, self.start = every, factor, start

    def __call__(self, step: int, total_steps: int | None) -> float:
        return self.factor ** (max(0, step - self.start) // self.every)


class Cosine:
    """Linear warm-up over `warmup_steps`, then a cosine from 1 down to `min_factor` at the last step.

    The end is `total_steps` if given, else the run's `train.steps`; training until Ctrl+C
    (`steps: null`) needs `total_steps`.
    """

    def __init__(
        self,
        warmup_steps: Annotated[int, Range(ge=0), "steps of linear warm-up from 0 to the full rate"] = 0,
        min_factor: Annotated[float, Range(ge=0, le=1), "the factor the cosine ends at"] = 0.1,
        total_steps: Annotated[
            int | None, Range(ge=1), "the step the cosine ends at; null: train.steps"
        ] = None,
    ) -> None:
        self.warmup, self.min_factor, self.total = warmup_steps, min_factor, total_steps

    def __call__(self, step: int, total_steps: int | None) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        total = self.total or total_steps
        if total is None:
            raise ValueError("the cosine schedule needs train.steps or its own total_steps")
        progress = min(1.0, (step - self.warmup) / max(1, total - 1 - self.warmup))  # 1 at the last step
        return self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * progress))


@hookimpl
def charrnn_schedule(register):
    register("constant", Constant)
    register("step", StepDecay)
    register("cosine", Cosine)
