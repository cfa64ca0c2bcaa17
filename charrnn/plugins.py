"""Plugin manager factory, plugin loading and the component registry.

Registration order: the builtin `DEFAULT_PLUGINS`, then the `charrnn` entry-point group
(unless `CHARRNN_LOAD_PLUGINS` restricts it), then modules named in the YAML `plugins:` list,
then plugin objects passed to the API.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pluggy

from charrnn import hookspecs
from charrnn import options as opt
from charrnn.config import INJECTED
from charrnn.errors import CharrnnError, PluginError, PluginFailure

DEFAULT_PLUGINS: tuple[str, ...] = (
    "charrnn.commands",
    "charrnn_plugins.text",
    "charrnn_plugins.files",
    "charrnn_plugins.url",
    "charrnn_plugins.rnn",
    "charrnn_plugins.lstm",
    "charrnn_plugins.gru",
    "charrnn_plugins.mingru",
    "charrnn_plugins.adagrad",
    "charrnn_plugins.optimizers",
    "charrnn_plugins.samplers",
    "charrnn_plugins.beam",
    "charrnn_plugins.schedules",
    "charrnn_plugins.sweep",
    "charrnn_plugins.serve",
    "charrnn_plugins.export",
)

ENTRY_POINT_GROUP = "charrnn"

#: top-level keys of a pipeline file that no plugin's section may take
RESERVED_SECTIONS = (
    "seed",
    "plugins",
    "stages",
    "train",
    "generate",
    "evaluate",
    "corpus",
    "model",
    "optimizer",
    "sampler",
    "schedule",
)

#: component kind -> the registration hook that contributes it
KINDS: dict[str, str] = {
    "corpus": "charrnn_corpus_loader",
    "model": "charrnn_model",
    "optimizer": "charrnn_optimizer",
    "sampler": "charrnn_sampler",
    "schedule": "charrnn_schedule",
    "command": "charrnn_command",
    "section": "charrnn_section",
    "exporter": "charrnn_exporter",
}


def get_plugin_manager(load_entrypoints: bool = True, extra: Iterable[object] = ()) -> pluggy.PluginManager:
    """A fresh manager with the builtins, entry points (optional) and `extra` plugins registered.

    `extra` items are module objects, plugin objects, import names or paths to `.py` files.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for name in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(name), name=name)
    if load_entrypoints:
        _load_entrypoints(pm)
    for plugin in extra:
        add_plugin(pm, plugin)
    if os.environ.get("CHARRNN_TRACE_PLUGINS"):
        pm.trace.root.setwriter(lambda msg: print(msg, end="", file=sys.stderr))
        pm.enable_tracing()
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin {exc.plugin!r} implements an unknown hook: {exc}") from None
    return pm


def _load_entrypoints(pm: pluggy.PluginManager) -> None:
    wanted = os.environ.get("CHARRNN_LOAD_PLUGINS")
    names = None if wanted is None else {n.strip() for n in wanted.split(",") if n.strip()}
    for dist in importlib.metadata.distributions():
        for ep in dist.entry_points:
            if ep.group != ENTRY_POINT_GROUP:
                continue
            if names is not None and ep.name not in names and dist.metadata["Name"] not in names:
                continue
            if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
                continue
            try:
                ep.load()  # import first, so a broken plugin is named in the error
            except Exception as exc:  # an installed plugin whose import raises: a bug in it
                raise PluginFailure(
                    f"plugin {ep.name!r} (entry point {ep.value}, importing it)", exc
                ) from exc
            try:
                pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP, name=ep.name)
            except pluggy.PluginValidationError as exc:
                raise PluginError(f"plugin {ep.name!r} is invalid: {exc}") from None


def _is_path(spec: str) -> bool:
    """A `.py` name, anything with a slash, or an existing file (`x.txt`, to say it is not Python)."""
    return spec.endswith(".py") or os.sep in spec or "/" in spec or os.path.isfile(spec)


def _plugin_file(spec: str) -> Path:
    """The resolved `.py` file a path names; anything else is the user's error, said plainly."""
    path = Path(spec)
    if not path.is_file():
        raise PluginError(f"plugin file not found: {spec}")
    if path.suffix != ".py":
        raise PluginError(f"plugin file {spec} is not a .py file (a plugin is a Python module)")
    return path.resolve()


def _import_file(path: Path, spec: str) -> ModuleType:
    name = "charrnn_local_" + path.stem
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:  # pragma: no cover - `.py` is checked above
        raise PluginError(f"plugin file {spec} cannot be imported")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:  # the plugin's own code raised: a bug in it, not the user's input
        raise PluginFailure(f"plugin file {spec} (importing it)", exc) from exc
    sys.modules[name] = module
    return module


