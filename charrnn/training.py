"""The train stage: assembled components and a loaded corpus in, a trained model out.

It builds the loop's pieces from the pipeline's `train` section (callbacks, gradient
transforms, the world's rows of the batch), restores a run to resume, and runs the loop.
"""

from __future__ import annotations

import math
import numbers
import os
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from charrnn import checkpoint as ckpt_io
from charrnn.assembly import Assembly
from charrnn.callbacks import Checkpointer, Console, Evaluator, ProgressBar, Reporter, RunHooks
from charrnn.data import Data
from charrnn.errors import CheckpointError, ConfigError, CorpusError
from charrnn.files import RunFiles
from charrnn.interrupts import Aborted, Interrupts, SignalInterrupts
from charrnn.loop import Batches, Callback, Loop, TrainResult, TrainState
from charrnn.memory import check as check_memory
from charrnn.plugins import call_hook
from charrnn.threads import for_training
from charrnn.transforms import allreduce_mean, chain, clipping
from charrnn.types import Model, Schedule
from charrnn.world import World, agree, rows, together


def check_lengths(data: Data, train: dict[str, Any]) -> None:
    """The text must fill one batch of streams, and the validation split one chunk."""
    need = train["batch_size"] * train["seq_length"] + 1
    if len(data.train_ids) < need:
        raise CorpusError(
            f"training text of {data.name} has {len(data.train_ids)} characters; batch_size x seq_length + 1 = "
            f"{need} are needed (use a longer text or a smaller batch_size/seq_length)"
        )
    if data.val_ids is not None and len(data.val_ids) < train["seq_length"] + 1:
        raise CorpusError(
            f"validation split of {data.name} has {len(data.val_ids)} characters; seq_length + 1 = "
            f"{train['seq_length'] + 1} are needed (raise corpus.val_fraction or set it to 0)"
        )


def check_output(path: str, key: str) -> None:
    """Make sure a file the run writes can be written, before the first step rather than after the last.

    Creates the parent folders and creates and removes the file's `.tmp` sibling, so a
    read-only folder, a folder in the file's place or an over-long name shows up now. Bad
    paths are a ConfigError naming the setting `key`.
    """
    if "\0" in path:
        raise ConfigError(f"{key}: the path {path!r} contains a NUL byte")
    if path.endswith(("/", os.sep)) or Path(path).name in ("", ".", ".."):
        raise ConfigError(f"{key}: {path!r} names a folder; give a file path such as runs/x/model.npz")
    target = Path(path)
    probe = target.with_name(target.name + ".tmp")
    try:
        if target.is_dir():
            raise ConfigError(f"{key}: {path} is an existing folder; give a file path")
        target.parent.mkdir(parents=True, exist_ok=True)
        existed = probe.exists()
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT, 0o644))
        if not existed:
            probe.unlink()
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename and str(exc.filename) not in (path, str(probe)) else ""
        raise ConfigError(f"{key}: cannot write {path}: {exc.strerror or exc}{where}") from None


FAR_STEP = 10**9  # training until Ctrl+C, the start-up check asks the schedule about a step this far on


def check_schedule(schedule: Schedule, total_steps: int | None, start_step: int = 0) -> None:
    """Ask a schedule for its first and last factors at start-up, so it cannot fail hours into a run.

    The last step is `total_steps - 1`, or FAR_STEP when training until Ctrl+C (beyond any
    warm-up). Raises what the schedule raises, or ValueError for a factor that is not a
    finite number >= 0.
    """
    last = total_steps - 1 if total_steps is not None else FAR_STEP
    for step in sorted({start_step, max(start_step, last)}):
        factor = schedule(step, total_steps)
        if (
            isinstance(factor, bool)
            or not isinstance(factor, numbers.Real)
            or not math.isfinite(factor)
            or factor < 0
        ):
            raise ValueError(f"gave the factor {factor!r} for step {step}; a finite number >= 0 is needed")


def build_schedule(assembly: Assembly, optimizer: Any, steps: int | None) -> Schedule | None:
    """The schedule, or None when it is constant (nothing to do per step); checked once here."""
    schedule = assembly.schedule()
    config = assembly.config
    if getattr(schedule, "constant", False):
        return None
    if not isinstance(getattr(optimizer, "lr", None), (int, float)):
        raise ConfigError(
            f"schedule {config['schedule']['type']!r} needs an optimizer with an `lr` attribute; "
            f"optimizer {config['optimizer']['type']!r} has none"
        )
    try:
        check_schedule(schedule, steps)  # a schedule that cannot work with these settings says so now
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{assembly.locate('schedule')} ({config['schedule']['type']}): {exc}") from None
    return schedule


def start_path(assembly: Assembly) -> str | None:
    """The checkpoint a run starts from: `init_from`'s or the one to resume, else None."""
    t = assembly.config["train"]
    if t["init_from"] and t["resume"]:
        raise ConfigError(
            "train.init_from and train.resume exclude each other: resume continues a run exactly, "
            "init_from starts a new one from a checkpoint's weights"
        )
    return t["init_from"] or (t["checkpoint"] if t["resume"] is True else t["resume"]) or None


