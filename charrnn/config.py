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
import math
import os
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

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
    path: int | None = None  # a file path: bytes its last component must leave for derived names

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
        # 16 bytes: `.metrics.jsonl` and `.best.npz.tmp` replace `.npz` in files named after it
        "checkpoint": Opt((str,), "runs/default/final_model.npz", bool, "must not be empty", path=16),
        "resume": Opt((bool, str), False, lambda v: v != "", "must be true, false or a path", path=0),
        "init_from": Opt((str,) + NONE, None, lambda v: v != "", "must be a checkpoint path or null", path=0),
        "eval_every": Opt(INT + NONE, None, _positive, "must be > 0 (or null: at each sample_every)"),
        "patience": Opt(INT + NONE, None, _positive, "must be > 0 (or null: no early stopping)"),
        "keep_best": Opt((bool,), True),
        "metrics": Opt((bool,), True),
        "plot": Opt((bool,), True),
        "distributed": Opt(
            (str, bool), "auto", lambda v: v in ("auto", "off", "mpi", False), "must be auto, off or mpi"
        ),
    },
    "generate": {
        "num_chars": Opt(INT, 1000, _non_negative, "must be >= 0"),
        "seed_text": Opt((str,), "The "),
        "checkpoint": Opt((str,) + NONE, None, lambda v: v != "", "must be a path or null", path=0),
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
        "path": Opt(
            (str,) + NONE, None, lambda v: v != "", "must be a path or null (the validation split)", path=0
        ),
        "checkpoint": Opt((str,) + NONE, None, lambda v: v != "", "must be a path or null", path=0),
    },
}

#: options of component sections that the pipeline, not the factory, consumes
PIPELINE_COMPONENT_OPTIONS: dict[str, dict[str, Opt]] = {
    "corpus": {"val_fraction": Opt((float, int), 0.0, _fraction, "must be in [0, 1)")},
}

#: component options holding a file path or glob, checked like the pipeline's paths
PATH_OPTIONS = ("path", "glob")

#: YAML nesting (mappings and lists, aliases followed) beyond any real pipeline, well within recursion
MAX_DEPTH = 64
#: values a YAML text may expand to through aliases (a "billion laughs" text stops here)
MAX_VALUES = 100_000

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
    """SafeLoader that also reads `1e-3` as a float (YAML 1.1 wants `1.0e-3`; users write `1e-3`),
    and stops nesting at `MAX_DEPTH` (the composer recurses once per level: Python's limit is near).
    """

    depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH + 1:  # +1: the scalars inside the deepest collection
                mark = self.peek_event().start_mark
                raise yaml.composer.ComposerError(None, None, f"nesting deeper than {MAX_DEPTH} levels", mark)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


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
    """YAML text as Python values, with `parse_yaml`'s checks (ConfigError without an origin)."""
    return parse_yaml(text)[0]


