"""Reference text generated from the code: every pipeline key and every component's options.

The tables come from the same descriptions the checker uses (`charrnn.options`), so the
reference cannot drift from what `charrnn run` accepts. `charrnn options` prints it.
"""

from __future__ import annotations

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
