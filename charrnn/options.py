"""Options: named, typed, constrained fields, described once and checked by one checker.

Every set of options charrnn reads is described the same way: the pipeline's own sections, each
component's options (derived from its factory's signature), a plugin's own pipeline section, the
sweep file, the server's request body and a checkpoint's metadata. A description is a function or
class signature, or a dataclass, whose annotations carry the constraints::

    from typing import Annotated
    from charrnn.options import Range

    class VowelBoost:
        def __init__(
            self,
            boost: Annotated[float, Range(ge=0), "added to the vowels' logits"] = 1.0,
            temperature: Annotated[float, Range(gt=0, le=100), "divides the logits"] = 1.0,
        ) -> None: ...

`schema_of` turns such a signature into a `Schema`; `check` validates a mapping against it, fills
the defaults and raises `OptionError` (a `ConfigError`) worded the same way wherever the mapping
came from. The words name the place through a `locate` function that the caller supplies (a YAML
line, a command-line flag, a request field), so a mistake reads in the caller's terms. The same
`Schema` gives the reference tables of the documentation (`markdown`), so they cannot drift.

Constraints (items of `typing.Annotated` after the type): `Range` (bounds), `Choice` (allowed
values; `typing.Literal` works too), `FilePath` (a path the file system can take), `Check` (any
predicate with its wording), and a plain string (the one-line help).
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import os
import sys
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from charrnn.errors import ConfigError

__all__ = [
    "REQUIRED",
    "Check",
    "Choice",
    "Field",
    "FilePath",
    "OptionError",
    "Range",
    "Schema",
    "check",
    "check_path",
    "markdown",
    "schema_of",
    "show",
    "suggest",
]


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


#: the default of a field that has none: leaving it out is an error
REQUIRED: Any = _Required()

Locate = Callable[..., str]  # locate(*keys) -> a place for messages, e.g. "line 4: train.steps"


class OptionError(ConfigError):
    """A value that does not fit its description. `keys` is the path to it (as given to
    `locate`), `problem` the message without the place, so a caller can map the place to its own
    words (the server names the request field)."""

    def __init__(self, place: str, keys: Sequence[str] = (), problem: str | None = None) -> None:
        if problem is None:  # a plain message (code that re-raises `type(exc)(text)`)
            place, problem = "", place
        super().__init__(f"{place}: {problem}" if place else problem)
        self.place, self.keys, self.problem = place, tuple(keys), problem


# -- constraints ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Range:
    """Bounds of a number: `Range(ge=1)`, `Range(gt=0, le=100)`, `Range(ge=0, lt=1)`."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def ok(self, v: Any) -> bool:
        return (
            (self.ge is None or v >= self.ge)
            and (self.gt is None or v > self.gt)
            and (self.le is None or v <= self.le)
            and (self.lt is None or v < self.lt)
        )

    def describe(self) -> str:
        low = (f"[{_num(self.ge)}", self.ge) if self.ge is not None else (f"({_num(self.gt)}", self.gt)
        high = (f"{_num(self.le)}]", self.le) if self.le is not None else (f"{_num(self.lt)})", self.lt)
        if low[1] is not None and high[1] is not None:
            return f"in {low[0]}, {high[0]}"
        if low[1] is not None:
            return f">= {_num(self.ge)}" if self.ge is not None else f"> {_num(self.gt)}"
        if high[1] is not None:
            return f"<= {_num(self.le)}" if self.le is not None else f"< {_num(self.lt)}"
        return "any number"


@dataclass(frozen=True)
class Choice:
    """The allowed values; `names` shows them in messages when the values are not the names
    users type (YAML reads `off` as false)."""

    values: tuple[Any, ...]
    names: tuple[str, ...] = ()

    def __init__(self, *values: Any, names: Sequence[str] = ()) -> None:
        object.__setattr__(self, "values", tuple(values))
        object.__setattr__(self, "names", tuple(names))

    def ok(self, v: Any) -> bool:
        return any(v == c and type(v) is type(c) for c in self.values)

    def describe(self) -> str:
        shown = list(self.names) or [v if isinstance(v, str) else show_plain(v) for v in self.values]
        return "one of " + ", ".join(shown)


