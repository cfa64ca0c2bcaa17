"""Reading, overriding and validating pipeline configurations.

A configuration is a plain dict (as YAML gives it). `load_config` parses a file keeping the
line of every key, `apply_overrides` applies `--set KEY.PATH=VALUE` items, `validate` checks
the pipeline's own sections against their descriptions (`Train`, `Generate`, `Evaluate` and
the top-level keys of `Pipeline`, checked by `charrnn.options`) and fills the defaults.
Component sections (`corpus`, `model`, `optimizer`, `sampler`, `schedule`) are checked against
the factory their `type` names (`component_schema`), and a plugin's own section against the
description it registered (`charrnn_section`), by the same checker.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn

import yaml

from charrnn import options as opt
from charrnn.errors import ConfigError
from charrnn.files import RunFiles
from charrnn.options import Check, Choice, FilePath, Range

Lines = dict[tuple[str, ...], int | str]  # a str: how the value was given, e.g. a command-line flag

STAGES = ("train", "evaluate", "generate")
COMPONENTS = ("corpus", "model", "optimizer", "sampler", "schedule")

Stage = Literal["train", "evaluate", "generate"]
_NOT_EMPTY = Check(lambda v: v != "", "a non-empty string")
#: a stage's `checkpoint`: the model it loads when it runs without a train stage before it
StageModel = Annotated[
    str | None,
    FilePath(file=True),
    _NOT_EMPTY,
    "the model to load when no train stage runs before (else train.checkpoint)",
]


@dataclass
class Train:
    """The `train` stage: steps, batches, reports, checkpoints, resume and fine-tuning."""

    steps: Annotated[
        int | None, Range(ge=1), "optimizer steps from the start of the run; null trains until Ctrl+C"
    ] = 1000
    batch_size: Annotated[int, Range(ge=1), "parallel streams over the corpus"] = 16
    seq_length: Annotated[int, Range(ge=1), "characters per stream per step (truncated BPTT length)"] = 50
    sample_every: Annotated[
        int | None, Range(ge=1), "report loss, validation loss, chars/s and a sample every N steps; null: off"
    ] = 100
    sample_length: Annotated[int, Range(ge=0), "characters in each training-time sample"] = 200
    save_every: Annotated[
        int | None, Range(ge=1), "also save the checkpoint every N steps; null: at the end only"
    ] = None
    # the files named after it (`.metrics.jsonl`, `.best.npz`) need RunFiles.NAME_RESERVE bytes more
    checkpoint: Annotated[
        str, FilePath(reserve=RunFiles.NAME_RESERVE, file=True), _NOT_EMPTY, "where the checkpoint is written"
    ] = "runs/default/final_model.npz"
    resume: Annotated[
        bool | str,
        FilePath(file=True),
        _NOT_EMPTY,
        "true (or a checkpoint path) continues exactly from a checkpoint",
    ] = False
    init_from: Annotated[
        str | None,
        FilePath(file=True),
        _NOT_EMPTY,
        "start from a checkpoint's weights (fine-tuning), with a fresh optimizer and step",
    ] = None
    eval_every: Annotated[
        int | None,
        Range(ge=1),
        "validation loss every N steps over the whole split; null: at each sample_every report",
    ] = None
    patience: Annotated[
        int | None, Range(ge=1), "early stopping: stop after N evaluations without a better validation loss"
    ] = None
    keep_best: Annotated[bool, "keep the best model by validation loss in <checkpoint>.best.npz"] = True
    metrics: Annotated[bool, "append each report to <checkpoint>.metrics.jsonl (JSON lines)"] = True
    plot: Annotated[bool, "redraw <checkpoint>.loss.svg at each report"] = True
    distributed: Annotated[
        str | bool,
        Choice("auto", "off", "mpi", False, names=("auto", "off", "mpi")),
        "auto: data-parallel over MPI when started under mpiexec; off: one process; mpi: require MPI",
    ] = "auto"


@dataclass
class Generate:
    """The `generate` stage: text from the trained (or a saved) model."""

    num_chars: Annotated[int, Range(ge=0), "characters to generate after the seed text"] = 1000
    seed_text: Annotated[str, "text that primes the hidden state; it is printed first"] = "The "
    checkpoint: StageModel = None
    num_samples: Annotated[int, Range(ge=1), "independent samples, generated at once as parallel streams"] = 1
    stop: Annotated[
        list[Annotated[str, _NOT_EMPTY]] | Annotated[str, _NOT_EMPTY],
        "a string or a list: a sample ends just before the first of them it produces",
    ] = field(default_factory=list)
    stream: Annotated[bool, "print the (first) sample as it is produced"] = False
    separator: Annotated[str, "printed between samples"] = "\n---\n"


@dataclass
class Evaluate:
    """The `evaluate` stage: loss on a text beside unigram and bigram baselines."""

    path: Annotated[
        str | None, FilePath(file=True), _NOT_EMPTY, "the text to score; null: the validation split"
    ] = None
    checkpoint: StageModel = None


@dataclass
class Pipeline:
    """A pipeline file's own keys; the component sections are described by their factories."""

    seed: Annotated[
        int, Range(ge=0), "the one seed of the run (initialisation, batches, dropout, samples)"
    ] = 42
    plugins: Annotated[
        list[Annotated[str, Check(bool, "a module name or .py path"), FilePath()]],
        "plugin modules to load first: import names or paths to .py files",
    ] = field(default_factory=list)
    stages: Annotated[
        list[Stage] | Stage,
        Check(lambda v: v != [], "a non-empty list of stages"),
        "the stages to run, in order",
    ] = field(default_factory=lambda: ["train", "generate"])
    train: Train = field(default_factory=Train)
    generate: Generate = field(default_factory=Generate)
    evaluate: Evaluate = field(default_factory=Evaluate)


