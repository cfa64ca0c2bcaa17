"""The one option description and its checker (`charrnn.options`)."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal

import pytest

from charrnn import options as opt
from charrnn.options import REQUIRED, Check, Choice, FilePath, OptionError, Range, check, schema_of


@dataclasses.dataclass
class Inner:
    depth: Annotated[int, Range(ge=1, le=3), "how deep"] = 1


@dataclasses.dataclass
class Outer:
    """An example section: its first line is the schema's summary.

    More text that the summary leaves out.
    """

    count: Annotated[int | None, Range(ge=1), "how many; null: no limit"] = 10
    rate: Annotated[float, Range(gt=0, lt=1)] = 0.5
    mode: Literal["fast", "slow"] = "fast"
    names: list[Annotated[str, Check(bool, "a non-empty string")]] = dataclasses.field(default_factory=list)
    inner: Inner = dataclasses.field(default_factory=Inner)
    path: Annotated[str, FilePath(file=True)] = "out.npz"
    needed: str = "x"


def problem(schema: Any, values: dict[str, Any], prefix: str = "") -> str:
    with pytest.raises(OptionError) as info:
        check(schema, values, prefix)
    return str(info.value)


def test_defaults_fill_in_and_nested_sections_too():
    assert check(Outer, {"count": None}) == {
        "count": None,
        "rate": 0.5,
        "mode": "fast",
        "names": [],
        "inner": {"depth": 1},
        "path": "out.npz",
        "needed": "x",
    }
    assert check(Outer, {"inner": {"depth": 3}})["inner"] == {"depth": 3}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"cuont": 1},
            "sec.cuont: unknown key (did you mean 'count'?); known keys: count, rate, mode, names, inner, path, needed",
        ),
        ({"count": 0}, "sec.count: must be >= 1, got 0"),
        ({"count": "3"}, "sec.count: expected an integer or null, got '3'"),
        ({"count": True}, "sec.count: expected an integer or null, got true"),
        ({"count": 2.0}, "sec.count: expected an integer or null, got 2.0"),
        ({"count": 2**64}, "sec.count: 18446744073709551616 is out of range (integers fit in 64 bits)"),
        ({"rate": 1}, "sec.rate: must be in (0, 1), got 1"),
        ({"rate": float("nan")}, "sec.rate: expected a finite number, got nan"),
        ({"mode": "fats"}, "sec.mode: must be one of fast, slow, got 'fats' (did you mean 'fast'?)"),
        ({"mode": 3}, "sec.mode: expected a string, got 3"),
        ({"names": ["a", ""]}, "sec.names[1]: must be a non-empty string, got ''"),
        ({"names": "a"}, "sec.names: expected a list of strings, got 'a'"),
        ({"inner": {"depth": 4}}, "sec.inner.depth: must be in [1, 3], got 4"),
        ({"inner": {"dpeth": 1}}, "sec.inner.dpeth: unknown key (did you mean 'depth'?); known keys: depth"),
        ({"inner": 3}, "sec.inner: expected a mapping, got 3"),
        ({"path": "a\0b"}, "sec.path: a path cannot contain a NUL byte, got 'a\\x00b'"),
        ({"path": "runs/"}, "sec.path: expected a file path, got the folder 'runs/'"),
        (
            {"path": "x" * 300},
            "sec.path: the name 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx...' is 300 bytes long; the file system allows 255",
        ),
    ],
)
def test_every_mistake_has_one_wording(values, message):
    assert problem(Outer, values, "sec.") == message


def test_the_error_knows_its_keys_for_callers_that_name_places_their_own_way():
    with pytest.raises(OptionError) as info:
        check(Outer, {"inner": {"depth": 0}}, lambda *keys: "/".join(keys))
    assert info.value.keys == ("inner", "depth")
    assert info.value.problem == "must be in [1, 3], got 0"
    assert str(info.value) == "inner/depth: must be in [1, 3], got 0"
    assert isinstance(info.value, opt.ConfigError)


def test_a_signature_is_a_schema_and_required_means_no_default():
    def factory(
        vocab_size: int,
        rng: object,
        width: Annotated[int, Range(ge=2), "columns"],
        *,
        tag: str = "t",
        **rest: Any,
    ) -> None:
        """Build a thing."""

    schema = schema_of(factory, skip=("vocab_size", "rng"))
    assert schema.names() == ["width", "tag"] and schema.open and schema.doc == "Build a thing."
    assert schema["width"].default is REQUIRED and schema["width"].help == "columns"
    assert problem(schema, {}) == "width: required, but not given"
    assert check(schema, {"width": 2, "anything": [1]}) == {"width": 2, "tag": "t", "anything": [1]}


def test_unannotated_and_unknown_annotations_take_anything_but_no_inf():
    class Thing:
        def __init__(self, a=1, b: Unresolvable = None) -> None:  # noqa: F821
            pass

    schema = schema_of(Thing)
    assert check(schema, {"a": "x", "b": [1, 2]}) == {"a": "x", "b": [1, 2]}
    assert problem(schema, {"a": float("inf")}) == "a: expected a finite number, got inf"


def test_choice_shows_names_users_type():
    f = opt.Field("d", str | bool, "auto", (Choice("auto", "off", False, names=("auto", "off")),))
    assert opt.check_value(f, False) is False
    with pytest.raises(
        OptionError, match=r"^d: must be one of auto, off, got 'of' \(did you mean 'off'\?\)$"
    ):
        opt.check_value(f, "of")


def test_ranges_in_words():
    assert Range(ge=1).describe() == ">= 1"
    assert Range(gt=0).describe() == "> 0"
    assert Range(le=5).describe() == "<= 5"
    assert Range(ge=0, lt=1).describe() == "in [0, 1)"
    assert Range(gt=0, le=100.0).describe() == "in (0, 100]"
    assert Range(gt=0, le=9223372036.0).describe() == "in (0, 9223372036]"


def test_suggestions_fold_case_and_separators():
    assert opt.suggest("UTF8", ["utf-8", "bytes"]) == " (did you mean 'utf-8'?)"
    assert opt.suggest("batch-size", ["batch_size", "steps"]) == " (did you mean 'batch_size'?)"
    assert opt.suggest("zzz", ["batch_size"]) == ""


def test_reference_table_comes_from_the_description():
    table = opt.markdown(schema_of(Outer), "sec.")
    lines = table.splitlines()
    assert lines[0] == "| key | type | default | rules | description |"
    assert "| `sec.count` | an integer or null | `10` | >= 1 | how many; null: no limit |" in lines
    assert "| `sec.inner.depth` | an integer | `1` | in [1, 3] | how deep |" in lines  # nested, flattened
    assert '| `sec.mode` | a string | `"fast"` | one of fast, slow |  |' in lines
    assert len(lines) == 2 + 7  # a row per key, none left out


def test_replace_tightens_a_field():
    schema = schema_of(Outer).replace("count", constraints=(Range(ge=1, le=5),))
    assert problem(schema, {"count": 6}) == "count: must be in [1, 5], got 6"
    assert check(schema_of(Outer), {"count": 6})["count"] == 6  # the original is untouched


def test_the_reference_lists_every_key_and_every_builtin_option(capsys):
    from charrnn import config as cfg
    from charrnn.cli import main
    from charrnn.plugins import Registry, get_plugin_manager

    assert main(["options"]) == 0
    text = capsys.readouterr().out
    for name, field in cfg.PIPELINE.fields.items():
        section = opt._section_schema(field.annotation)
        keys = [f"{name}.{k}" for k in section.names()] if section else [name]
        for key in keys:
            assert f"| `{key}` |" in text, key
    registry = Registry(get_plugin_manager(load_entrypoints=False))
    for kind in ("corpus", "model", "optimizer", "sampler", "schedule"):
        for name, component in registry.components[kind].items():
            block = text.split(f"`{kind}: {{type: {name}}}`", 1)[1].split("\n### ", 1)[0]
            keys = cfg.component_schema(component.factory, kind).names()
            rows = [line for line in block.splitlines() if line.startswith("| `")]
            assert [row.split("`")[1] for row in rows] == [f"{kind}.{key}" for key in keys], (kind, name)
