"""Learning-rate schedules: `constant`, `step` (char-rnn's decay) and `cosine` with warm-up."""

from __future__ import annotations

import math

from charrnn import hookimpl


class Constant:
    """The base learning rate throughout (`constant = True`: the loop need not call it)."""

    constant = True

    def __call__(self, step: int, total_steps: int | None) -> float:
        return 1.0


class StepDecay:
    """Multiply the rate by `factor` every `every` steps once `start` steps have passed.

    char-rnn decays by 0.97 per epoch after epoch 10; here the period is in steps.
    """

    def __init__(self, every: int = 1000, factor: float = 0.97, start: int = 0) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}")
        if not 0 < factor <= 1:
            raise ValueError(f"factor must be in (0, 1], got {factor!r}")
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise ValueError(f"start must be an integer >= 0, got {start!r}")
        self.every, self.factor, self.start = every, factor, start

    def __call__(self, step: int, total_steps: int | None) -> float:
        return self.factor ** (max(0, step - self.start) // self.every)


class Cosine:
    """Linear warm-up over `warmup_steps`, then a cosine from 1 down to `min_factor` at the last step.

    The end is `total_steps` if given, else the run's `train.steps`; training until Ctrl+C
    (`steps: null`) needs `total_steps`.
    """

    def __init__(
        self, warmup_steps: int = 0, min_factor: float = 0.1, total_steps: int | None = None
    ) -> None:
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
        if not 0 <= min_factor <= 1:
            raise ValueError(f"min_factor must be in [0, 1], got {min_factor!r}")
        if total_steps is not None and (isinstance(total_steps, bool) or total_steps < 1):
            raise ValueError(f"total_steps must be a positive integer or null, got {total_steps!r}")
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
