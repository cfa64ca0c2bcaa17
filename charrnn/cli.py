"""The `charrnn` command: a thin layer over the Python API.

User errors print one line, `error: ...`, on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Sequence
from typing import NoReturn

from charrnn import __version__
from charrnn import config as cfg
from charrnn.errors import CharrnnError
from charrnn.pipeline import Pipeline, generate_samples, write_text
from charrnn.plugins import get_plugin_manager, list_plugins
from charrnn.train import Aborted


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
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors: return the status, do not exit
        return int(exc.code or 0)
    _utf8(sys.stdout)
    warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"  # one line, no source
    try:
        return _COMMANDS[args.command](args)
    except CharrnnError as exc:
        print(f"error: {_one_line(str(exc))}", file=sys.stderr)
        return 2
    except Aborted as exc:
        print(str(exc), file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `charrnn run ... | head`: not an error; keep Python quiet at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _run(args: argparse.Namespace) -> int:
    pipeline = Pipeline(args.pipeline, overrides=args.overrides)
    if args.print_config:
        write_text(sys.stdout, cfg.dump(pipeline.config))
        return 0
    pipeline.run(stdout=sys.stdout, stderr=sys.stderr)
    return 0


def _generate(args: argparse.Namespace) -> int:
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
        on_text=(lambda t: write_text(sys.stdout, t)) if args.stream else None,
        plugins=args.plugins,
    )
    text = result.text or ""
    write_text(sys.stdout, (text[len(result.texts[0]) :] if args.stream else text) + "\n")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from charrnn.bench import bench, format_table

    if not args.seconds > 0:
        raise CharrnnError(f"--seconds must be > 0, got {args.seconds}")
    report = bench(Pipeline(args.pipeline, overrides=args.overrides), seconds=args.seconds)
    write_text(sys.stdout, (json.dumps(report) if args.json else format_table(report)) + "\n")
    return 0


def _gradcheck(args: argparse.Namespace) -> int:
    from charrnn.gradcheck import format_rows, gradcheck

    if args.entries < 0:
        raise CharrnnError(f"--entries must be >= 0, got {args.entries}")
    pipeline = Pipeline(args.pipeline, overrides=args.overrides)
    rows = gradcheck(pipeline, entries=args.entries or None)
    write_text(sys.stdout, format_rows(rows, "float64") + "\n")
    return 0 if all(r["ok"] for r in rows) else 1


def _plot(args: argparse.Namespace) -> int:
    from charrnn.plot import default_output, write_loss_plot

    out = args.output or default_output(args.metrics[0])
    write_text(sys.stdout, f"{write_loss_plot(args.metrics, out, title=args.title)}\n")
    return 0


def _plugins(args: argparse.Namespace) -> int:
    pm = get_plugin_manager(extra=args.plugins)
    write_text(sys.stdout, json.dumps(list_plugins(pm), indent=2) + "\n")
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
