"""The `charrnn` command: a thin layer over the Python API.

User errors print one line, `error: ...`, on stderr and exit with status 2. A failing plugin,
an unwritable stdout or a bug print one line too and exit with status 1 (`CHARRNN_DEBUG=1`
shows the traceback of a failure). The heavy modules are imported inside `main`, so a Ctrl+C
while they load is handled like any other.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
import warnings
from collections.abc import Sequence
from typing import NoReturn

from charrnn import __version__
from charrnn.errors import CharrnnError, PluginFailure

DEBUG_VARIABLE = "CHARRNN_DEBUG"


class OutputError(Exception):
    """stdout is closed or a write to it failed (a full disk, say): nothing more can be shown."""


class _Stdout:
    """sys.stdout as the commands see it: UTF-8 text, and a failed write is an `OutputError`.

    A broken pipe (`charrnn ... | head`) stays a `BrokenPipeError`: the reader is done, not
    an error.
    """

    def __init__(self, stream: object) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        from charrnn.pipeline import write_text

        try:
            write_text(self.stream, text)  # type: ignore[arg-type]
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise OutputError(f"cannot write to stdout: {exc.strerror or exc}") from exc
        return len(text)

    def flush(self) -> None:
        pass  # every write is flushed


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see '{self.prog} --help')\n")


def _add_set(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override a key of the pipeline; the value is parsed as YAML (repeatable)",
    )


def _add_plugin(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--plugin",
        dest="plugins",
        action="append",
        default=[],
        metavar="MODULE",
        help="load a plugin module or .py file (repeatable)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="charrnn", description="Character-level text generation in pure NumPy.")
    parser.add_argument("--version", action="version", version=f"charrnn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="run a YAML pipeline (train, evaluate, generate)")
    run.add_argument("pipeline", help="the pipeline YAML file")
    _add_set(run)
    run.add_argument("--print-config", action="store_true", help="print the resolved pipeline and exit")

    gen = sub.add_parser("generate", help="generate text from a checkpoint")
    gen.add_argument("checkpoint", help="a .npz checkpoint written by training")
    gen.add_argument("--seed-text", help="text that primes the hidden state (default: the pipeline's)")
    gen.add_argument("--num-chars", type=int, help="how many characters to generate")
    gen.add_argument("--sampler", help="sampler name (default: the pipeline's)")
    gen.add_argument("--temperature", type=float, help="sampler temperature")
    gen.add_argument(
        "-o",
        "--option",
        dest="options",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a sampler option, the value parsed as YAML, e.g. -o k=5 (repeatable)",
    )
    gen.add_argument("--seed", type=int, help="random seed (default: the pipeline's)")
    gen.add_argument(
        "--num-samples", type=int, help="generate this many independent samples in one batched pass"
    )
    gen.add_argument(
        "--stop",
        action="append",
        metavar="TEXT",
        help="stop a sample just before this text appears (repeatable)",
    )
    gen.add_argument("--stream", action="store_true", help="print the text as it is generated")
    _add_plugin(gen)

    bench = sub.add_parser("bench", help="measure a pipeline's training and generation speed")
    bench.add_argument("pipeline", help="the pipeline YAML file")
    bench.add_argument("--seconds", type=float, default=10.0, help="time budget (default 10)")
    bench.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    _add_set(bench)

    grad = sub.add_parser("gradcheck", help="check a model's gradients against finite differences")
    grad.add_argument("pipeline", help="the pipeline YAML file (its model section is checked)")
    grad.add_argument("--entries", type=int, default=30, help="entries checked per parameter (0: all)")
    _add_set(grad)

    plot = sub.add_parser("plot", help="draw train and validation loss against step (SVG, or PNG)")
    plot.add_argument("metrics", nargs="+", help="metrics .jsonl files written by training (runs overlaid)")
    plot.add_argument(
        "-o", "--output", help="FILE.svg or FILE.png (default: <run>.loss.svg beside the first)"
    )
    plot.add_argument("--title", help="the picture's title")

    plugins = sub.add_parser("plugins", help="list plugins and their components as JSON")
    _add_plugin(plugins)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status (0 ok, 1 failure, 2 user error, 130 Ctrl+C)."""
    try:
        return _main(argv)
    except KeyboardInterrupt:  # also while the modules load or the arguments are parsed
        print("interrupted", file=sys.stderr)
        return 130