@dataclass
class CorpusSplit:
    """Options of the `corpus` section that the pipeline, not the loader, takes (any loader)."""

    val_fraction: Annotated[
        float, Range(ge=0, lt=1), "fraction taken from the end of the text for validation"
    ] = 0.0


PIPELINE = opt.schema_of(Pipeline)
#: options of component sections that the pipeline, not the factory, consumes
PIPELINE_COMPONENT_OPTIONS: dict[str, opt.Schema] = {"corpus": opt.schema_of(CorpusSplit)}
#: component options holding a file path or glob, checked like the pipeline's paths (also un-annotated)
PATH_OPTIONS = ("path", "glob")
#: arguments the pipeline passes to factories itself, not options a user sets
INJECTED = ("vocab_size", "rng")


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
        value = opt.show(constructor.construct_object(key))
    except (yaml.YAMLError, ValueError):
        value = "not a string"
    return f"YAML reads this key as {value}, not as a name; quote it: {opt.clip(key.value)!r}"


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
                raise ConfigError(f"--set {opt.clip(item)!r}: the value is not valid YAML: {exc}") from None
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


def validate(
    raw: dict[str, Any],
    lines: Lines | None = None,
    origin: str = "",
    sections: Mapping[str, opt.Schema] | None = None,
) -> dict[str, Any]:
    """Check the pipeline's own keys and fill their defaults; component options stay as given.

    `sections` are the pipeline sections that plugins own (`charrnn_section`), by name.
    """
    lines = lines or {}
    sections = dict(sections or {})
    _check_keys(raw, (), lines, origin)
    known = [*PIPELINE.names(), *COMPONENTS, *sections]
    for key in raw:
        if key not in known:
            raise opt.OptionError(where([str(key)], lines, origin), (str(key),), opt.unknown(str(key), known))

    def locate(*keys: str) -> str:
        return where(keys, lines, origin)

    own = {k: v for k, v in raw.items() if k in PIPELINE}
    config = opt.check(
        PIPELINE, {k: ({} if v is None and k in SECTIONS else v) for k, v in own.items()}, locate
    )
    if isinstance(config["stages"], str):
        config["stages"] = [config["stages"]]  # `stages: train` is short for `stages: [train]`
    if isinstance(config["generate"]["stop"], str):
        config["generate"]["stop"] = [config["generate"]["stop"]]
    for kind in COMPONENTS:
        config[kind] = component_section(kind, raw.get(kind), lines, origin)
    for name, schema in sections.items():
        value = raw.get(name)
        config[name] = opt.check(schema, {} if value is None else value, lambda *k, n=name: locate(n, *k))
    return config


def plugins_of(raw: Mapping[str, Any], lines: Lines | None = None, origin: str = "") -> list[str]:
    """The `plugins` list of a raw pipeline, checked: it is read before anything else, since the
    plugins it names may own sections of the same file."""
    _check_keys(raw, (), lines or {}, origin)
    if raw.get("plugins") is None:
        return []
    return opt.check_value(PIPELINE["plugins"], raw["plugins"], lambda *k: where(k, lines or {}, origin))


#: the pipeline's own sections (mappings), as opposed to its top-level values
SECTIONS = ("train", "generate", "evaluate")


def component_section(kind: str, section: Any, lines: Lines, origin: str) -> dict[str, Any]:
    """A component section with its `type` (the default component's when none is named) and the
    pipeline-owned options checked; the factory's options are checked once the name resolves."""
    if section is None:
        section = {}
    if isinstance(section, str):
        section = {"type": section}  # `sampler: greedy` is short for `sampler: {type: greedy}`
    if not isinstance(section, dict):
        raise opt.OptionError(
            where([kind], lines, origin),
            (kind,),
            f"expected a mapping with a 'type', got {opt.show(section)}",
        )
    if "type" in section and not (isinstance(section["type"], str) and section["type"]):
        raise opt.OptionError(
            where([kind, "type"], lines, origin),
            (kind, "type"),
            f"expected a component name, got {opt.show(section['type'])}",
        )
    merged = dict(section) if section else dict(DEFAULT_COMPONENTS[kind])
    merged.setdefault("type", DEFAULT_COMPONENTS[kind]["type"])
    extra = PIPELINE_COMPONENT_OPTIONS.get(kind)
    if extra is not None:
        given = {k: merged[k] for k in extra.names() if k in merged}
        merged.update(opt.check(extra, given, lambda *k: where((kind, *k), lines, origin)))
    return merged


def component_schema(factory: Callable[..., Any], kind: str) -> opt.Schema:
    """The options a component's factory takes: its signature, less what the pipeline passes itself.

    An un-annotated `path` or `glob` option is checked as a path, as the builtin loaders' are.
    """
    schema = opt.schema_of(factory, skip=INJECTED if kind == "model" else ())
    for name in PATH_OPTIONS:
        if name in schema and not any(isinstance(c, FilePath) for c in schema[name].constraints):
            schema = schema.replace(name, constraints=(*schema[name].constraints, FilePath()))
    return schema


def check_component(
    factory: Callable[..., Any], kind: str, options: dict[str, Any], locate: Callable[..., str]
) -> dict[str, Any]:
    """A component's options checked against its factory; the defaults filled in (plain ones)."""
    return opt.check(component_schema(factory, kind), options, locate)


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


def dump(config: Mapping[str, Any]) -> str:
    """The configuration as YAML, sections in their natural order."""
    return yaml.safe_dump(dict(config), sort_keys=False, allow_unicode=True, default_flow_style=None)
