"""The hooks charrnn plugins implement: the one place they are declared.

Components are contributed through collect-all *registration hooks*: each receives a
`register(name, factory)` callable and registers zero or more named factories. A YAML
section such as `sampler: {type: top_k, k: 5}` then picks a factory by name and the
pipeline calls it once with the remaining options (checked against the factory's
signature). Hooks build, loops call: no hook is called per training step or per character.

Event hooks (`charrnn_train_report`, `charrnn_checkpoint_saved`) are called at report and
checkpoint time only, off the hot path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

PROJECT = "charrnn"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

Register = Callable[[str, Callable[..., Any]], None]

OPTIONS_NOTE = """Options are checked before the factory is called, against its signature: an annotation
        such as ``Annotated[float, Range(gt=0, le=100), "help"]`` (``charrnn.options``) states the
        type, the range and the one-line help that the reference shows; an unannotated parameter
        takes any value, and a parameter without a default is required."""


@hookspec
def charrnn_corpus_loader(register: Register) -> None:
    """Register corpus loaders. Collect-all: every plugin's implementation is called once.

    :param register: call ``register(name, loader)``; ``loader(**options)`` is called with the
        YAML ``corpus`` section minus ``type`` and ``val_fraction`` (the pipeline splits off the
        validation text for every loader) and must return a :class:`charrnn.Corpus`. Raise
        :class:`charrnn.CorpusError` for a missing or unreadable source.
    """


@hookspec
def charrnn_model(register: Register) -> None:
    """Register model factories. Collect-all.

    :param register: call ``register(name, factory)``; the pipeline calls
        ``factory(vocab_size=V, rng=numpy.random.Generator, **options)`` with the YAML ``model``
        section minus ``type``. The result fulfils :class:`charrnn.Model`: ``params``,
        ``init_state``, ``train_step`` (forward, loss and backward on a (B, T) minibatch with the
        hidden state carried in and out), ``loss`` (forward only) and ``step`` (one time step for
        k streams, used to prime and to sample). Optional: ``stepper(state)``, a faster ``step``
        for generation loops (see :meth:`charrnn.Model.step`), and
        ``matmul_shapes(batch_size, seq_length)``, the matrix products of one training step and
        of one generation step as ``(m, k, n, count)`` tuples, from which ``charrnn bench``
        computes the model's FLOPs per character and its bound on the machine at hand (without
        it the bench reports the bound as unknown). Packing ``params`` and the
        gradients with :func:`charrnn.optim.pack` lets the builtin optimizers update them in a
        few NumPy calls. Raise ``ValueError`` for bad options.
    """


@hookspec
def charrnn_optimizer(register: Register) -> None:
    """Register optimizer factories. Collect-all.

    :param register: call ``register(name, factory)``; ``factory(**options)`` receives the YAML
        ``optimizer`` section minus ``type`` and returns a :class:`charrnn.Optimizer`, whose
        ``step(params, grads)`` updates the arrays in place and whose ``state_dict`` holds
        everything needed to resume exactly. Raise ``ValueError`` for bad options. An optimizer
        with ``clip``/``clip_norm`` attributes (as ``charrnn.optim.BaseOptimizer`` has) gets its
        gradients clipped by the training loop before ``step``, as a gradient transform; ``step``
        itself must not clip.
    """


@hookspec
def charrnn_sampler(register: Register) -> None:
    """Register samplers. Collect-all.

    :param register: call ``register(name, factory)``; ``factory(**options)`` receives the YAML
        ``sampler`` section minus ``type`` and returns a callable
        ``sampler(logits, rng) -> ids`` taking logits of shape (k, V) for k parallel streams and a
        ``numpy.random.Generator``, returning k ids (a new array each call: the loop keeps
        them; the logits are a buffer the model reuses). Optional methods, called when present:
        ``bind(vocab)`` once with the vocabulary; ``reset(k)`` at the start of each generation;
        ``observe(ids)`` with every (k,) ids of the text, seed and generated (for repetition
        penalties); ``search(model, state, last_ids, num_chars, rng) -> (k, num_chars) ids``
        takes over the whole generation, for strategies that need the model (beam search); a
        ``search`` that also takes ``cancelled`` gets a callable to ask between steps whether the
        caller is gone (a client disconnected), and may then stop and return None;
        ``perturb(rng, k, V, steps) -> (steps, k, V) noise or None``: the next ``steps`` calls
        would return ``argmax(logits + noise[t])`` (Gumbel-max sampling, greedy), so a caller
        running many samplers on one batch (the server) takes one argmax for all of them.
    """


@hookspec
def charrnn_schedule(register: Register) -> None:
    """Register learning-rate schedules. Collect-all.

    :param register: call ``register(name, factory)``; ``factory(**options)`` receives the YAML
        ``schedule`` section minus ``type`` and returns a callable ``schedule(step, total_steps)``
        giving the factor by which the optimizer's base ``lr`` is multiplied for step ``step``
        (0 for the first step); ``total_steps`` is ``train.steps`` (None when training until
        Ctrl+C). The training loop sets ``optimizer.lr`` before every step, so a schedule other
        than ``constant`` needs an optimizer with an ``lr`` attribute.
    """


@hookspec
def charrnn_section(register: Register) -> None:
    """Register pipeline sections that a plugin owns. Collect-all.

    :param register: call ``register(name, description)``; ``description`` is a dataclass (or any
        callable whose signature describes the keys, see :mod:`charrnn.options`). A pipeline file
        may then hold a top-level ``name:`` mapping, checked against it like the pipeline's own
        sections (unknown keys, types, ranges, with the YAML line), with its defaults filled in;
        the resolved section reaches the plugin in the ``config`` of ``charrnn_train_start``.
        A name the pipeline or another plugin already uses is an error naming both.
    """


@hookspec
def charrnn_command(register: Register) -> None:
    """Register subcommands of the `charrnn` command line. Collect-all.

    :param register: call ``register(name, factory)``; ``factory()`` returns a command: an
        object with ``help`` (one line), ``add_arguments(parser)`` (an ``argparse`` parser of
        its own) and ``__call__(args, out) -> int`` (the exit status; ``out`` writes UTF-8 to
        stdout). Raise :class:`charrnn.CharrnnError` for the user's mistakes: the CLI prints
        them as one line with status 2. ``charrnn.commands.add_set`` and ``add_plugin`` add the
        usual ``--set`` and ``--plugin`` options. The builtin ``run``, ``generate``, ``bench``,
        ``gradcheck``, ``plot`` and ``plugins`` are registered this way (``charrnn.commands``).
    """


@hookspec
def charrnn_train_start(config: dict[str, Any], checkpoint: str, step: int) -> None:
    """Called once when a training run starts, before its first step (on rank 0 only).

    For loggers (TensorBoard, a sweep's reporter): open what the run writes to here.

    :param config: the resolved pipeline (every default filled in), as checkpoints store it.
    :param checkpoint: the path of the run's checkpoint (``train.checkpoint``).
    :param step: the step the run starts from (0, or the checkpoint's step when resuming).
    """


@hookspec
def charrnn_train_end(checkpoint: str, step: int, metrics: dict[str, Any], reason: str) -> None:
    """Called once when a training run ends, after its final checkpoint and report (rank 0 only).

    :param checkpoint: the path of the run's checkpoint, written by then.
    :param step: the last step trained.
    :param metrics: ``train_loss``, ``val_loss`` (last evaluation or None), ``best_val_loss``.
    :param reason: ``"steps"`` (train.steps reached), ``"interrupted"`` (Ctrl+C),
        ``"early stopping"``, or ``"error"`` (then the error is raised after this call).
    """


@hookspec
def charrnn_train_report(step: int, metrics: dict[str, Any]) -> None:
    """Called at each training report, every implementation once, in the training process.

    Reports come every ``train.sample_every`` steps, every ``train.eval_every`` steps (with a
    validation split), and once when training ends (at ``train.steps``, Ctrl+C or early
    stopping) unless a report fell on that step already. A checkpoint due at the same step
    (the final one, ``save_every``, early stopping) is written *before* the report, so a
    caller that ends the run at a report (a tuner such as Ray Tune's ASHA) keeps that model.
    Raising from an implementation stops training; the last good state is saved first.

    :param step: the number of training steps completed.
    :param metrics: ``step`` (as above), ``train_loss`` (smoothed training loss, nats/char),
        ``val_loss`` (loss over the whole validation split, nats/char; None when this report
        did not evaluate or there is no split), ``lr`` (the optimizer's learning rate, None
        if it has no ``lr``), ``chars_per_sec`` (training speed since the previous report) and
        ``sample`` (a ``train.sample_length`` generated text, or None). Every number is
        finite. Return nothing.
    """


@hookspec
def charrnn_checkpoint_saved(path: str, step: int) -> None:
    """Called after a checkpoint has been written atomically to ``path`` at ``step``."""


@hookspec
def charrnn_exporter(register: Register) -> None:
    """Register exporters of model types, for ``charrnn export``. Collect-all.

    Export is per model type: a model plugin (or a plugin for someone else's model) says how a
    trained model of that type is written out. The formats themselves (the self-contained web
    page, ONNX) are one writer each, shared by every model type.

    :param register: call ``register(model_type, exporter)`` with a model type registered through
        :func:`charrnn_model`; ``exporter(model)`` receives a model of that type with its trained
        ``params`` and returns a :class:`charrnn.types.ExportNetwork`: the model as stacked
        recurrent layers in the conventions of ONNX's ``RNN``, ``LSTM`` and ``GRU`` operators,
        which each format runs. Raise ``ValueError`` when a model of this type cannot be
        expressed that way (an option the layers have no place for). A model type that no
        plugin registers an exporter for cannot be exported.
    """