@dataclass(frozen=True)
class FilePath:
    """A path that the file system can take (no NUL byte, no name longer than it allows).

    `reserve`: bytes the last name must leave for files named after it (`.metrics.jsonl`);
    `file`: the path must name a file, not `.`, `..` or a folder ending in `/`.
    """

    reserve: int = 0
    file: bool = False


@dataclass(frozen=True)
class Check:
    """Any other rule: `Check(lambda v: v != "", "not empty")` reads "must be not empty, got ''"."""

    ok: Callable[[Any], bool]
    must: str


# -- fields and schemas -----------------------------------------------------------------------


@dataclass(frozen=True)
class Field:
    """One named option: its annotation (a type, a union, `list[...]`, a nested `Schema` or
    dataclass), its default (`REQUIRED` for none), its constraints and its one-line help."""

    name: str
    annotation: Any = Any
    default: Any = REQUIRED
    constraints: tuple[Any, ...] = ()
    help: str = ""

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def describe(self) -> str:
        """What the field takes, for messages and tables: `an integer or null`."""
        return describe(self.annotation)

    def rules(self) -> str:
        """The constraints in words, for tables: `>= 1`, `one of fifo, asha`."""
        return "; ".join(_rule_words(self.annotation, self.constraints))


@dataclass(frozen=True)
class Schema:
    """An ordered set of fields; `open` accepts keys beyond them (a factory taking `**kwargs`)."""

    fields: Mapping[str, Field]
    open: bool = False
    name: str = ""
    doc: str = ""

    def __iter__(self):
        return iter(self.fields.values())

    def __contains__(self, key: object) -> bool:
        return key in self.fields

    def __getitem__(self, key: str) -> Field:
        return self.fields[key]

    def names(self) -> list[str]:
        return list(self.fields)

    def defaults(self) -> dict[str, Any]:
        """The defaults that are plain values (YAML and JSON can hold them)."""
        out = {}
        for f in self:
            sub = _section_of(f.annotation)
            if sub is not None and not plain(f.default):
                out[f.name] = sub.defaults()
            elif not f.required and plain(f.default):
                out[f.name] = _copy(f.default)
        return out

    def replace(self, name: str, **changes: Any) -> Schema:
        """This schema with one field changed (a server tightening a range to its own limit)."""
        fields = dict(self.fields)
        fields[name] = dataclasses.replace(fields[name], **changes)
        return dataclasses.replace(self, fields=fields)

    def without(self, *names: str) -> Schema:
        return dataclasses.replace(self, fields={k: f for k, f in self.fields.items() if k not in names})

    def merged(self, other: Schema) -> Schema:
        """Both schemas' fields (this one's first); `other`'s win on a shared name."""
        return dataclasses.replace(self, fields={**self.fields, **other.fields}, open=self.open or other.open)


_SCHEMAS: dict[Any, Schema] = {}


def schema_of(obj: Any, *, skip: Iterable[str] = ()) -> Schema:
    """The schema that a dataclass, a class's `__init__` or a function's signature describes.

    Annotations may carry constraints through `typing.Annotated`; parameters without an
    annotation take anything. Names in `skip` are arguments the caller passes itself (a
    model's `vocab_size` and `rng`). The result is cached per object.
    """
    if isinstance(obj, Schema):
        return obj.without(*skip)
    skip = tuple(skip)
    key = (obj, skip)
    try:
        return _SCHEMAS[key]
    except (KeyError, TypeError):
        pass
    schema = _build_schema(obj, skip)
    try:
        _SCHEMAS[key] = schema
    except TypeError:  # an unhashable callable: not cached
        pass
    return schema


