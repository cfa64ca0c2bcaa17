"""Reference text generated from the code: pipeline keys and component options, the command
line, the hooks.

The option tables come from the same descriptions the checker uses (`charrnn.options`), the
command line's from the argparse parsers `charrnn` builds, the hooks' from their hookspecs, so the
reference cannot drift from the code. `charrnn options` prints the first; the documentation site
renders all three.
"""

from __future__ import annotations

import argparse
import inspect
import re
from collections.abc import Iterable

import pluggy

from charrnn import config as cfg
from charrnn import options as opt
from charrnn.plugins import Registry, get_plugin_manager

#: the component kinds a pipeline file selects by `type`, in the order the reference shows them
KIND_TITLES = {
    "corpus": "Corpus loaders (`corpus:`)",
    "model": "Models (`model:`)",
    "optimizer": "Optimizers (`optimizer:`)",
    "schedule": "Learning-rate schedules (`schedule:`)",
    "sampler": "Samplers (`sampler:`)",
}


def pipeline_reference(pm: pluggy.PluginManager | None = None, level: int = 2) -> str:
    """Markdown: the pipeline's own keys, plugins' sections, then each component kind's options."""
    pm = pm or get_plugin_manager()
    registry = Registry(pm)
    h = "#" * level
    parts = [f"{h} The pipeline's own keys", "", _top_level(), ""]
    for name in cfg.SECTIONS:
        section = opt.schema_of(cfg.PIPELINE[name].annotation)
        parts += [f"{h}# `{name}:`", "", section.doc, "", opt.markdown(section, f"{name}."), ""]
    sections = registry.components["section"]
    for name in sorted(sections):
        schema = opt.schema_of(sections[name].factory)
        owner = sections[name].plugin
        parts += [
            f"{h}# `{name}:` (plugin `{owner}`)",
            "",
            schema.doc,
            "",
            opt.markdown(schema, f"{name}."),
            "",
        ]
    for kind, title in KIND_TITLES.items():
        parts += [f"{h} {title}", ""]
        extra = cfg.PIPELINE_COMPONENT_OPTIONS.get(kind)
        if extra is not None:
            parts += [
                "Taken by the pipeline, whichever loader reads the text:",
                "",
                opt.markdown(extra, f"{kind}."),
                "",
            ]
        components = registry.components[kind]
        for name in sorted(components):
            c = components[name]
            schema = cfg.component_schema(c.factory, kind)
            default = " (the default)" if cfg.DEFAULT_COMPONENTS[kind]["type"] == name else ""
            parts += [f"{h}# `{kind}: {{type: {name}}}`{default}", ""]
            if schema.doc:
                parts += [schema.doc, ""]
            parts += [
                opt.markdown(schema, f"{kind}.") if schema.fields else "No options.",
                "",
                f"From plugin `{c.plugin}`.",
                "",
            ]
    return "\n".join(_squeeze(parts)).rstrip() + "\n"


def cli_reference(level: int = 2) -> str:
    """Markdown: every `charrnn` subcommand (the registered ones, plugins' too) with its arguments,
    taken from the argparse parsers the command line itself uses."""
    from charrnn.cli import _commands, _parser

    parser = _parser(_commands())
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    h = "#" * level
    parts: list[str] = []
    for name, command_parser in sub.choices.items():
        usage = " ".join(command_parser.format_usage().split()).removeprefix("usage: ")
        parts += [
            f"{h} `charrnn {name}`",
            "",
            command_parser.description or "",
            "",
            "```text",
            usage,
            "```",
            "",
        ]
        rows = ["| argument | meaning | default |", "| --- | --- | --- |"]
        for action in command_parser._actions:
            if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
                continue
            names = ", ".join(action.option_strings) or action.metavar or action.dest
            if action.option_strings and action.nargs != 0:
                names += f" {action.metavar or action.dest.upper()}"
            default = action.default
            shown = (
                ""
                if default in (None, False, [], argparse.SUPPRESS) or not action.option_strings
                else f"`{default}`"
            )
            rows.append(f"| `{names}` | {opt._cell(action.help or '')} | {shown} |")
        parts += rows + [""]
    return "\n".join(parts).rstrip() + "\n"


def hooks_reference(level: int = 2) -> str:
    """Markdown: every hook with its signature and contract, from `charrnn.hookspecs`' docstrings."""
    from charrnn import hookspecs

    h = "#" * level
    parts: list[str] = []
    for name, spec in inspect.getmembers(hookspecs, inspect.isfunction):
        if not name.startswith("charrnn_"):
            continue
        params = ", ".join(inspect.signature(spec).parameters)
        parts += [f"{h} `{name}({params})`", "", _rest_to_markdown(inspect.getdoc(spec) or ""), ""]
    return "\n".join(parts).rstrip() + "\n"


def _rest_to_markdown(doc: str) -> str:
    """The hookspecs' docstrings (``code``, :param x:, :class:`y`) as Markdown."""
    text = re.sub(r":(?:class|func|meth|mod):`~?([^`]+)`", r"`\1`", doc)
    text = text.replace("``", "`")
    return re.sub(r"^:param (\w+):", r"- **`\1`**:", text, flags=re.M)


def _top_level() -> str:
    top = opt.Schema({k: f for k, f in cfg.PIPELINE.fields.items() if k not in cfg.SECTIONS})
    return opt.markdown(top)


def _squeeze(lines: Iterable[str]) -> list[str]:
    """No two blank lines in a row (a component without a summary leaves one)."""
    out: list[str] = []
    for line in lines:
        if line == "" and out and out[-1] == "":
            continue
        out.append(line)
    return out