def suggest(name: str, known: Iterable[str]) -> str:
    """` (did you mean 'x'?)` for a close match, else an empty string."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def parse_yaml(text: str, origin: str = "") -> tuple[Any, Lines]:
    """Parse YAML safely and record the 1-based line of every mapping key.

    Refused with the line: nesting deeper than `MAX_DEPTH`, recursive aliases, more than
    `MAX_VALUES` values once aliases expand, keys that YAML reads as anything but a string
    (`no:` is false in YAML 1.1), duplicate keys and integers too long to convert.
    """
    try:
        loader = _Loader(text)
        try:
            node = loader.get_single_node()
            lines = _Checker(origin).check(node)
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f"line {mark.line + 1}: " if mark is not None else ""
        problem = exc.problem or exc.context or "invalid YAML"
        raise ConfigError(f"{origin}{line}malformed YAML: {problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{origin}malformed YAML: {exc}") from None
    except ValueError as exc:  # a value the checks above let through and Python cannot convert
        raise ConfigError(f"{origin}malformed YAML: {exc}") from None
    return data, lines


_STR, _MERGE, _INT = (f"tag:yaml.org,2002:{t}" for t in ("str", "merge", "int"))


class _Checker:
    """One pass over a composed YAML document: key lines, key types, duplicates, aliases, sizes."""

    def __init__(self, origin: str) -> None:
        self.origin = origin
        self.lines: Lines = {}
        self.walked: set[int] = set()
        self.open: set[int] = set()  # nodes being measured: meeting one again is a recursive alias
        self.measured: dict[int, tuple[int, int]] = {}  # node -> (depth, values) with aliases expanded
        self.constructor = yaml.constructor.SafeConstructor()

    def fail(self, node: yaml.Node, path: tuple[str, ...], problem: str) -> NoReturn:
        place = f"{'.'.join(path)}: " if path else ""
        raise ConfigError(f"{self.origin}line {node.start_mark.line + 1}: {place}{problem}")

    def check(self, node: yaml.Node | None) -> Lines:
        if node is not None:
            self.measure(node, 1, ())
            self.walk(node, ())
        return self.lines

    def measure(self, node: yaml.Node, level: int, path: tuple[str, ...]) -> tuple[int, int]:
        key = id(node)
        if key in self.open:
            self.fail(node, path, "recursive YAML alias (a value that contains itself)")
        if key not in self.measured:
            children = _children(node)
            if children and level > MAX_DEPTH:
                self.fail(node, path, f"nesting deeper than {MAX_DEPTH} levels (through aliases)")
            self.open.add(key)
            depth, values = 0, 1
            for child in children:
                d, n = self.measure(child, level + 1, path)
                depth, values = max(depth, d), values + n
                if values > MAX_VALUES:
                    self.fail(node, path, f"the YAML expands to more than {MAX_VALUES:,} values (aliases)")
            self.open.discard(key)
            self.measured[key] = (depth + 1 if children else 0, values)
        depth, values = self.measured[key]
        if level - 1 + depth > MAX_DEPTH:
            self.fail(node, path, f"nesting deeper than {MAX_DEPTH} levels (through aliases)")
        return depth, values

    def walk(self, node: yaml.Node, path: tuple[str, ...]) -> None:
        if id(node) in self.walked:  # an alias: its keys were recorded where it was defined
            return
        self.walked.add(id(node))
        if isinstance(node, yaml.ScalarNode) and node.tag == _INT:
            try:
                self.constructor.construct_yaml_int(node)
            except ValueError:
                self.fail(
                    node, path, f"the integer {node.value[:20]}... has {len(node.value)} digits, too many"
                )
        elif isinstance(node, yaml.SequenceNode):
            for item in node.value:
                self.walk(item, path)
        elif isinstance(node, yaml.MappingNode):
            first: dict[str, int] = {}
            for key, value in node.value:
                if key.tag == _MERGE:
                    self.walk(value, path)
                    continue
                if not isinstance(key, yaml.ScalarNode) or key.tag != _STR:
                    named = (*path, key.value) if isinstance(key, yaml.ScalarNode) else path
                    self.fail(key, named, _key_problem(key, self.constructor))
                line = key.start_mark.line + 1
                sub = (*path, key.value)
                if key.value in first:
                    self.fail(key, sub, f"duplicate key (first at line {first[key.value]})")
                first[key.value] = self.lines[sub] = line
                self.walk(value, sub)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return list(node.value) if isinstance(node, yaml.SequenceNode) else []


def _key_problem(key: yaml.Node, constructor: yaml.constructor.SafeConstructor) -> str:
    if not isinstance(key, yaml.ScalarNode):
        return f"a key must be a name, got a {'list' if isinstance(key, yaml.SequenceNode) else 'mapping'}"
    try:
        value = _show(constructor.construct_object(key))
    except (yaml.YAMLError, ValueError):
        value = "not a string"
    return f"YAML reads this key as {value}, not as a name; quote it: {_clip(key.value)!r}"


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
                value = parse_yaml(raw)[0] if raw.strip() else None
            except ConfigError as exc:
                raise ConfigError(f"--set {_clip(item)!r}: the value is not valid YAML: {exc}") from None
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
    check_number(value, place)
    if opt.check is not None and not opt.check(value):
        raise ConfigError(f"{place}: {opt.must}, got {_show(value)}")
    if opt.path is not None and isinstance(value, str):
        check_path(value, place, opt.path, file=True)
    return value


def check_number(value: Any, place: str) -> Any:
    """A number must be finite and an integer fit in 64 bits: no option means inf, nan or more."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{place}: expected a finite number, got {value}")
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
        raise ConfigError(f"{place}: {_clip(str(value), 24)} is out of range (integers fit in 64 bits)")
    return value


def check_path(path: str, place: str, reserve: int = 0, file: bool = False) -> str:
    """Refuse a path no system call can take: a NUL byte, or a name longer than the file system allows.

    Checked where the config is read, so a bad `train.checkpoint` fails before training, not
    at the first save. `reserve`: bytes the last name must leave for files named after it;
    `file`: the path must end in a file name (not `.`, `..` or `/`).
    """
    if "\0" in path:
        raise ConfigError(f"{place}: a path cannot contain a NUL byte, got {path!r}")
    if file and Path(path).name in ("", ".", ".."):
        raise ConfigError(f"{place}: expected a file path, got the folder {path!r}")
    limit = _name_max()
    parts = Path(path).parts
    for i, part in enumerate(parts):
        try:
            size = len(os.fsencode(part))
        except UnicodeEncodeError:
            raise ConfigError(f"{place}: the path {path!r} cannot be encoded for the file system") from None
        room = limit - (reserve if i == len(parts) - 1 else 0)
        if size > room:
            raise ConfigError(
                f"{place}: the name {_clip(part)!r} is {size} bytes long; the file system allows {room}"
                + (f" ({limit} less {reserve} for the files named after it)" if room < limit else "")
            )
    return path


def _clip(text: str, most: int = 40) -> str:
    """`text` cut to `most` characters for a message."""
    return text if len(text) <= most else text[:most] + "..."


def _name_max() -> int:
    try:
        return min(os.pathconf(".", "PC_NAME_MAX"), 255)
    except (OSError, ValueError, AttributeError):  # no pathconf (Windows) or no answer
        return 255


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
    _check_keys(raw, (), lines, origin)
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
        check_path(plugin, f"{where(['plugins'], lines, origin)}[{i}]")
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


def _check_keys(value: Any, path: tuple[str, ...], lines: Lines, origin: str, level: int = 1) -> None:
    """Keys must be names and nesting bounded, also in a dict handed to the API (YAML is checked as parsed)."""
    if isinstance(value, (dict, list, tuple)) and level > MAX_DEPTH:
        raise ConfigError(f"{where(path, lines, origin)}: nesting deeper than {MAX_DEPTH} levels")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ConfigError(f"{where(path, lines, origin)}: the key {key!r} is not a name (a string)")
            _check_keys(item, (*path, key), lines, origin, level + 1)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _check_keys(item, path, lines, origin, level + 1)


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


def _wants_float(annotation: Any) -> bool:
    """Whether an annotation takes floats; none of the builtin options means anything by inf or nan."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_wants_float(a) for a in typing.get_args(annotation))
    return annotation is float


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
            value = options[name]
            if _wants_float(annotation) or not isinstance(value, float):
                check_number(value, locate(name))
            if name in PATH_OPTIONS and isinstance(value, str):
                check_path(value, locate(name))
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