def load_module(spec: str) -> ModuleType:
    """Import a plugin module by import name, or from a path ending in `.py`."""
    _check_name(spec)
    if _is_path(spec):
        return _import_file(_plugin_file(spec), spec)
    try:
        return importlib.import_module(spec)
    except ModuleNotFoundError as exc:
        if exc.name and spec.startswith(exc.name):
            raise PluginError(f"plugin module {spec!r} not found (is it installed?)") from None
        raise PluginFailure(f"plugin module {spec!r} (importing it)", exc) from exc
    except Exception as exc:  # the plugin's own code raised: a bug in it, not the user's input
        raise PluginFailure(f"plugin module {spec!r} (importing it)", exc) from exc


def _check_name(spec: str) -> None:
    """An empty or relative plugin name is the user's mistake, not a plugin's failure to import."""
    if not spec.strip():
        raise PluginError(
            f"empty plugin name {spec!r}: name a module (such as charrnn_plugins.tensorboard) or a .py file"
        )
    if spec.startswith(".") and not _is_path(spec):
        raise PluginError(
            f"plugin name {spec!r} is relative: give the module's full import name, or a .py file"
        )


def _source_file(plugin: object) -> Path | None:
    file = getattr(plugin, "__file__", None) if isinstance(plugin, ModuleType) else None
    return Path(file).resolve() if file else None


def _registered_file(pm: pluggy.PluginManager, path: Path | None) -> bool:
    """Whether a registered module was loaded from `path`, or from a copy of it.

    A copy is a file of the same name and bytes: `pip install .` copies `vowel_boost.py`
    into site-packages, and the README's `--plugin vowel_boost.py` still names the original.
    """
    return path is not None and any(_same_source(_source_file(p), path) for p in pm.get_plugins())


def _same_source(a: Path | None, b: Path) -> bool:
    if a is None or a.name != b.name:
        return False
    try:
        return a == b or a.read_bytes() == b.read_bytes()
    except OSError:
        return False


def add_plugin(pm: pluggy.PluginManager, plugin: object) -> None:
    """Register a module, plugin object, import name or `.py` path, once.

    Once means once per module: a `.py` path whose file (or an identical copy of it, see
    `_registered_file`) an already registered module was loaded from, such as the same file
    named twice or an installed entry point's module, is not imported again, so its
    components are not registered twice.
    """
    name = None
    if isinstance(plugin, (str, os.PathLike)):
        spec = os.fspath(plugin)
        _check_name(spec)
        if _is_path(spec):
            path = _plugin_file(spec)
            if _registered_file(pm, path):
                return
            plugin, name = _import_file(path, spec), spec  # named as the user wrote it, for messages
        else:
            plugin = load_module(spec)
    if pm.is_registered(plugin) or _registered_file(pm, _source_file(plugin)):
        return
    name = name or getattr(plugin, "__name__", None) or f"{type(plugin).__name__}-{id(plugin)}"
    _register(pm, plugin, name if pm.get_plugin(name) is None else f"{name}-{id(plugin)}")


def _register(pm: pluggy.PluginManager, plugin: object, name: str) -> None:
    try:
        pm.register(plugin, name=name)
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin {name!r} is invalid: {exc}") from None


@contextmanager
def calling(label: str) -> Iterator[None]:
    """Run plugin code: an exception it raises becomes a `PluginFailure` that names it.

    A `CharrnnError` passes unchanged (hookspecs ask plugins to raise those for bad input),
    as do `KeyboardInterrupt` and `SystemExit`, which are not `Exception`s.
    """
    try:
        yield
    except (CharrnnError, PluginFailure):
        raise
    except Exception as exc:
        raise PluginFailure(label, exc) from exc


@dataclass(frozen=True)
class Component:
    """A named factory and the plugin that registered it."""

    kind: str
    name: str
    factory: Callable[..., Any]
    plugin: str