def _build_schema(obj: Any, skip: tuple[str, ...]) -> Schema:
    doc = inspect.getdoc(obj) or ""
    summary = doc.split("\n\n", 1)[0].replace("\n", " ").strip()
    name = getattr(obj, "__name__", type(obj).__name__)
    target = obj.__init__ if inspect.isclass(obj) and not dataclasses.is_dataclass(obj) else obj
    try:
        hints = _hints(target)
    except Exception:  # annotations that do not resolve (a plugin's forward reference): take anything
        hints = {}
    fields: dict[str, Field] = {}
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            if f.name in skip or not f.init:
                continue
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = REQUIRED
            fields[f.name] = _field(f.name, hints.get(f.name, f.type), default)
        return Schema(fields, False, name, summary)
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):  # a builtin without a signature: anything goes
        return Schema({}, True, name, summary)
    open_ = False
    for p in sig.parameters.values():
        if p.kind is p.VAR_KEYWORD:
            open_ = True
            continue
        if p.kind is p.VAR_POSITIONAL or p.name in skip or p.name == "self":
            continue
        annotation = hints.get(p.name, p.annotation)
        default = REQUIRED if p.default is p.empty else p.default
        fields[p.name] = _field(p.name, Any if annotation is p.empty else annotation, default)
    return Schema(fields, open_, name, summary)


def _hints(target: Any) -> dict[str, Any]:
    """Resolved annotations, evaluated in the defining module: for a class, `get_type_hints` would
    otherwise evaluate them with the class body as globals, and a `Check(lambda ...)` written in an
    annotation could not see the module's functions."""
    if inspect.isclass(target):
        module = sys.modules.get(target.__module__)
        globalns = vars(module) if module is not None else {}
        hints: dict[str, Any] = {}
        for base in reversed(target.__mro__):
            hints.update(
                typing.get_type_hints(base, globalns=globalns, localns=dict(vars(base)), include_extras=True)
            )
        return hints
    return typing.get_type_hints(target, include_extras=True)


def _field(name: str, annotation: Any, default: Any) -> Field:
    base, constraints, help_ = _split(annotation)
    return Field(name, base, default, constraints, help_)


def _split(annotation: Any) -> tuple[Any, tuple[Any, ...], str]:
    """`Annotated[T, c1, "help", c2]` -> (T, (c1, c2), "help"); nested Annotated are flattened."""
    constraints: list[Any] = []
    help_ = ""
    while typing.get_origin(annotation) is typing.Annotated:
        base, *extra = typing.get_args(annotation)
        for item in extra:
            if isinstance(item, str):
                help_ = help_ or item
            else:
                constraints.append(item)
        annotation = base
    return annotation, tuple(constraints), help_


# -- the checker ------------------------------------------------------------------------------


def check(
    schema: Schema | Any,
    values: Mapping[str, Any] | None,
    locate: Locate | str = "",
    *,
    fill: bool = True,
    within: Sequence[str] = (),
) -> dict[str, Any]:
    """`values` checked against `schema`; with `fill`, the missing ones take their defaults.

    `locate(*keys)` names a key's place for messages (default: the dotted keys after a prefix
    string). Unknown keys, missing required ones, wrong types, non-finite numbers, integers
    beyond 64 bits, values out of range or choice, and paths no file system can take are
    `OptionError`s. Keys of an open schema that it does not describe pass unchecked.
    """
    schema = schema if isinstance(schema, Schema) else schema_of(schema)
    where = _locator(locate)
    at = tuple(within)  # the keys of this mapping in the whole document (a nested section's)
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        raise OptionError(where(*at), at, f"expected a mapping of options, got {show(values)}")
    for key in values:
        if not isinstance(key, str):
            raise OptionError(where(*at), at, f"the key {key!r} is not a name (a string)")
        if key not in schema.fields and not schema.open:
            raise OptionError(where(*at, key), (*at, key), unknown(key, schema.names()))
    out: dict[str, Any] = {}
    for f in schema:
        if f.name in values:
            out[f.name] = check_value(f, values[f.name], where, (*at, f.name))
        elif f.required:
            raise OptionError(where(*at, f.name), (*at, f.name), "required, but not given")
        elif fill:
            sub = _section_of(f.annotation)
            if isinstance(sub, Schema) and f.default is not None and not isinstance(f.default, Mapping):
                out[f.name] = check(sub, {}, where, within=(*at, f.name))
            elif plain(f.default):
                out[f.name] = _copy(f.default)
    out.update({k: v for k, v in values.items() if k not in out and k not in schema.fields})
    return out


