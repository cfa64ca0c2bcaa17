"""Assembly: a resolved configuration, its plugin manager and registry, components built by name.

Nothing here runs a stage, so `bench`, `gradcheck`, tests, a sweep trial and the server build
components the way `charrnn run` does without training anything.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pluggy

from charrnn import config as cfg
from charrnn import options as opt
from charrnn.errors import ConfigError
from charrnn.plugins import Registry, calling, get_plugin_manager
from charrnn.types import Model


class Assembly:
    """A validated configuration with the plugin manager and registry that resolved it."""

    def __init__(
        self,
        source: str | Path | Mapping[str, Any],
        *,
        plugins: Iterable[object] = (),
        overrides: Iterable[str] | Mapping[str, Any] | None = None,
        load_entrypoints: bool = True,
        labels: Mapping[str, str] | None = None,
    ) -> None:
        """`labels` say how keys were given (`{"sampler.k": "-o k"}`), for messages that would
        otherwise say `--set KEY`; the key `plugins` says how to name a plugin (`--plugin`)."""
        raw, self.lines, self.origin = cfg.load_config(source)
        overridden = cfg.apply_overrides(raw, overrides)
        self.lines.update({tuple(key.split(".")): 0 for key in overridden})  # 0: "from --set"
        self.lines.update({tuple(key.split(".")): label for key, label in (labels or {}).items()})
        named = cfg.plugins_of(raw, self.lines, self.origin)  # before anything else: they add sections
        self.pm: pluggy.PluginManager = get_plugin_manager(
            load_entrypoints=load_entrypoints, extra=[*named, *plugins]
        )
        self.registry = Registry(self.pm)
        sections = {n: opt.schema_of(c.factory) for n, c in self.registry.components["section"].items()}
        config = cfg.validate(raw, self.lines, self.origin, sections)
        for kind in cfg.COMPONENTS:
            config[kind] = self.resolve(kind, config[kind])
        self.config = config

    def locate(self, *path: str) -> str:
        """Where a key came from, for messages: `file: line N: a.b` or `--set a.b`."""
        return cfg.where(path, self.lines, self.origin)

    def resolve(self, kind: str, section: dict[str, Any], lines: cfg.Lines | None = None) -> dict[str, Any]:
        """Check a component section against its factory; fill the factory's defaults.

        `lines` locate the section's keys for messages (default: where the pipeline had them).
        """
        lines = self.lines if lines is None else lines

        def locate(*path: str) -> str:
            return cfg.where((kind, *path), lines, self.origin)

        name = section["type"]
        how = lines.get(("plugins",), self.lines.get(("plugins",)))
        how = f"with {how}" if isinstance(how, str) else "in plugins"
        component = self.registry.get(kind, name, locate("type"), how)
        own = cfg.PIPELINE_COMPONENT_OPTIONS.get(kind, opt.Schema({}))
        options = {k: v for k, v in section.items() if k != "type" and k not in own}
        resolved = cfg.check_component(component.factory, kind, options, locate)
        return {"type": name, **{k: section[k] for k in own.names() if k in section}, **resolved}

    def build(
        self,
        kind: str,
        section: dict[str, Any] | None = None,
        lines: cfg.Lines | None = None,
        **injected: Any,
    ) -> Any:
        """Call the factory a section names (default: the pipeline's).

        Its ValueError/TypeError is the documented answer to bad options: a ConfigError that
        names the section. Any other exception is a bug in the plugin (or, for a loader, e.g.
        a file it could not open): a `PluginFailure` naming the plugin.
        """
        section = self.config[kind] if section is None else section
        component = self.registry.get(kind, section["type"], self.locate(kind, "type"))
        own = cfg.PIPELINE_COMPONENT_OPTIONS.get(kind, opt.Schema({}))
        options = {k: v for k, v in section.items() if k != "type" and k not in own}
        with calling(self.registry.label(kind, component.name)):
            try:
                return component.factory(**injected, **options)
            except (ValueError, TypeError) as exc:
                where = cfg.where((kind,), self.lines if lines is None else lines, self.origin)
                raise ConfigError(f"{where} ({section['type']}): {exc}") from None

    def label(self, kind: str, section: dict[str, Any] | None = None) -> str:
        """Who to blame when the component of `kind` fails: `plugin 'p' (sampler 'top_k')`."""
        return self.registry.label(kind, (self.config[kind] if section is None else section)["type"])

    def model(self, vocab_size: int, section: dict[str, Any] | None = None) -> Model:
        """The model, initialised from the pipeline's seed."""
        rng = np.random.default_rng([self.config["seed"], 0])
        return self.build("model", section, vocab_size=vocab_size, rng=rng)

    def sampler(
        self, vocab: list[str], section: dict[str, Any] | None = None, lines: cfg.Lines | None = None
    ) -> Any:
        """The sampler, bound to `vocab` when it wants to see it."""
        sampler = self.build("sampler", section, lines)
        if hasattr(sampler, "bind"):
            with calling(self.label("sampler", section)):
                sampler.bind(vocab)
        return sampler

    def optimizer(self) -> Any:
        return self.build("optimizer")

    def schedule(self) -> Any:
        return self.build("schedule")