class Registry:
    """The named components of every kind, collected once from a plugin manager.

    Each registration hook is called through the plugin manager, so `CHARRNN_TRACE_PLUGINS`
    and hook-call monitoring see it, but once per implementing plugin, through
    `pm.subset_hook_caller` with every other plugin removed: that call is the only place
    that knows which plugin a `register(name, factory)` comes from (for duplicate-name
    errors and listings) and which plugin to blame when a hook raises.
    """

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self.components: dict[str, dict[str, Component]] = {kind: {} for kind in KINDS}
        for kind, hook_name in KINDS.items():
            impls = getattr(pm.hook, hook_name).get_hookimpls()
            for impl in impls:
                others = [i.plugin for i in impls if i.plugin is not impl.plugin]
                call = pm.subset_hook_caller(hook_name, remove_plugins=others)
                with calling(f"plugin {impl.plugin_name!r} ({hook_name})"):
                    call(register=self._registrar(kind, impl.plugin_name))

    def _registrar(self, kind: str, plugin: str) -> Callable[[str, Callable[..., Any]], None]:
        def register(name: str, factory: Callable[..., Any]) -> None:
            if not isinstance(name, str) or not name:
                raise PluginError(f"plugin {plugin!r} registered a {kind} with an invalid name {name!r}")
            if not callable(factory):
                raise PluginError(f"plugin {plugin!r} registered {kind} {name!r} with a non-callable")
            known = self.components[kind]
            if kind == "section" and name in RESERVED_SECTIONS:
                raise PluginError(
                    f"plugin {plugin!r} registered a section {name!r}: the pipeline owns that key"
                )
            if name in known:
                raise PluginError(
                    f"{kind} {name!r} is registered twice: by plugin {known[name].plugin!r} "
                    f"and by plugin {plugin!r}"
                )
            known[name] = Component(kind, name, factory, plugin)

        register.__qualname__ = f"register[{plugin}]"  # the trace shows whose call it is
        return register

    def label(self, kind: str, name: str) -> str:
        """`plugin 'p' (sampler 'top_k')`: who to blame when component `name` fails."""
        component = self.components[kind].get(name)
        owner = f"plugin {component.plugin!r}" if component is not None else "plugin"
        return f"{owner} ({kind} {name!r})"

    def get(
        self, kind: str, name: object, where: str | None = None, plugins: str = "in plugins"
    ) -> Component:
        """The component `name` of `kind`; an unknown name lists the known ones.

        Without a close match the name may well be right and its plugin missing: the message
        then says how to add one: `plugins` is `in plugins` (the YAML key) or `with --plugin`.
        """
        known = self.components[kind]
        if isinstance(name, str) and name in known:
            return known[name]
        where = where or f"{kind}.type"
        names = sorted(known)
        hint = opt.suggest(str(name), names)
        missing = "" if hint else f"; install its plugin or name it {plugins}"
        raise PluginError(
            f"{where}: unknown {kind} {name!r}{hint}; available: {', '.join(names) or 'none'}{missing}"
        )


#: the kinds whose factories take options from a pipeline file (commands and exporters take none)
OPTION_KINDS = ("corpus", "model", "optimizer", "sampler", "schedule", "section")


def options_of(factory: Callable[..., Any]) -> dict[str, Any]:
    """A factory's options and their defaults (`"required"` where there is none), for listings."""
    return {
        f.name: "required" if f.required else f.default if opt.plain(f.default) else repr(f.default)
        for f in opt.schema_of(factory, skip=INJECTED)
    }


def list_plugins(pm: pluggy.PluginManager) -> list[dict[str, Any]]:
    """One entry per plugin: name, hooks, version (entry-point plugins) and components with options."""
    registry = Registry(pm)
    versions = {
        name: dist.version for name, dist in ((pm.get_name(p), d) for p, d in pm.list_plugin_distinfo())
    }
    result = []
    for name, plugin in pm.list_name_plugin():
        if plugin is None:
            continue
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or ())
        components = {
            kind: {
                c.name: options_of(c.factory) if kind in OPTION_KINDS else {}
                for c in sorted(comps.values(), key=lambda c: c.name)
                if c.plugin == name
            }
            for kind, comps in registry.components.items()
        }
        entry: dict[str, Any] = {"name": name, "hooks": hooks}
        if name in versions:
            entry["version"] = versions[name]
        entry["components"] = {k: v for k, v in components.items() if v}
        result.append(entry)
    return result


def call_hook(pm: pluggy.PluginManager, name: str, **kwargs: Any) -> list[Any]:
    """Call event hook `name` through the manager (so tracing sees it); an implementation that
    raises is a `PluginFailure` naming its plugin (found in the traceback, at no cost otherwise)."""
    hook = getattr(pm.hook, name)
    try:
        return hook(**kwargs)
    except (CharrnnError, PluginFailure):
        raise
    except Exception as exc:
        owners = {impl.function.__code__: impl.plugin_name for impl in hook.get_hookimpls()}
        tb, owner = exc.__traceback__, None
        while tb is not None and owner is None:
            owner = owners.get(tb.tb_frame.f_code)
            tb = tb.tb_next
        raise PluginFailure(f"plugin {owner!r} ({name})" if owner else f"a {name} hook", exc) from exc
