"""The builtin subcommands of `charrnn`, registered through `charrnn_command` like any plugin's.

A command is an object with a one-line `help`, `add_arguments(parser)` (argparse) and
`__call__(args, out) -> int` (the exit status; `out` is stdout, UTF-8, whose failed writes the
CLI reports). User errors are raised as `charrnn.CharrnnError`s: the CLI prints them as one line.
`add_set` and `add_plugin` give a command the usual `--set` and `--plugin` options.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from typing import Any

from charrnn.errors import CharrnnError
from charrnn.hookspecs import hookimpl


def add_set(parser: argparse.ArgumentParser) -> None:
    """`--set KEY.PATH=VALUE` (repeatable) into `args.overrides`."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override a key of the pipeline; the value is parsed as YAML (repeatable)",
    )


def add_plugin(parser: argparse.ArgumentParser) -> None:
    """`--plugin MODULE` (repeatable) into `args.plugins`."""
    parser.add_argument(
        "--plugin",
        dest="plugins",
        action="append",
        default=[],
        metavar="MODULE",
        help="load a plugin module or .py file (repeatable)",
    )


class Run:
    help = "run a YAML pipeline (train, evaluate, generate)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("pipeline", help="the pipeline YAML file")
        add_set(parser)
        parser.add_argument(
            "--print-config", action="store_true", help="print the resolved pipeline and exit"
        )

    def __call__(self, args: argparse.Namespace, out: Any) -> int:
        from charrnn import config as cfg
        from charrnn.cli import report
        from charrnn.interrupts import Aborted
        from charrnn.pipeline import Pipeline
        from charrnn.threads import for_mpi_rank
        from charrnn.world import SharedFailure, detect

        pipeline = Pipeline(args.pipeline, overrides=args.overrides)
        if args.print_config:
            out.write(cfg.dump(pipeline.config))
            return 0
        world = (
            detect(pipeline.config["train"]["distributed"]) if "train" in pipeline.config["stages"] else None
        )
        if world is None or world.size == 1:
            pipeline.run(stdout=out, stderr=sys.stderr)  # type: ignore[arg-type]
            return 0
        for_mpi_rank()
        try:
            pipeline.run(stdout=out, stderr=sys.stderr, world=world)  # type: ignore[arg-type]
        except SharedFailure as exc:  # every rank failed alike at start-up: said once, all leave normally
            return report(exc) if world.rank == 0 else exc.code
        except Aborted as exc:  # every rank stopped at one step, after rank 0's save: said once, all leave
            return report(exc) if world.rank == 0 else exc.code
        except BaseException as exc:  # one rank failed: end the whole job now, not at the next collective
            try:
                code = report(exc)
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            world.abort(code)
        return 0


class Generate:
    help = "generate text from a checkpoint"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("checkpoint", help="a .npz checkpoint written by training")
        parser.add_argument("--seed-text", help="text that primes the hidden state (default: the pipeline's)")
        parser.add_argument("--num-chars", type=int, help="how many characters to generate")
        parser.add_argument("--sampler", help="sampler name (default: the pipeline's)")
        parser.add_argument("--temperature", type=float, help="sampler temperature")
        parser.add_argument(
            "-o",
            "--option",
            dest="options",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="a sampler option, the value parsed as YAML, e.g. -o k=5 (repeatable)",
        )
        parser.add_argument("--seed", type=int, help="random seed (default: the pipeline's)")
        parser.add_argument(
            "--num-samples", type=int, help="generate this many independent samples in one batched pass"
        )
        parser.add_argument(
            "--stop",
            action="append",
            metavar="TEXT",
            help="stop a sample just before this text appears (repeatable)",
        )
        parser.add_argument("--stream", action="store_true", help="print the text as it is generated")
        add_plugin(parser)

    def __call__(self, args: argparse.Namespace, out: Any) -> int:
        from charrnn import config as cfg
        from charrnn.pipeline import generate_samples

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
            labels=flag_labels(args, options),
        )
        text = result.text or ""
        out.write((text[len(result.texts[0]) :] if args.stream else text) + "\n")
        return 0