def check_value(f: Field, value: Any, locate: Locate | str = "", keys: Sequence[str] | None = None) -> Any:
    """One value checked against one field (see `check`); returns it, nested sections filled."""
    where = _locator(locate)
    keys = tuple(keys) if keys is not None else (f.name,)
    return _check(f.annotation, f.constraints, value, where, keys)


def _check(annotation: Any, constraints: tuple[Any, ...], value: Any, where: Locate, keys: tuple) -> Any:
    place = where(*keys)

    def fail(problem: str) -> OptionError:
        return OptionError(place, keys, problem)

    options = _alternatives(annotation)
    fits = [a for a in options if _fits(a, value)]
    if not fits:
        raise fail(f"expected {describe(annotation)}, got {show(value)}")
    chosen = fits[0]
    base, inner, _ = _split(chosen)
    constraints = inner + constraints  # the chosen alternative's own rules first: they are the more precise
    _check_number(value, fail)
    sub = _section_schema(base)
    if isinstance(sub, Schema) and isinstance(value, Mapping):
        value = check(sub, value, where, within=keys)
    elif _is_list(base) and isinstance(value, (list, tuple)):
        item = _item_type(base)
        value = [_check(item, (), v, _indexed(where, keys, i), keys) for i, v in enumerate(value)]
    for c in constraints:
        if value is None and not isinstance(c, Check):
            continue
        if isinstance(c, Range) and _is_number(value) and not c.ok(value):
            raise fail(f"must be {c.describe()}, got {show(value)}")
        if isinstance(c, Choice) and not c.ok(value):
            names = list(c.names) or [str(v) for v in c.values]
            hint = suggest(str(value), names) if isinstance(value, str) else ""
            raise fail(f"must be {c.describe()}, got {show(value)}{hint}")
        if isinstance(c, Check) and not _holds(c, value):
            raise fail(f"must be {c.must}, got {show(value)}")
        if isinstance(c, FilePath) and isinstance(value, str):
            check_path(value, place, c.reserve, c.file, keys)
    if typing.get_origin(base) is typing.Literal and not Choice(*typing.get_args(base)).ok(value):
        c = Choice(*typing.get_args(base))
        hint = suggest(str(value), [str(v) for v in c.values]) if isinstance(value, str) else ""
        raise fail(f"must be {c.describe()}, got {show(value)}{hint}")
    return value


def _holds(c: Check, value: Any) -> bool:
    """A rule that cannot even look at the value (a length of a number) does not hold."""
    try:
        return bool(c.ok(value))
    except Exception:  # noqa: BLE001 - the value is of a kind the rule was not written for
        return False


def _indexed(where: Locate, keys: tuple, i: int) -> Locate:
    return lambda *k: f"{where(*keys)}[{i}]"


def _locator(locate: Locate | str) -> Locate:
    if callable(locate):
        return locate
    prefix = locate

    def where(*keys: str) -> str:
        dotted = ".".join(keys)
        return f"{prefix}{dotted}" if prefix or dotted else ""

    return where


