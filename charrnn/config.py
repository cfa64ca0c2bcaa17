"""Reading, overriding and validating pipeline configurations.

A configuration is a plain dict (as YAML gives it). `load_config` parses a file keeping the
line of every key, `apply_overrides` applies `--set KEY.PATH=VALUE` items, `validate` checks
the pipeline-owned sections against `SCHEMA` and fills defaults. Component sections
(`corpus`, `model`, `optimizer`, `sampler`) are checked by `check_options` against the
signature of the factory their `type` names.
"""

from __future__ import annotations

import copy
import difflib
import inspect
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from charrnn.errors import ConfigError

Lines = dict[tuple[str, ...], int | str]  # a str: how the value was given, e.g. a command-line flag

STAGES = ("train", "evaluate", "generate")
COMPONENTS = ("corpus", "model", "optimizer", "sampler", "schedule")


@dataclass(frozen=True)
class Opt:
    """One pipeline-owned option: accepted types, default, and an optional range check."""

    types: tuple[type, ...]
    default: Any
    check: Callable[[Any], bool] | None = None
    must: str = ""

    def describe(self) -> str:
        names = {
            bool: "true/false",
            int: "an integer",
            float: "a number",
            str: "a string",
            list: "a list",
            type(None): "null",
        }
        return " or ".join(names.get(t, t.__name__) for t in self.types)


def _positive(v: Any) -> bool:
    return v is None or v > 0


def _non_negative(v: Any) -> bool:
    return v is None or v >= 0


def _fraction(v: Any) -> bool:
    return 0 <= v < 1


INT, NONE = (int,), (type(None),)

SCHEMA: dict[str, dict[str, Opt] | Opt] = {
    "seed": Opt(INT, 42, _non_negative, "must be >= 0"),
    "plugins": Opt((list,), []),
    "stages": Opt((list, str), ["train", "generate"]),
    "train": {
        "steps": Opt(INT + NONE, 1000, _positive, "must be > 0 (or null to train until Ctrl+C)"),
        "batch_size": Opt(INT, 16, _positive, "must be >= 1"),
        "seq_length": Opt(INT, 50, _positive, "must be >= 1"),
        "sample_every": Opt(INT + NONE, 100, _positive, "must be > 0 (or null for no samples)"),
        "sample_length": Opt(INT, 200, _non_negative, "must be >= 0"),
        "save_every": Opt(INT + NONE, None, _positive, "must be > 0 (or null)"),
        "checkpoint": Opt((str,), "runs/default/final_model.npz", bool, "must not be empty"),
        "resume": Opt((bool, str), False, lambda v: v != "", "must be true, false or a path"),
        "init_from": Opt((str,) + NONE, None, lambda v: v != "", "must be a checkpoint path or null"),
        "eval_every": Opt(INT + NONE, None, _positive, "must be > 0 (or null: at each sample_every)"),
        "patience": Opt(INT + NONE, None, _positive, "must be > 0 (or null: no early stopping)"),
        "keep_best": Opt((bool,), True),
        "metrics": Opt((bool,), True),
        "distributed": Opt(
            (str, bool), "auto", lambda v: v in ("auto", "off", "mpi", False), "must be auto, off or mpi"
        ),
    },
    "generate": {
        "num_chars": Opt(INT, 1000, _non_negative, "must be >= 0"),
        "seed_text": Opt((str,), "The "),
        "checkpoint": Opt((str,) + NONE, None, lambda v: v != "", "must be a path or null"),
        "num_samples": Opt(INT, 1, _positive, "must be >= 1"),
        "stop": Opt(
            (list, str),
            [],
            lambda v: all(isinstance(x, str) and x for x in ([v] if isinstance(v, str) else v)),
            "must be a non-empty string or a list of them",
        ),
        "stream": Opt((bool,), False),
        "separator": Opt((str,), "\n---\n"),
    },
    "evaluate": {
        "path": Opt((str,) + NONE, None, lambda v: v != "", "must be a path or null (the validation split)"),
        "checkpoint": Opt((str,) + NONE, None, lambda v: v != "", "must be a path or null"),
    },
}

#: options of component sections that the pipeline, not the factory, consumes
PIPELINE_COMPONENT_OPTIONS: dict[str, dict[str, Opt]] = {
    "corpus": {"val_fraction": Opt((float, int), 0.0, _fraction, "must be in [0, 1)")},
}

DEFAULT_COMPONENTS: dict[str, dict[str, Any]] = {
    "corpus": {"type": "text", "path": "data/input.txt"},
    "model": {"type": "rnn"},
    "optimizer": {"type": "adagrad"},
    "sampler": {"type": "temperature"},
    "schedule": {"type": "constant"},
}