def flag_labels(args: argparse.Namespace, options: dict[str, object]) -> dict[str, str]:
    """How `charrnn generate` names each value it was given, for messages (`--num-chars: ...`)."""
    flags = (
        ("generate.num_chars", "--num-chars", args.num_chars),
        ("generate.seed_text", "--seed-text", args.seed_text),
        ("generate.num_samples", "--num-samples", args.num_samples),
        ("generate.stop", "--stop", args.stop),
        ("seed", "--seed", args.seed),
        ("sampler.type", "--sampler", args.sampler),
        ("sampler.temperature", "--temperature", args.temperature),
    )
    labels = {key: flag for key, flag, value in flags if value is not None}
    labels.update({f"sampler.{key}": f"-o {key}" for key in options})
    typed = [f"--sampler {args.sampler}"] if args.sampler is not None else []
    typed += [f"--temperature {args.temperature:g}"] if args.temperature is not None else []
    typed += [f"-o {key}={value}" for key, value in options.items()]
    if typed:  # the sampler's own refusals (rules between options) are named by the whole call
        labels["sampler"] = " ".join(typed)
    return labels


class Bench:
    help = "measure a pipeline's training and generation speed"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("pipeline", help="the pipeline YAML file")
        parser.add_argument("--seconds", type=float, default=10.0, help="time budget (default 10)")
        parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
        add_set(parser)

    def __call__(self, args: argparse.Namespace, out: Any) -> int:
        from charrnn.bench import bench, format_table
        from charrnn.pipeline import Pipeline

        if not args.seconds > 0:
            raise CharrnnError(f"--seconds must be > 0, got {args.seconds}")
        report = bench(Pipeline(args.pipeline, overrides=args.overrides), seconds=args.seconds)
        out.write((json.dumps(report) if args.json else format_table(report)) + "\n")
        return 0


class Gradcheck:
    help = "check a model's gradients against finite differences"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("pipeline", help="the pipeline YAML file (its model section is checked)")
        parser.add_argument("--entries", type=int, default=30, help="entries checked per parameter (0: all)")
        add_set(parser)

    def __call__(self, args: argparse.Namespace, out: Any) -> int:
        from charrnn.gradcheck import format_rows, gradcheck
        from charrnn.pipeline import Pipeline

        if args.entries < 0:
            raise CharrnnError(f"--entries must be >= 0, got {args.entries}")
        pipeline = Pipeline(args.pipeline, overrides=args.overrides)
        rows = gradcheck(pipeline, entries=args.entries or None)
        out.write(format_rows(rows, "float64") + "\n")
        return 0 if all(r["ok"] for r in rows) else 1


class Plot:
    help = "draw train and validation loss against step (SVG, or PNG)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "metrics", nargs="+", help="metrics .jsonl files written by training (runs overlaid)"
        )
        parser.add_argument(
            "-o", "--output", help="FILE.svg or FILE.png (default: <run>.loss.svg beside the first)"
        )
        parser.add_argument("--title", help="the picture's title")

    def __call__(self, args: argparse.Namespace, out: Any) -> int:
        from charrnn.plot import default_output, write_loss_plot

        def warn(message: str) -> None:
            print(f"warning: {message}", file=sys.stderr, flush=True)

        path = args.output or default_output(args.metrics[0])
        out.write(f"{write_loss_plot(args.metrics, path, title=args.title, warn=warn)}\n")
        return 0


class Plugins:
    help = "list plugins and their components as JSON"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_plugin(parser)

    def __call__(self, args: argparse.Namespace, out: Any) -> int:
        from charrnn.plugins import get_plugin_manager

        out.write(self.render(get_plugin_manager(extra=args.plugins)))
        return 0

    def render(self, pm: Any) -> str:
        from charrnn.plugins import list_plugins

        return json.dumps(list_plugins(pm), indent=2) + "\n"


class Options(Plugins):
    help = "print every pipeline key and component option (type, default, rules, help) as Markdown"

    def render(self, pm: Any) -> str:
        from charrnn.reference import pipeline_reference

        return pipeline_reference(pm)


@hookimpl
def charrnn_command(register):
    register("run", Run)
    register("generate", Generate)
    register("bench", Bench)
    register("gradcheck", Gradcheck)
    register("plot", Plot)
    register("plugins", Plugins)
    register("options", Options)