def _check_number(value: Any, fail: Callable[[str], Exception]) -> None:
    """No option means inf or nan, and integers fit in 64 bits (NumPy and JSON need it)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise fail(f"expected a finite number, got {value}")
    if _is_int(value) and not -(2**63) <= value < 2**63:
        raise fail(f"{clip(str(value), 24)} is out of range (integers fit in 64 bits)")


# -- types ------------------------------------------------------------------------------------


def _alternatives(annotation: Any) -> list[Any]:
    base, _, _ = _split(annotation)
    if typing.get_origin(base) in (typing.Union, types.UnionType):
        return [a for arg in typing.get_args(base) for a in _alternatives(arg)]
    return [annotation]


def _fits(annotation: Any, value: Any) -> bool:
    """Whether `value` has the kind `annotation` asks for (its constraints are checked later)."""
    base, _, _ = _split(annotation)
    if base is Any or base is inspect.Parameter.empty or base is object:
        return True
    if base is None or base is type(None):
        return value is None
    if typing.get_origin(base) is typing.Literal:  # the kind fits; which value is checked later
        return any(type(value) is type(v) for v in typing.get_args(base))
    if base is float:
        return _is_number(value)
    if base is int:
        return _is_int(value)
    if base is bool:
        return isinstance(value, bool)
    if base is str:
        return isinstance(value, str)
    if _is_list(base):
        return isinstance(value, (list, tuple))
    if base is dict or typing.get_origin(base) in (dict, Mapping):
        return isinstance(value, Mapping)
    if isinstance(_section_schema(base), Schema):
        return isinstance(value, Mapping)
    return True  # another class, or an annotation too complex to judge: the factory decides


def _is_list(base: Any) -> bool:
    return base in (list, tuple) or typing.get_origin(base) in (list, tuple, Sequence)


def _item_type(base: Any) -> Any:
    args = typing.get_args(base)
    return args[0] if args else Any


def _section_schema(annotation: Any) -> Schema | None:
    base, _, _ = _split(annotation)
    if isinstance(base, Schema):
        return base
    if dataclasses.is_dataclass(base) and isinstance(base, type):
        return schema_of(base)
    return None


def _section_of(annotation: Any) -> Schema | None:
    """The nested section a field takes, also as one alternative of several (`Scheduler | str`)."""
    for a in _alternatives(annotation):
        found = _section_schema(a)
        if found is not None:
            return found
    return None


_NAMES = {
    bool: "true or false",
    int: "an integer",
    float: "a number",
    str: "a string",
    dict: "a mapping",
    list: "a list",
    tuple: "a list",
    type(None): "null",
}


def describe(annotation: Any) -> str:
    """An annotation in words: `an integer or null`, `a list of strings`, `one of fifo, asha`."""
    words: list[str] = []
    for a in _alternatives(annotation):
        base, _, _ = _split(a)
        if base is None:
            base = type(None)
        if base is Any or base is inspect.Parameter.empty or base is object:
            text = "anything"
        elif typing.get_origin(base) is typing.Literal:
            text = describe(type(typing.get_args(base)[0]))
        elif _is_list(base):
            item = _item_type(base)
            text = "a list" if item is Any else f"a list of {_plural(describe(item))}"
        elif base in _NAMES:
            text = _NAMES[base]
        elif typing.get_origin(base) in (dict, Mapping) or isinstance(_section_schema(base), Schema):
            text = "a mapping"
        else:
            text = getattr(base, "__name__", None) or str(base).replace("typing.", "")
        if text not in words:
            words.append(text)
    return " or ".join(words)


def _plural(words: str) -> str:
    table = {
        "an integer": "integers",
        "a number": "numbers",
        "a string": "strings",
        "a mapping": "mappings",
        "true or false": "true/false values",
    }
    return table.get(words, words)


def _rule_words(annotation: Any, constraints: tuple[Any, ...]) -> list[str]:
    """The constraints of a field in words: its own, then those inside its alternatives."""
    found = list(constraints)
    for a in _alternatives(annotation):
        base, inner, _ = _split(a)
        found.extend(inner)
        if typing.get_origin(base) is typing.Literal:
            found.append(Choice(*typing.get_args(base)))
        if _is_list(base):
            item, item_rules, _ = _split(_item_type(base))
            found.extend(item_rules)
            if typing.get_origin(item) is typing.Literal:
                found.append(Choice(*typing.get_args(item)))
    out: list[str] = []
    for c in found:
        if isinstance(c, (Range, Choice)):
            words = c.describe()
        elif isinstance(c, Check):
            words = c.must
        elif isinstance(c, FilePath):
            words = "a file path" if c.file else "a path"
        else:
            continue
        if words not in out:
            out.append(words)
    return out


# -- words shared by every message ------------------------------------------------------------


def suggest(name: str, known: Iterable[str]) -> str:
    """` (did you mean 'x'?)` for a close match, else an empty string."""
    known = list(known)
    folded = {k.lower().replace("_", "-"): k for k in known}
    close = difflib.get_close_matches(name.lower().replace("_", "-"), list(folded), n=1, cutoff=0.6)
    return f" (did you mean {folded[close[0]]!r}?)" if close else ""


def unknown(key: str, known: Sequence[str]) -> str:
    """The words for a key no description has: the same for a YAML key, an option, a field."""
    return f"unknown key{suggest(key, known)}; known keys: {', '.join(known) or 'none'}"


def show(value: Any) -> str:
    """A value as a message shows it: YAML's words for booleans and null, short reprs."""
    if isinstance(value, bool) or value is None:
        return show_plain(value)
    if isinstance(value, (dict, list)):
        return f"a {'mapping' if isinstance(value, dict) else 'list'} {clip(repr(value), 60)}"
    return clip(repr(value), 60)