def where(path: Iterable[str], lines: Lines | None, origin: str = "") -> str:
    """`file: line N: a.b` for messages; line 0 marks a value that came from `--set`, a string
    names how the value was given (`--temperature`)."""
    path = tuple(path)
    dotted = ".".join(path)
    for n in range(len(path), 0, -1):
        line = (lines or {}).get(path[:n])
        if isinstance(line, str):
            return line if n == len(path) else f"{line}.{'.'.join(path[n:])}"
        if line == 0:
            return f"--set {dotted}"
        if line is not None:
            return f"{origin}line {line}: {dotted}"
    return dotted


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-3` as a float (YAML 1.1 wants `1.0e-3`; users write `1e-3`)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


# dates stay strings: a pipeline has no use for them and JSON metadata cannot hold them
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in _Loader.yaml_implicit_resolvers.items()
}


def safe_load(text: str) -> Any:
    """`yaml.safe_load` with `_Loader`'s float rule."""
    return yaml.load(text, Loader=_Loader)  # _Loader is a SafeLoader: no arbitrary objects


def suggest(name: str, known: Iterable[str]) -> str:
    """` (did you mean 'x'?)` for a close match, else an empty string."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def parse_yaml(text: str, origin: str = "") -> tuple[Any, Lines]:
    """Parse YAML safely and record the 1-based line of every mapping key."""
    try:
        node = yaml.compose(text, Loader=_Loader)
        data = safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f"line {mark.line + 1}: " if mark is not None else ""
        problem = exc.problem or exc.context or "invalid YAML"
        raise ConfigError(f"{origin}{line}malformed YAML: {problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{origin}malformed YAML: {exc}") from None
    lines: Lines = {}

    def walk(n: yaml.Node | None, path: tuple[str, ...]) -> None:
        if isinstance(n, yaml.MappingNode):
            for key, value in n.value:
                sub = (*path, str(key.value))
                lines[sub] = key.start_mark.line + 1
                walk(value, sub)

    walk(node, ())
    return data, lines


def load_config(source: str | Path | Mapping[str, Any]) -> tuple[dict[str, Any], Lines, str]:
    """The raw config dict, its key lines and an origin prefix for messages."""
    if isinstance(source, Mapping):
        return copy.deepcopy(dict(source)), {}, ""
    path = Path(source)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"pipeline file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"pipeline path is a directory, not a YAML file: {path}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"pipeline file {path} is not valid UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"cannot read pipeline file {path}: {exc.strerror}") from None
    origin = f"{path}: "
    data, lines = parse_yaml(text, origin)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{origin}the pipeline must be a YAML mapping of sections, got {type(data).__name__}"
        )
    return data, lines, origin


def apply_overrides(config: dict[str, Any], overrides: Iterable[str] | Mapping[str, Any] | None) -> set[str]:
    """Apply `KEY.PATH=VALUE` items (values parsed as YAML) in place; returns the keys set."""
    if not overrides:
        return set()
    items: list[tuple[str, Any]] = []
    if isinstance(overrides, Mapping):
        items = list(overrides.items())
    else:
        for item in overrides:
            key, sep, raw = item.partition("=")
            if not sep or not key.strip():
                raise ConfigError(f"--set {item!r}: expected KEY.PATH=VALUE, e.g. train.steps=200")
            try:
                value = safe_load(raw) if raw.strip() else None
            except yaml.YAMLError as exc:
                raise ConfigError(f"--set {item!r}: the value is not valid YAML: {exc}") from None
            items.append((key.strip(), value))
    for key, value in items:
        parts = key.split(".")
        if any(not p for p in parts):
            raise ConfigError(f"--set {key!r}: empty key in the path")
        node = config
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: {'.'.join(parts[: i + 1])} is not a section")
            node = child
        node[parts[-1]] = value
    return {k for k, _ in items}


def check_value(opt: Opt, value: Any, place: str) -> Any:
    """Check one pipeline option's type and range; ints are accepted where numbers are."""
    ok = any(isinstance(value, t) and not (t in (int, float) and isinstance(value, bool)) for t in opt.types)
    if not ok and float in opt.types and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        raise ConfigError(f"{place}: expected {opt.describe()}, got {_show(value)}")
    if opt.check is not None and not opt.check(value):
        raise ConfigError(f"{place}: {opt.must}, got {_show(value)}")
    return value


def _show(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "true" if value is True else "false" if value is False else "null"
    if isinstance(value, (dict, list)):
        return f"a {'mapping' if isinstance(value, dict) else 'list'} {value!r}"
    return repr(value)


def _check_section(
    section: str, value: Any, spec: dict[str, Opt], lines: Lines, origin: str
) -> dict[str, Any]:
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise ConfigError(
            f"{where([section], lines, origin)}: expected a mapping of options, got {_show(value)}"
        )
    for key in value:
        if key not in spec:
            raise ConfigError(
                f"{where([section, str(key)], lines, origin)}: unknown key{suggest(str(key), spec)}; "
                f"known keys: {', '.join(spec)}"
            )
    out = {}
    for key, opt in spec.items():
        if key in value:
            out[key] = check_value(opt, value[key], where([section, key], lines, origin))
        else:
            out[key] = copy.deepcopy(opt.default)
    return out


def validate(raw: dict[str, Any], lines: Lines | None = None, origin: str = "") -> dict[str, Any]:
    """Check the pipeline-owned keys and fill their defaults; component options stay as given."""
    lines = lines or {}
    known = [*SCHEMA, *COMPONENTS]
    for key in raw:
        if key not in known:
            raise ConfigError(
                f"{where([str(key)], lines, origin)}: unknown key{suggest(str(key), known)}; "
                f"known keys: {', '.join(known)}"
            )
    config: dict[str, Any] = {}
    for key, spec in SCHEMA.items():
        if isinstance(spec, dict):
            config[key] = _check_section(key, raw.get(key), spec, lines, origin)
        elif key in raw:
            config[key] = check_value(spec, raw[key], where([key], lines, origin))
        else:
            config[key] = copy.deepcopy(spec.default)
    if isinstance(config["stages"], str):
        config["stages"] = [config["stages"]]  # `stages: train` is short for `stages: [train]`
    if isinstance(config["generate"]["stop"], str):
        config["generate"]["stop"] = [config["generate"]["stop"]]
    for i, plugin in enumerate(config["plugins"]):
        if not isinstance(plugin, str) or not plugin:
            raise ConfigError(f"{where(['plugins'], lines, origin)}[{i}]: expected a module name or .py path")
    stages = config["stages"]
    for stage in stages:
        if stage not in STAGES:
            raise ConfigError(
                f"{where(['stages'], lines, origin)}: unknown stage {stage!r}{suggest(str(stage), STAGES)}; "
                f"available: {', '.join(STAGES)}"
            )
    if not stages:
        raise ConfigError(
            f"{where(['stages'], lines, origin)}: no stages to run; available: {', '.join(STAGES)}"
        )
    for kind in COMPONENTS:
        section = raw.get(kind, None)
        if section is None:
            section = {}
        if isinstance(section, str):
            section = {"type": section}  # `sampler: greedy` is short for `sampler: {type: greedy}`
        if not isinstance(section, dict):
            raise ConfigError(
                f"{where([kind], lines, origin)}: expected a mapping with a 'type', got {_show(section)}"
            )
        if "type" in section and not (isinstance(section["type"], str) and section["type"]):
            raise ConfigError(
                f"{where([kind, 'type'], lines, origin)}: expected a component name, "
                f"got {_show(section['type'])}"
            )
        merged = dict(section) if section else dict(DEFAULT_COMPONENTS[kind])
        merged.setdefault("type", DEFAULT_COMPONENTS[kind]["type"])
        for key, opt in PIPELINE_COMPONENT_OPTIONS.get(kind, {}).items():
            merged[key] = check_value(opt, merged.get(key, opt.default), where([kind, key], lines, origin))
        config[kind] = merged
    return config


def _type_ok(value: Any, annotation: Any) -> bool | None:
    """Whether `value` fits a simple annotation; None when the annotation is too complex to judge."""
    if annotation is inspect.Parameter.empty or annotation is Any:
        return None
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        verdicts = [_type_ok(value, a) for a in typing.get_args(annotation)]
        if any(v is True for v in verdicts):
            return True
        return None if any(v is None for v in verdicts) else False
    if annotation is type(None) or annotation is None:
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation in (bool, str):
        return isinstance(value, annotation)
    if origin in (list, tuple) or annotation in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    return None


def _describe_annotation(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def check_options(
    factory: Callable[..., Any],
    options: dict[str, Any],
    locate: Callable[[str], str],
    injected: Iterable[str] = (),
) -> dict[str, Any]:
    """Check `options` against `factory`'s signature; return them with the defaults filled in.

    `locate(key)` names an option's place for messages (`line 4: model.hidden_size`);
    `injected` names arguments the pipeline passes itself (e.g. `vocab_size`, `rng`).
    """
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return dict(options)
    try:
        hints = typing.get_type_hints(factory.__init__ if inspect.isclass(factory) else factory)
    except Exception:
        hints = {}
    injected = set(injected)
    params = {n: p for n, p in sig.parameters.items() if n not in injected}
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    named = [n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    for key in options:
        if key not in params and not accepts_any:
            raise ConfigError(
                f"{locate(key)}: unknown option{suggest(key, named)}; options: {', '.join(named) or 'none'}"
            )
    for name in named:
        p = params[name]
        if name not in options and p.default is inspect.Parameter.empty:
            raise ConfigError(f"{locate(name)}: missing required option")
        if name in options:
            annotation = hints.get(name, p.annotation)
            if _type_ok(options[name], annotation) is False:
                raise ConfigError(
                    f"{locate(name)}: expected {_describe_annotation(annotation)}, got {_show(options[name])}"
                )
    resolved = {}
    for name in named:
        if name in options:
            resolved[name] = options[name]
        elif _plain(params[name].default):
            resolved[name] = params[name].default
    resolved.update({k: v for k, v in options.items() if k not in resolved})
    return resolved


def _plain(value: Any) -> bool:
    """Whether a default can be written to YAML/JSON as is."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def dump(config: Mapping[str, Any]) -> str:
    """The configuration as YAML, sections in their natural order."""
    return yaml.safe_dump(dict(config), sort_keys=False, allow_unicode=True, default_flow_style=None)