def read_start(assembly: Assembly, data: Data, model: Model, world: World) -> ckpt_io.Checkpoint | None:
    """Rank 0 reads and checks the checkpoint to start from (None elsewhere and for a fresh run).

    Its metadata is compared with this run, and its arrays' declared shapes with what the
    model and optimizer need, before any array is read.
    """
    config, t = assembly.config, assembly.config["train"]
    path = start_path(assembly)
    if path is None or world.rank != 0:
        return None
    if t["resume"] and not Path(path).exists():
        raise CheckpointError(f"train.resume: no checkpoint to resume from at {path}")
    params = ckpt_io.specs(model.params, "f")

    def expect(meta: dict[str, Any]) -> dict[str, Any]:
        if t["init_from"]:
            ckpt_io.check_init_from(meta, config, data.corpus, path)
            return {"param": params}
        ckpt_io.check_resume(meta, config, data.corpus, data.digest, path)
        saved_world = int(meta.get("world_size", 1))
        dropout = any(
            float(v) > 0 for k, v in config["model"].items() if "dropout" in k and isinstance(v, (int, float))
        )
        if dropout and saved_world != world.size:
            raise CheckpointError(
                f"cannot resume: {path} was trained by {saved_world} process(es) with dropout, whose random "
                f"streams are per process; resume it with {saved_world} process(es)"
            )
        return {
            "param": params,
            "optim": optimizer_state_specs(assembly, model),
            "state": ckpt_io.specs(model.init_state(t["batch_size"]), "f"),
        }

    return ckpt_io.load(path, expect)


def optimizer_state_specs(assembly: Assembly, model: Model) -> dict[str, Any]:
    """The names, shapes and dtypes of the state this run's optimizer keeps for `model`.

    Learned from a throwaway optimizer taking one zero-gradient step on copies of the
    parameters, so it holds for any optimizer plugin that fulfils the protocol.
    """
    probe = assembly.optimizer()
    params = {k: np.array(v) for k, v in model.params.items()}
    with np.errstate(all="ignore"):
        probe.step(params, {k: np.zeros_like(v) for k, v in params.items()})
    return ckpt_io.specs(probe.state_dict())


def apply_start(
    assembly: Assembly, saved: ckpt_io.Checkpoint | None, model: Model, optimizer: Any, world: World
) -> TrainState:
    """Load the weights of `saved` (and, to resume, the optimizer state and this rank's rows of
    the carried state); a fresh run starts from a fresh state."""
    t = assembly.config["train"]
    path = start_path(assembly) or ""
    if saved is None:
        return TrainState()
    ckpt_io.load_params(model, saved, path)
    if t["init_from"]:
        return TrainState()
    meta = saved.meta
    try:
        optimizer.load_state_dict(saved.optim)
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"cannot resume: the optimizer state in {path} does not fit optimizer "
            f"{assembly.config['optimizer']['type']!r}: {exc}"
        ) from None
    mine = rows(world, t["batch_size"])
    rng = meta["rng"]
    if world.size > 1 and int(meta.get("world_size", 1)) == world.size:
        rng = (meta.get("rng_ranks") or [rng] * world.size)[world.rank]
    return TrainState(
        meta["step"],
        meta["data_position"],
        meta.get("smooth_loss"),
        rng,
        {k: v[mine] for k, v in saved.state.items()},
        meta.get("best_val_loss"),
        meta.get("bad_evals", 0),
    )


def start(loop: Loop, assembly: Assembly, data: Data, saved: ckpt_io.Checkpoint | None) -> TrainState:
    """Make every rank start alike: the same pipeline and corpus, rank 0's checkpoint or weights.

    Collectives only outside `together` blocks: a rank that failed inside one would answer a
    different collective than the others are in.
    """
    world, config = loop.world, assembly.config
    if world.size > 1:
        for section, value in config.items():
            agree(world, f"the pipeline's {section!r}", value, lambda v: repr(v)[:120])
        agree(world, "the corpus (SHA-256 of the training text)", data.digest)
        agree(world, "the vocabulary", data.corpus.vocab, lambda v: f"{len(v)} symbols")
        saved = world.broadcast(saved)
        if saved is None:  # a fresh run: every replica starts from rank 0's weights
            weights = world.broadcast({k: np.array(v) for k, v in loop.model.params.items()})
            for key, value in weights.items():
                loop.model.params[key][...] = value
    with together(world):
        return apply_start(assembly, saved, loop.model, loop.optimizer, world)


