"""Seeded fuzz of the command line: every variant exits 0 or 2 (1 for a plugin's own bug), a
failure is exactly one `error:` line, and no output is left half-written.

The keys come from `charrnn run --print-config` and the component options from `charrnn plugins`,
so a new option is fuzzed without editing this file. Variants run in-process through
`charrnn.cli.main` (a few are re-run through `python -m charrnn`), each in its own folder, under
a guard of GUARD_SECONDS and GUARD_BYTES of extra address space: a variant the code accepts and
then runs long or allocates without bound is a finding, reported like a traceback.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import traceback
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import yaml

from charrnn import checkpoint as ckpt_io
from charrnn.cli import main

pytestmark = pytest.mark.slow  # each family runs for seconds

SEED = 20261201
GUARD_SECONDS = 4.0
GUARD_BYTES = 2 << 30
TEXT = "the cat sat on the mat. a dog and a cat met by the log.\n" * 6

BASE = {
    "seed": 1,
    "corpus": {"type": "text", "path": "CORPUS", "val_fraction": 0.25},
    "model": {"type": "rnn", "hidden_size": 8},
    "optimizer": {"type": "adagrad"},
    "sampler": {"type": "temperature"},
    "stages": ["train", "evaluate", "generate"],
    "train": {
        "steps": 3,
        "batch_size": 2,
        "seq_length": 4,
        "sample_every": 2,
        "sample_length": 5,
        "checkpoint": "m.npz",
    },
    "generate": {"num_chars": 8, "seed_text": "th", "num_samples": 2},
}

#: YAML texts put in place of a value: wrong types and edge values
EDGES = [
    "0", "-1", "1", "2", "0.5", "-0.5", "1e300", ".inf", "-.inf", ".nan", "99999999999999999999999",
    "true", "false", "null", "''", "x", '"\\0"', "[]", "[1, x]", "{}", "{a: 1}", "x" * 300, "é",
    "!!binary aGVsbG8=", "2026-01-01", "[[[[1]]]]",
]  # fmt: skip


class Guarded(BaseException):
    """Raised by the time guard inside a variant (a BaseException: `except Exception` lets it out)."""


@dataclass
class Outcome:
    code: int | None
    out: str
    err: str
    crash: str | None = None
    problems: list[str] = field(default_factory=list)


@dataclass
class World:
    root: Path
    corpus: Path
    base: Path
    checkpoint: Path
    listing: list[dict]
    printed: dict
    counter: Iterator[int]

    def folder(self) -> Path:
        path = self.root / f"v{next(self.counter)}"
        path.mkdir()
        return path


def _vm_size() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        kb = next(line.split()[1] for line in f if line.startswith("VmSize:"))
    return int(kb) * 1024


def _show_warning(message, category, filename, lineno, file=None, line=None):
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def _on_alarm(signum, frame):
    raise Guarded("ran over its time guard")


def _summary(exc: BaseException) -> str:
    frames = [
        f for f in traceback.extract_tb(exc.__traceback__) if "/charrnn" in f.filename or "plug" in f.filename
    ]
    at = f"{Path(frames[-1].filename).name}:{frames[-1].lineno} ({frames[-1].name})" if frames else "?"
    text = " ".join(str(exc).split())[:160]
    return f"{type(exc).__name__} at {at}: {text}"


@contextlib.contextmanager
def _guard(seconds: float) -> Iterator[None]:
    handler = signal.signal(signal.SIGALRM, _on_alarm)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _vm_size() + GUARD_BYTES
    resource.setrlimit(
        resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard)
    )
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, handler)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def run_cli(argv: list[str], folder: Path, guard: float = GUARD_SECONDS) -> Outcome:
    """`charrnn ARGV` in-process with `folder` as the working directory."""
    out, err = io.StringIO(), io.StringIO()
    here, formatwarning = os.getcwd(), warnings.formatwarning
    code, crash = None, None
    try:
        os.chdir(folder)
        with (
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(err),
            warnings.catch_warnings(),
            _guard(guard),
        ):
            warnings.simplefilter("always")  # the suite turns warnings into errors; the command prints them
            warnings.showwarning = _show_warning
            code = main(argv)
    except Guarded as exc:
        crash = f"guard: {exc}"
    except (Exception, SystemExit) as exc:
        crash = _summary(exc)
    finally:
        os.chdir(here)
        warnings.formatwarning = formatwarning
    return Outcome(code, out.getvalue(), err.getvalue(), crash)


def half_written(folder: Path) -> list[str]:
    """Temporary files left behind, checkpoints that do not load, metrics lines that do not parse.

    `inputs/` holds a variant's deliberately damaged input, which is not output.
    """
    found = [f"left {p.name}" for p in folder.rglob("*") if p.name.endswith(".tmp")]
    for path in folder.rglob("*.npz"):
        if "inputs" in path.relative_to(folder).parts:
            continue
        try:
            ckpt_io.load(path)
        except Exception as exc:
            found.append(f"{path.name} does not load: {_summary(exc)}")
    for path in folder.rglob("*.jsonl"):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                json.loads(line)
            except ValueError:
                found.append(f"{path.name} holds a partial line {line[:40]!r}")
    return found


def judge(outcome: Outcome, folder: Path, codes: tuple[int, ...] = (0, 2), naming: str = "") -> Outcome:
    problems = outcome.problems
    if outcome.crash:
        problems.append(outcome.crash)
    elif outcome.code not in codes:
        problems.append(f"exit {outcome.code}, expected {' or '.join(map(str, codes))}")
    if outcome.code not in (None, 0):
        errors = [line for line in outcome.err.splitlines() if line.startswith("error:")]
        if len(errors) != 1 or not outcome.err.endswith(errors[-1] + "\n") or "Traceback" in outcome.err:
            problems.append(
                f"exit {outcome.code} without exactly one final error line: {outcome.err[-300:]!r}"
            )
        elif naming and naming not in errors[0]:
            problems.append(f"the error line does not name {naming}: {errors[0]!r}")
    problems += half_written(folder)
    return outcome


def check_family(
    world: World,
    variants: list[tuple[str, Callable[[Path], list[str]]]],
    guard: float = GUARD_SECONDS,
    **judging,
) -> None:
    """Run every variant in a fresh folder; fail listing each variant that broke a rule."""
    failures = []
    for label, build in variants:
        folder = world.folder()
        argv = build(folder)
        outcome = judge(run_cli(argv, folder, guard), folder, **judging)
        if outcome.problems:
            failures.append(f"{label}\n    argv: {_clip(argv)}\n    " + "\n    ".join(outcome.problems))
    assert not failures, f"{len(failures)} of {len(variants)} variants failed:\n" + "\n".join(failures)


def _clip(argv: list[str]) -> str:
    return " ".join(a if len(a) < 120 else a[:120] + "..." for a in argv)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("fuzz")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CHARRNN_LOAD_PLUGINS", "")
        mp.setenv("CHARRNN_CACHE", str(root / "cache"))
        yield _world(root)


def _world(root: Path) -> World:
    corpus = root / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    base = root / "base.yaml"
    config = json.loads(json.dumps(BASE).replace("CORPUS", str(corpus)))
    base.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    trained = root / "trained"
    trained.mkdir()
    good = run_cli(["run", str(base)], trained)
    assert good.code == 0 and not good.crash, good
    listing = run_cli(["plugins"], root)
    printed = run_cli(["run", str(base), "--print-config"], root)
    assert listing.code == 0 and printed.code == 0
    return World(
        root,
        corpus,
        base,
        trained / "m.npz",
        json.loads(listing.out),
        yaml.safe_load(printed.out),
        iter(range(10**6)),
    )


def components(world: World) -> dict[str, dict[str, dict]]:
    """kind -> name -> {option: default or 'required'}, from `charrnn plugins`."""
    found: dict[str, dict[str, dict]] = {}
    for plugin in world.listing:
        for kind, names in plugin.get("components", {}).items():
            for name, options in names.items():
                found.setdefault(kind, {})[name] = options
    return found


def required(world: World, kind: str, name: str) -> dict:
    """Values for a component's required options that let it work on the tiny corpus; tiny models."""
    known = {"path": str(world.corpus), "glob": str(world.corpus), "url": "http://127.0.0.1:9/corpus.txt"}
    options = components(world)[kind][name]
    found = {k: known.get(k, 1) for k, v in options.items() if v == "required"}
    return {**found, "hidden_size": 8} if "hidden_size" in options else found