def _main(argv: Sequence[str] | None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors: return the status, do not exit
        return int(exc.code or 0)
    _utf8(sys.stdout)
    warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"  # one line, no source
    try:
        from charrnn.interrupts import Aborted  # noqa: F401 - the first heavy import: numpy
    except Exception as exc:  # pragma: no cover - a broken installation
        print(f"error: cannot load charrnn: {type(exc).__name__}: {_one_line(str(exc))}", file=sys.stderr)
        return 1
    try:
        if sys.stdout is None:
            raise OutputError("stdout is closed; redirect it to a file or /dev/null instead")
        return _COMMANDS[args.command](args, _Stdout(sys.stdout))
    except Exception as exc:
        return _report(exc)
    except BaseException as exc:  # Aborted (a second Ctrl+C); KeyboardInterrupt goes on to main
        if type(exc).__name__ == "Aborted":
            return _report(exc)
        raise


def _report(exc: BaseException) -> int:
    """Print a failure as one line on stderr; its exit status (2 the user's mistake, 1 a failure).

    With CHARRNN_DEBUG=1 a failure that is not the user's re-raises, for the traceback.
    """
    from charrnn.interrupts import Aborted

    debug = bool(os.environ.get(DEBUG_VARIABLE))
    hint = f" (set {DEBUG_VARIABLE}=1 for the traceback)"
    if isinstance(exc, CharrnnError):
        print(f"error: {_one_line(str(exc))}", file=sys.stderr, flush=True)
        return getattr(exc, "code", 2)
    if isinstance(exc, Aborted):
        print(str(exc), file=sys.stderr, flush=True)
        return exc.code
    if isinstance(exc, BrokenPipeError):  # `charrnn run ... | head`: not an error; keep Python quiet at exit
        _silence_stdout()
        return 0
    if isinstance(exc, OutputError):
        _silence_stdout()
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    if debug or not isinstance(exc, Exception):
        raise exc
    if isinstance(exc, PluginFailure):
        print(f"error: {_one_line(str(exc))}{hint}", file=sys.stderr, flush=True)
        return 1
    # a bug in charrnn itself: one line, the traceback on request
    print(
        f"error: internal error: {type(exc).__name__}: {_one_line(str(exc))}{hint}",
        file=sys.stderr,
        flush=True,
    )
    return 1


def _silence_stdout() -> None:
    """Point fd 1 at /dev/null so the interpreter's final flush of stdout cannot fail again."""
    if sys.stdout is not None:
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass


def _run(args: argparse.Namespace, out: _Stdout) -> int:
    from charrnn import config as cfg
    from charrnn.pipeline import Pipeline
    from charrnn.world import SharedFailure, detect, limit_blas_threads

    pipeline = Pipeline(args.pipeline, overrides=args.overrides)
    if args.print_config:
        out.write(cfg.dump(pipeline.config))
        return 0
    world = detect(pipeline.config["train"]["distributed"]) if "train" in pipeline.config["stages"] else None
    if world is None or world.size == 1:
        pipeline.run(stdout=out, stderr=sys.stderr)  # type: ignore[arg-type]
        return 0
    limit_blas_threads()
    try:
        pipeline.run(stdout=out, stderr=sys.stderr, world=world)  # type: ignore[arg-type]
    except SharedFailure as exc:  # every rank failed alike at start-up: said once, all leave normally
        return _report(exc) if world.rank == 0 else exc.code
    except BaseException as exc:  # one rank failed: end the whole job now, not at the next collective
        try:
            code = _report(exc)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        world.abort(code)
    return 0


def _generate(args: argparse.Namespace, out: _Stdout) -> int:
    from charrnn import config as cfg
    from charrnn.pipeline import generate_samples

    if args.num_chars is not None and args.num_chars < 0:
        raise CharrnnError(f"--num-chars must be >= 0, got {args.num_chars}")
    if args.num_samples is not None and args.num_samples < 1:
        raise CharrnnError(f"--num-samples must be >= 1, got {args.num_samples}")
    options: dict[str, object] = {}
    cfg.apply_overrides(options, args.options)
    result = generate_samples(
        args.checkpoint,
        num_chars=args.num_chars,
        seed_text=args.seed_text,
        sampler=args.sampler,
        temperature=args.temperature,
        sampler_options=options,
        seed=args.seed,
        num_samples=args.num_samples,
        stop=args.stop,
        on_text=out.write if args.stream else None,
        plugins=args.plugins,
    )
    text = result.text or ""
    out.write((text[len(result.texts[0]) :] if args.stream else text) + "\n")
    return 0


def _bench(args: argparse.Namespace, out: _Stdout) -> int:
    from charrnn.bench import bench, format_table
    from charrnn.pipeline import Pipeline

    if not args.seconds > 0:
        raise CharrnnError(f"--seconds must be > 0, got {args.seconds}")
    report = bench(Pipeline(args.pipeline, overrides=args.overrides), seconds=args.seconds)
    out.write((json.dumps(report) if args.json else format_table(report)) + "\n")
    return 0


def _gradcheck(args: argparse.Namespace, out: _Stdout) -> int:
    from charrnn.gradcheck import format_rows, gradcheck
    from charrnn.pipeline import Pipeline

    if args.entries < 0:
        raise CharrnnError(f"--entries must be >= 0, got {args.entries}")
    pipeline = Pipeline(args.pipeline, overrides=args.overrides)
    rows = gradcheck(pipeline, entries=args.entries or None)
    out.write(format_rows(rows, "float64") + "\n")
    return 0 if all(r["ok"] for r in rows) else 1


def _plot(args: argparse.Namespace, out: _Stdout) -> int:
    from charrnn.plot import default_output, write_loss_plot

    path = args.output or default_output(args.metrics[0])
    out.write(f"{write_loss_plot(args.metrics, path, title=args.title)}\n")
    return 0


def _plugins(args: argparse.Namespace, out: _Stdout) -> int:
    from charrnn.plugins import get_plugin_manager, list_plugins

    pm = get_plugin_manager(extra=args.plugins)
    out.write(json.dumps(list_plugins(pm), indent=2) + "\n")
    return 0


_COMMANDS = {
    "run": _run,
    "generate": _generate,
    "bench": _bench,
    "gradcheck": _gradcheck,
    "plot": _plot,
    "plugins": _plugins,
}


def _one_line(message: str) -> str:
    return " ".join(message.split())


def _utf8(stream: object) -> None:
    reconfigure = getattr(stream, "reconfigure", None)
    if reconfigure is not None:
        try:
            reconfigure(encoding="utf-8")
        except (ValueError, OSError):
            pass