def run(loop: Loop, state: TrainState) -> TrainResult:
    """Run a prepared loop; a second Ctrl+C or SIGTERM ends it with a message naming the step the
    checkpoint holds."""
    checkpointer = next((cb for cb in loop.callbacks if isinstance(cb, Checkpointer)), None)
    checkpoint = checkpointer.path if checkpointer is not None else None
    try:
        result = loop.run(state)
    except Aborted as exc:
        if checkpointer is None or not checkpointer.saved_at:
            raise Aborted(exc.code, f"interrupted at step {loop.state.step}; nothing was saved") from None
        step = checkpointer.saved_at[-1]
        raise Aborted(exc.code, f"interrupted: saved step {step} to {checkpoint}") from None
    if result.stopped_early and loop.control.reason == "interrupted" and loop.world.rank == 0:
        print(f"stopped at step {result.steps}; saved {checkpoint}", file=loop.stderr, flush=True)
    return result


def prepare(
    assembly: Assembly,
    data: Data,
    *,
    world: World,
    interrupts: Interrupts | None = None,
    stderr: TextIO | None = None,
    callbacks: tuple[Callback, ...] = (),
    choose_threads: bool = True,
) -> tuple[Loop, ckpt_io.Checkpoint | None]:
    """The loop the pipeline's `train` section describes, and (on rank 0) the checkpoint it starts
    from; only this process's work, no collective (see `start`)."""
    config, t = assembly.config, assembly.config["train"]
    check_lengths(data, t)
    rows(world, t["batch_size"])  # divisible by the number of processes
    model = assembly.model(len(data.corpus.vocab))
    estimate = getattr(model, "memory_bytes", None)
    if callable(estimate):  # the factory checked its own size; now with the training batch's work arrays
        B, T = t["batch_size"] // world.size, t["seq_length"]
        check_memory(
            estimate(B, T),
            f"training model {config['model']['type']!r} with train.batch_size={t['batch_size']} "
            f"and train.seq_length={T}",
            "parameters, gradients, optimizer state, activations",
        )
    optimizer = assembly.optimizer()
    schedule = build_schedule(assembly, optimizer, t["steps"])
    sampler = assembly.sampler(data.corpus.vocab)
    saved = read_start(assembly, data, model, world)

    console = Console(stderr)
    lead = world.rank == 0
    files = RunFiles(t["checkpoint"])
    best_path = str(files.best) if t["keep_best"] and data.val_ids is not None else None
    metrics_path = str(files.metrics) if t["metrics"] else None
    plot_path = str(files.plot) if t["plot"] else None
    if lead:
        for path, key in (
            (best_path, "train.keep_best"),
            (metrics_path, "train.metrics"),
            (plot_path, "train.plot"),
        ):
            if path is not None:
                check_output(path, key)
    evaluator = None
    if data.val_ids is not None:
        evaluator = Evaluator(
            data.val_ids,
            t["eval_every"] or t["sample_every"],
            t["batch_size"],
            t["seq_length"],
            patience=t["patience"],
            log=console.log,
        )
    checkpointer = Checkpointer(
        t["checkpoint"],
        ckpt_io.training_meta(config, data.corpus, data.meta()),
        every=t["save_every"],
        saved=lambda path, step: call_hook(assembly.pm, "charrnn_checkpoint_saved", path=path, step=step),
        log=console.log,
    )
    if evaluator is not None and best_path is not None:
        evaluator.save_best = lambda loop: checkpointer.save(loop, best_path)
    reporter = Reporter(
        t["sample_every"],
        console,
        evaluator=evaluator,
        sampler=sampler,
        vocab=data.corpus,
        sample_length=t["sample_length"],
        metrics_path=metrics_path if lead else None,
        report=lambda step, metrics: call_hook(
            assembly.pm, "charrnn_train_report", step=step, metrics=metrics
        ),
        show_lr=schedule is not None,
        plot_path=plot_path if lead else None,
        name=files.name,
    )
    chooser = for_training(console.log if lead else print_nothing) if choose_threads else None
    chain_ = [chooser] if chooser is not None else []
    chain_ += [ProgressBar(console)] if lead else []
    chain_ += [cb for cb in (evaluator, checkpointer) if cb is not None]
    chain_ += [reporter] if lead else []
    if lead:
        chain_.append(
            RunHooks(lambda name, **kw: call_hook(assembly.pm, name, **kw), config, t["checkpoint"])
        )
    loop = Loop(
        model,
        optimizer,
        Batches(data.train_ids, t["batch_size"], t["seq_length"], world),
        steps=t["steps"],
        seed=config["seed"],
        transform=chain(
            allreduce_mean(world) if world.size > 1 else None,  # clipping after averaging, as in one process
            clipping(getattr(optimizer, "clip", None), getattr(optimizer, "clip_norm", None)),
        ),
        schedule=schedule,
        callbacks=[*chain_, *callbacks],
        world=world,
        interrupts=interrupts
        if interrupts is not None
        else SignalInterrupts(console.log if lead else print_nothing),
        labels={kind: assembly.label(kind) for kind in ("model", "optimizer", "schedule", "sampler")},
    )
    loop.stderr = console.stream
    return loop, saved


def print_nothing(message: str) -> None:
    """The log of ranks other than 0: their messages would repeat rank 0's."""