def flow(mapping: dict) -> str:
    """A mapping as one line of YAML flow text, values given as YAML texts."""
    return "{" + ", ".join(f"{k}: {v}" for k, v in mapping.items()) + "}"


def dump_value(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


# -- families -------------------------------------------------------------------------------------


def test_fuzz_print_config_keys(world):
    """Every key of `--print-config`, set to a sample of wrong types and edge values."""
    rnd = random.Random(SEED)
    keys = []
    for section, value in world.printed.items():
        if isinstance(value, dict):
            keys += [f"{section}.{key}" for key in value]
        else:
            keys.append(section)
    assert {"seed", "train.steps", "generate.num_chars", "model.hidden_size"} <= set(keys)
    variants = []
    for key in keys:
        for edge in rnd.sample(EDGES, 3):
            variants.append(
                (f"{key}={edge}", lambda f, k=key, e=edge: ["run", str(world.base), "--set", f"{k}={e}"])
            )
    check_family(world, variants)


def test_fuzz_component_options(world):
    """Every option of every component `charrnn plugins` lists, with wrong types and edge values."""
    rnd = random.Random(SEED + 1)
    variants = []
    for kind, names in components(world).items():
        for name, options in names.items():
            for option in options:
                for edge in rnd.sample(EDGES, 2):
                    section = {
                        "type": name,
                        **{k: dump_value(v) for k, v in required(world, kind, name).items()},
                    }
                    section[option] = edge
                    text = f"{kind}={flow(section)}"
                    variants.append((text, lambda f, t=text: ["run", str(world.base), "--set", t]))
    assert len(variants) > 100
    check_family(world, variants)


def test_fuzz_every_component_name(world):
    """Each component name of each kind, with its defaults (and required options filled in)."""
    variants = []
    for kind, names in components(world).items():
        for name in names:
            section = {"type": name, **{k: dump_value(v) for k, v in required(world, kind, name).items()}}
            text = f"{kind}={flow(section)}"
            variants.append((text, lambda f, t=text: ["run", str(world.base), "--set", t]))
    check_family(world, variants)


HUGE = 2**40  # within 64 bits; no count or size in a run on one machine comes near


def test_fuzz_huge_sizes(world):
    """Integer options set to sizes no run can afford must be refused up front, not fail (or run) later.

    `train.steps` is left out: a long run is what `steps: null` (until Ctrl+C) asks for too.
    """
    variants = []
    sections = {k: v for k, v in world.printed.items() if isinstance(v, dict)}
    for section, options in sections.items():
        for key, default in options.items():
            counts = isinstance(default, int) and not isinstance(default, bool) or default is None
            if counts and f"{section}.{key}" != "train.steps":
                item = f"{section}.{key}={HUGE}"
                variants.append((item, lambda f, i=item: ["run", str(world.base), "--set", i]))
    for kind, names in components(world).items():
        for name, options in names.items():
            for option, default in options.items():
                if isinstance(default, int) and not isinstance(default, bool) and kind != "model":
                    section = {
                        "type": name,
                        **{k: dump_value(v) for k, v in required(world, kind, name).items()},
                    }
                    item = f"{kind}={flow({**section, option: HUGE})}"
                    variants.append((item, lambda f, i=item: ["run", str(world.base), "--set", i]))
    check_family(world, variants, guard=1.0)


def test_fuzz_generate_options(world):
    """`charrnn generate` on a good checkpoint with every sampler and its options set to edge values."""
    rnd = random.Random(SEED + 4)
    variants = []
    ckpt = str(world.checkpoint)
    for name, options in components(world)["sampler"].items():
        for option in options:
            for edge in rnd.sample(EDGES, 2):
                argv = ["generate", ckpt, "--num-chars", "5", "--sampler", name, "-o", f"{option}={edge}"]
                variants.append((" ".join(argv[4:]), lambda f, a=argv: a))
    for flag, values in (
        ("--temperature", ["inf", "nan", "-1", "0", "1e-300"]),
        ("--seed", ["-1", "99999999999"]),
    ):
        for value in values:
            argv = ["generate", ckpt, "--num-chars", "5", flag, value]
            variants.append((f"{flag} {value}", lambda f, a=argv: a))
    for bad in ["=", "x", "=1", "no=1", "temperature=[", "temperature=" + "9" * 5000]:
        argv = ["generate", ckpt, "--num-chars", "5", "-o", bad]
        variants.append((f"-o {bad[:20]}", lambda f, a=argv: a))
    variants.append(("--stop ''", lambda f: ["generate", ckpt, "--num-chars", "5", "--stop", ""]))
    variants.append(
        ("--seed-text unknown", lambda f: ["generate", ckpt, "--num-chars", "5", "--seed-text", "\u2603"])
    )
    check_family(world, variants)


def _deleted_and_unknown(world: World) -> Iterator[tuple[str, dict]]:
    base = yaml.safe_load(world.base.read_text(encoding="utf-8"))
    for key, value in base.items():
        yield f"without {key}", {k: v for k, v in base.items() if k != key}
        if key == "train":  # the defaults: 1000 steps, legitimately longer than the guard
            continue
        yield f"unknown key beside {key}", {**base, f"{key}x": value}
        if isinstance(value, dict):
            for sub in value:
                smaller = {k: v for k, v in value.items() if k != sub}
                if (key, sub) == ("train", "steps"):  # 1000 steps, so no samples every 2
                    smaller = {**smaller, "steps": 300, "sample_every": None}
                yield f"without {key}.{sub}", {**base, key: smaller}
            yield f"unknown {key}.bogus", {**base, key: {**value, "bogus": 1}}
            yield f"{key} as a list", {**base, key: list(value)}


def test_fuzz_deleted_and_unknown_keys(world):
    variants = []
    for label, config in _deleted_and_unknown(world):

        def build(folder, config=config):
            path = folder / "p.yaml"
            path.write_text(yaml.safe_dump(config), encoding="utf-8")
            return ["run", str(path)]

        variants.append((label, build))
    check_family(world, variants)


HOSTILE_YAML = {
    "empty": "",
    "only a document marker": "---\n",
    "a list": "- 1\n- 2\n",
    "a scalar": "hello\n",
    "a tab indent": "train:\n\tsteps: 2\n",
    "unclosed flow": "train: {steps: 2\n",
    "unclosed quote": 'seed: "1\n',
    "two documents": "seed: 1\n---\nseed: 2\n",
    "python object": "seed: !!python/object/apply:os.system ['echo hi']\n",
    "unknown tag": "seed: !foo 1\n",
    "recursive alias": "train: &a {steps: *a}\n",
    "recursive list alias": "stages: &a [*a]\n",
    "alias bomb": "a: &a [1,1,1,1,1,1,1,1,1,1]\n"
    + "".join(f"{c}: &{c} [{','.join(['*' + p] * 10)}]\n" for p, c in zip("abcdefg", "bcdefgh", strict=True)),
    "deep nesting": "seed: " + "[" * 3000 + "]" * 3000 + "\n",
    "deep mapping nesting": "seed: " + "{a: " * 3000 + "1" + "}" * 3000 + "\n",
    "integer too long": "seed: " + "7" * 5000 + "\n",
    "duplicate key": "seed: 1\nseed: 2\n",
    "boolean key": "model: {type: rnn, no: 1}\n",
    "number key": "train: {1: 2}\n",
    "null key": "~: 1\n",
    "list key": "? [a]\n: 1\n",
    "merge of a scalar": "train: {<<: 1}\n",
    "NUL character": "seed: 1\x00\n",
    "control characters": "seed: \x07\x1b\n",
    "byte order mark": "\ufeffseed: 1\n",
    "lone surrogate escape": 'generate: {seed_text: "\\ud800"}\n',
    "binary value": "generate: {seed_text: !!binary aGVsbG8=}\n",
    "a set": "stages: !!set {train: null}\n",
    "timestamp": "seed: 2026-01-01 10:00:00\n",
    "YAML 2 directive": "%YAML 2.0\n---\nseed: 1\n",
    "very long line": "seed: 1 # " + "x" * 20_000 + "\n",
    "huge float": "corpus: {val_fraction: 1e999}\n",
}


def test_fuzz_hostile_yaml_texts(world):
    base = world.base.read_text(encoding="utf-8")
    variants = []
    for label, text in HOSTILE_YAML.items():
        for where, content in (("alone", text), ("after the base", base + text)):

            def build(folder, content=content):
                path = folder / "p.yaml"
                path.write_text(content, encoding="utf-8", errors="surrogatepass")
                return ["run", str(path)]

            variants.append((f"{label} ({where})", build))

    def invalid_utf8(folder):
        (folder / "p.yaml").write_bytes(b"seed: \xff\xfe 1\n")
        return ["run", str(folder / "p.yaml")]

    variants.append(("invalid UTF-8", invalid_utf8))
    variants.append(("a folder as the pipeline", lambda f: ["run", str(f)]))
    variants.append(("a missing pipeline", lambda f: ["run", str(f / "missing.yaml")]))
    check_family(world, variants)


BAD_SETS = [
    "=", "=1", "a", "train.steps", "train.batch_size=", "train.steps=[", ".a=1", "a.=1", "a..b=1", "seed.x=1",
    "train=3", "model.type=", "corpus=null", "train.steps.x=1", "ü.ß=1", "model={", "model=[1]", "stages=[]",
    "stages=bogus", "plugins=[1]", "plugins=nope_not_a_module", "model.type=nope", "train.steps={a: *b}",
    "seed=" + "9" * 5000, "train.checkpoint=" + "x" * 400, 'train.checkpoint="a\\0b"', "generate.stop=['']",
    "train.checkpoint=sub/dir/m.npz", "train.checkpoint=.", "train.checkpoint=/", "evaluate.path=/nonexistent",
    "train.resume=true", "train.init_from=missing.npz", "generate.seed_text=\u2603", "seed=-1",
]  # fmt: skip


def test_fuzz_bad_set_syntax(world):
    variants = [(item, lambda f, i=item: ["run", str(world.base), "--set", i]) for item in BAD_SETS]
    variants += [
        (f"print-config {item}", lambda f, i=item: ["run", str(world.base), "--print-config", "--set", i])
        for item in BAD_SETS[:20]
    ]
    check_family(world, variants)


def test_fuzz_outputs_in_a_new_folder(world):
    """Checkpoint paths in folders that do not exist yet, with and without a validation split."""
    variants = []
    for fraction in ("0", "0.25"):
        for every in ("1", "null"):
            sets = [
                f"corpus.val_fraction={fraction}",
                f"train.sample_every={every}",
                "train.checkpoint=a/b/m.npz",
            ]
            argv = ["run", str(world.base)] + [x for item in sets for x in ("--set", item)]
            variants.append((" ".join(sets), lambda f, a=argv: a))
    check_family(world, variants)


# -- damaged checkpoints --------------------------------------------------------------------------


def _rewrite(source: Path, target: Path, change: Callable[[dict], None]) -> None:
    """Copy a checkpoint, letting `change` edit its arrays (`meta` decoded to a dict)."""
    with np.load(source, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    arrays["meta"] = json.loads(str(arrays["meta"]))
    change(arrays)
    if not isinstance(arrays.get("meta"), np.ndarray):
        arrays["meta"] = np.array(json.dumps(arrays["meta"]))
    with open(target, "wb") as f:
        np.savez(f, **arrays)


def _damages(world: World) -> Iterator[tuple[str, Callable[[Path], None]]]:
    good = world.checkpoint.read_bytes()
    rnd = random.Random(SEED + 2)
    yield "empty", lambda p: p.write_bytes(b"")
    yield "random bytes", lambda p: p.write_bytes(bytes(rnd.randrange(256) for _ in range(64)))
    yield "zip magic only", lambda p: p.write_bytes(b"PK\x03\x04")
    for fraction in (0.1, 0.5, 0.9, 0.999):
        size = int(len(good) * fraction)
        yield f"truncated to {fraction:.0%}", lambda p, n=size: p.write_bytes(good[:n])
    for _ in range(6):
        at = rnd.randrange(len(good))

        def flip(p, at=at):
            data = bytearray(good)
            data[at] ^= 0xFF
            p.write_bytes(bytes(data))

        yield f"byte {at} flipped", flip
    yield "a folder", lambda p: p.mkdir()
    yield "an empty zip", lambda p: zipfile.ZipFile(p, "w").close()

    def meta(label, change):
        return label, lambda p: _rewrite(world.checkpoint, p, change)

    yield meta("meta not JSON", lambda a: a.update(meta=np.array("{not json")))
    yield meta("meta a list", lambda a: a.update(meta=[1, 2]))
    for key in ("vocab", "config", "step", "encoding", "rng", "data_position", "smooth_loss", "corpus"):
        yield meta(f"meta without {key}", lambda a, k=key: a["meta"].pop(k, None))
    for key, value in [
        ("vocab", 5), ("vocab", ["a"]), ("vocab", ["ab", "c"]), ("vocab", []), ("config", []), ("step", "x"),
        ("step", -5), ("step", 10**30), ("encoding", "latin-9"), ("rng", "garbage"), ("data_position", -1),
        ("data_position", 10**12), ("smooth_loss", "nan"), ("format_version", 99),
    ]:  # fmt: skip
        yield meta(f"meta {key}={value!r}"[:60], lambda a, k=key, v=value: a["meta"].update({k: v}))
    yield meta("config.model not a mapping", lambda a: a["meta"]["config"].update(model=3))
    yield meta("config.model.type unknown", lambda a: a["meta"]["config"]["model"].update(type="nope"))
    yield meta("config.model.hidden_size 9", lambda a: a["meta"]["config"]["model"].update(hidden_size=9))
    yield meta(
        "config.model.hidden_size huge", lambda a: a["meta"]["config"]["model"].update(hidden_size=10**9)
    )
    yield meta("config.sampler garbage", lambda a: a["meta"]["config"].update(sampler={"type": 5}))
    yield meta("config.generate garbage", lambda a: a["meta"]["config"].update(generate={"num_chars": "x"}))
    with np.load(world.checkpoint) as saved:
        params = [k for k in saved.files if k.startswith("param/")]
    for name in params[:2]:
        yield meta(f"{name} NaN", lambda a, n=name: a.update({n: np.full_like(a[n], np.nan)}))
        yield meta(f"{name} wrong shape", lambda a, n=name: a.update({n: a[n][:1]}))
        yield meta(f"{name} int", lambda a, n=name: a.update({n: a[n].astype(np.int64)}))
        yield meta(f"{name} missing", lambda a, n=name: a.pop(n))
    yield meta("an extra array", lambda a: a.update({"junk": np.zeros(2)}))
    yield meta(
        "optimizer state wrong shape",
        lambda a: a.update({k: np.zeros(1) for k in a if k.startswith("optim/")}),
    )
    yield meta("state garbage", lambda a: a.update({k: np.zeros(1) for k in a if k.startswith("state/")}))


def _damaged_variants(world: World, argv: Callable[[Path], list[str]]):
    variants = []
    for label, damage in _damages(world):

        def build(folder, damage=damage):
            path = folder / "inputs" / "m.npz"
            path.parent.mkdir()
            damage(path)
            return argv(path)

        variants.append((label, build))
    return variants


def test_fuzz_damaged_checkpoint_generate(world):
    variants = _damaged_variants(world, lambda p: ["generate", str(p), "--num-chars", "5"])
    for label, path in (
        ("an overlong name", "x" * 300 + ".npz"),
        ("a NUL byte", "a\0b.npz"),
        ("the root", "/"),
    ):
        variants.append(
            (f"checkpoint path with {label}", lambda f, p=path: ["generate", p, "--num-chars", "5"])
        )
    check_family(world, variants)


def test_fuzz_damaged_checkpoint_resume(world):
    def argv(p):
        return ["run", str(world.base), "--set", f"train.resume={p}", "--set", "train.steps=5"]

    check_family(world, _damaged_variants(world, argv))


# -- plugins that raise or return garbage ---------------------------------------------------------

PLUGIN = """
import numpy as np
import charrnn
from charrnn_plugins.rnn import RNN
from charrnn_plugins.samplers import Temperature
from charrnn_plugins.adagrad import Adagrad

{body}
"""

BAD_PLUGINS = {
    "raises at import": ("model", "raise RuntimeError('boom at import')"),
    "hook raises": (
        "model",
        "@charrnn.hookimpl\ndef charrnn_model(register):\n    raise RuntimeError('boom in hook')",
    ),
    "factory raises": (
        "model",
        "def bad(vocab_size, rng, hidden_size: int = 8):\n    raise ZeroDivisionError('boom')\n"
        "@charrnn.hookimpl\ndef charrnn_model(register):\n    register('bad', bad)",
    ),
    "loader returns None": (
        "corpus",
        "@charrnn.hookimpl\ndef charrnn_corpus_loader(register):\n    register('bad', lambda: None)",
    ),
    "loader raises": (
        "corpus",
        "def bad():\n    raise KeyError('boom')\n"
        "@charrnn.hookimpl\ndef charrnn_corpus_loader(register):\n    register('bad', bad)",
    ),
    "train_step raises": (
        "model",
        "class Bad(RNN):\n    def train_step(self, *a, **k):\n        raise IndexError('boom')\n"
        "@charrnn.hookimpl\ndef charrnn_model(register):\n    register('bad', Bad)",
    ),
    "train_step returns garbage": (
        "model",
        "class Bad(RNN):\n    def train_step(self, *a, **k):\n        return 'garbage'\n"
        "@charrnn.hookimpl\ndef charrnn_model(register):\n    register('bad', Bad)",
    ),
    "sampler returns out-of-vocabulary ids": (
        "sampler",
        "class Bad(Temperature):\n    def __call__(self, logits, rng):\n        return np.full(len(logits), 10**6)\n"
        "@charrnn.hookimpl\ndef charrnn_sampler(register):\n    register('bad', Bad)",
    ),
    "sampler returns floats of the wrong shape": (
        "sampler",
        "class Bad(Temperature):\n    def __call__(self, logits, rng):\n        return np.zeros((3, 3)) + 0.5\n"
        "@charrnn.hookimpl\ndef charrnn_sampler(register):\n    register('bad', Bad)",
    ),
    "optimizer step raises": (
        "optimizer",
        "class Bad(Adagrad):\n    def step(self, params, grads):\n        raise ValueError('boom')\n"
        "@charrnn.hookimpl\ndef charrnn_optimizer(register):\n    register('bad', Bad)",
    ),
    "optimizer state_dict garbage": (
        "optimizer",
        "class Bad(Adagrad):\n    def state_dict(self):\n        return {'x': object()}\n"
        "@charrnn.hookimpl\ndef charrnn_optimizer(register):\n    register('bad', Bad)",
    ),
}


def test_fuzz_plugins_that_raise_or_return_garbage(world):
    variants = []
    for label, (kind, body) in BAD_PLUGINS.items():
        name = "fuzzplug_" + "".join(c if c.isalnum() else "_" for c in label)

        def build(folder, kind=kind, body=body, name=name):
            module = folder / f"{name}.py"
            module.write_text(PLUGIN.format(body=body), encoding="utf-8")
            return ["run", str(world.base), "--set", f"plugins=[{module}]", "--set", f"{kind}={{type: bad}}"]

        variants.append((label, build))
    check_family(world, variants, codes=(1,), naming="fuzzplug_")


# -- a sample through the real command ------------------------------------------------------------


@pytest.mark.slow
def test_fuzz_sample_through_the_real_command(world, cli_env):
    """Five sampled variants give the same exit status and error line through `python -m charrnn`."""
    rnd = random.Random(SEED + 3)
    items = rnd.sample(BAD_SETS, 3) + [f"model.hidden_size={rnd.choice(EDGES)}", "train.steps=2"]
    runs = []
    for item in items:  # started together: the interpreter start-up dominates
        folder = world.folder()
        argv = ["run", str(world.base), "--set", item]
        command = [sys.executable, "-m", "charrnn", *argv]
        process = subprocess.Popen(
            command, cwd=folder, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        runs.append((item, folder, argv, process))
    for item, folder, argv, process in runs:
        _, stderr = process.communicate(timeout=120)
        real = subprocess.CompletedProcess(argv, process.returncode, "", stderr.decode("utf-8"))
        shutil.rmtree(folder)
        folder.mkdir()
        inside = run_cli(argv, folder)
        assert real.returncode == inside.code, (item, real.stderr[-500:], inside.err[-500:])
        errors = [line for line in real.stderr.splitlines() if line.startswith("error:")]
        assert errors == [line for line in inside.err.splitlines() if line.startswith("error:")], item
        assert "Traceback" not in real.stderr and not half_written(folder), item


# -- the other descriptions the one checker serves: the sweep file, the server's request body ------


def _schema_keys(schema, prefix: str = "") -> list[str]:
    """Every key of a description, nested sections as dotted keys (`scheduler.type`)."""
    from charrnn import options

    keys = []
    for f in schema:
        sub = options._section_of(f.annotation)
        keys += _schema_keys(sub, f"{prefix}{f.name}.") if sub is not None else [f"{prefix}{f.name}"]
    return keys


def test_fuzz_sweep_file_keys(world):
    """Every key of the sweep file's description, set to a sample of wrong types and edge values;
    `charrnn sweep --dry-run` draws and checks every trial but trains nothing."""
    from charrnn_plugins.sweep import SWEEP_FILE

    rnd = random.Random(SEED + 1)
    keys = _schema_keys(SWEEP_FILE)
    assert {"pipeline", "samples", "scheduler.type", "resources.cpus_per_trial"} <= set(keys)
    base = {
        "pipeline": str(world.base),
        "backend": "local",
        "set": {"corpus.val_fraction": 0.25},
        "search": {"optimizer.lr": {"loguniform": [0.01, 0.1]}},
        "samples": 2,
    }
    variants = []
    for key in keys:
        for edge in rnd.sample(EDGES, 8):

            def build(folder, key=key, edge=edge):
                lines = [f"{k}: {json.dumps(v)}" for k, v in base.items() if k != key.split(".")[0]]
                head, _, rest = key.partition(".")
                lines.append(f"{head}: {{{rest}: {edge}}}" if rest else f"{key}: {edge}")
                lines.append(f"output: {json.dumps(str(folder / 'out'))}" if head != "output" else "")
                path = folder / "s.yaml"
                path.write_text("\n".join(lines) + "\n", encoding="utf-8")
                return ["sweep", str(path), "--dry-run"]

            variants.append((f"{key}: {edge}", build))
    check_family(world, variants)


def test_fuzz_request_bodies(world):
    """Every field of the server's request body with wrong types and edge values, checked as the
    server checks a request: each is a request to run or a 4xx `ApiError`, never another exception."""
    from charrnn import options
    from charrnn.loaded import LoadedModel
    from charrnn_plugins.serve.api import ApiError, CompletionBody, parse_completion

    models = {"model": LoadedModel.load(world.checkpoint, load_entrypoints=False)}
    rnd = random.Random(SEED + 2)
    values = [yaml.safe_load(e) if e != '"\\0"' else "\0" for e in EDGES] + [10**30, -(10**30), [[]] * 3]
    failures, count = [], 0
    for name in options.schema_of(CompletionBody).names():
        for value in rnd.sample(values, 12):
            count += 1
            body = {"model": "model", "prompt": "th", "max_tokens": 4, name: value}
            try:
                with _guard(GUARD_SECONDS):
                    parse_completion(body, models, 4096)
            except ApiError as exc:
                if not 400 <= exc.status < 500 or not exc.message or "\n" in exc.message:
                    failures.append(f"{name}={value!r}: {exc.status} {exc.message!r}")
            except (Exception, Guarded) as exc:
                failures.append(f"{name}={value!r}: {_summary(exc)}")
    assert not failures, f"{len(failures)} of {count} bodies failed:\n" + "\n".join(failures)