def show_plain(value: Any) -> str:
    if value is True:
        return "true"
    if value is False:
        return "false"
    if value is None:
        return "null"
    return str(value) if isinstance(value, (int, float)) else repr(value)


def clip(text: str, most: int = 40) -> str:
    """`text` cut to `most` characters for a message."""
    return text if len(text) <= most else text[:most] + "..."


def _num(v: float | None) -> str:
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e16:
        return str(int(v))
    return f"{v:g}" if isinstance(v, float) else str(v)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def plain(value: Any) -> bool:
    """Whether a value can be written to YAML/JSON as it is (a default worth showing)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and plain(v) for k, v in value.items())
    return False


def _copy(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_copy(v) for v in value]
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    return value


# -- paths ------------------------------------------------------------------------------------


def check_path(path: str, place: str, reserve: int = 0, file: bool = False, keys: Sequence[str] = ()) -> str:
    """Refuse a path no system call can take: a NUL byte, or a name longer than the file system allows.

    Checked where the options are read, so a bad `train.checkpoint` fails before training, not
    at the first save.
    """

    def fail(problem: str) -> OptionError:
        return OptionError(place, keys, problem)

    if "\0" in path:
        raise fail(f"a path cannot contain a NUL byte, got {path!r}")
    if file and (Path(path).name in ("", ".", "..") or path.endswith(("/", os.sep))):
        raise fail(f"expected a file path, got the folder {path!r}")
    limit = _name_max()
    parts = Path(path).parts
    for i, part in enumerate(parts):
        try:
            size = len(os.fsencode(part))
        except UnicodeEncodeError:
            raise fail(f"the path {path!r} cannot be encoded for the file system") from None
        room = limit - (reserve if i == len(parts) - 1 else 0)
        if size > room:
            raise fail(
                f"the name {clip(part)!r} is {size} bytes long; the file system allows {room}"
                + (f" ({limit} less {reserve} for the files named after it)" if room < limit else "")
            )
    return path


def _name_max() -> int:
    try:
        return min(os.pathconf(".", "PC_NAME_MAX"), 255)
    except (OSError, ValueError, AttributeError):  # no pathconf (Windows) or no answer
        return 255


# -- reference tables -------------------------------------------------------------------------


def markdown(schema: Schema, prefix: str = "") -> str:
    """The schema as a Markdown table: key, type, default, rules, help (nested sections flattened)."""
    rows = ["| key | type | default | rules | description |", "| --- | --- | --- | --- | --- |"]
    rows.extend(_rows(schema, prefix))
    return "\n".join(rows)


def _rows(schema: Schema, prefix: str) -> list[str]:
    out = []
    for f in schema:
        sub = _section_of(f.annotation)
        key = f"{prefix}{f.name}"
        if sub is not None:
            out.extend(_rows(sub, key + "."))
            continue
        default = "required" if f.required else f"`{show_plain(f.default)}`" if plain(f.default) else "—"
        if plain(f.default) and isinstance(f.default, (list, dict, str)):
            default = f"`{_yaml_inline(f.default)}`"
        cells = [f"`{key}`", f.describe(), default, f.rules(), f.help]
        out.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return out


def _yaml_inline(value: Any) -> str:
    import json

    return json.dumps(value, ensure_ascii=False)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ").replace("<", "&lt;")
