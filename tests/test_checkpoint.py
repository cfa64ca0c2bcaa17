"""Checkpoint hardening: atomic writes, damaged and hostile files, resume and init_from checks."""

from __future__ import annotations

import errno
import io
import json
import re
import threading
import tracemalloc
import zipfile

import numpy as np
import pytest
import yaml

from charrnn import checkpoint as ckpt_io
from charrnn.cli import main
from charrnn.errors import CheckpointError, CorpusError
from charrnn.files import atomic_write
from charrnn.pipeline import run_pipeline
from charrnn.types import Corpus
from tests.conftest import TINY_TEXT, params_of


def small_config(folder, **train):
    corpus = folder / "tiny.txt"
    corpus.write_text(TINY_TEXT, encoding="utf-8")
    return {
        "seed": 1,
        "corpus": {"type": "text", "path": str(corpus), "val_fraction": 0.1},
        "model": {"type": "rnn", "hidden_size": 8},
        "optimizer": {"type": "adagrad", "lr": 0.1},
        "stages": ["train"],
        "train": {
            "steps": 4,
            "batch_size": 2,
            "seq_length": 8,
            "sample_every": None,
            "checkpoint": str(folder / "model.npz"),
            "keep_best": False,
            "metrics": False,
            **train,
        },
        "generate": {"num_chars": 20, "seed_text": "the "},
    }


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A checkpoint of a 4-step run (and the config that made it)."""
    folder = tmp_path_factory.mktemp("good")
    config = small_config(folder)
    run_pipeline(config, stderr=io.StringIO())
    return folder / "model.npz", config


def one_error(capsys, argv) -> str:
    assert main(argv) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def rewrite(src, dst, meta=None, arrays=None):
    """`src` with its meta and/or arrays changed by the given functions, saved with np.savez."""
    with np.load(src, allow_pickle=False) as data:
        found = {k: data[k] for k in data.files if k != "meta"}
        saved_meta = json.loads(str(data["meta"]))
    if meta is not None:
        meta(saved_meta)
    if arrays is not None:
        arrays(found)
    np.savez(dst, meta=np.array(json.dumps(saved_meta)), **found)
    return dst


def resume_argv(config, path, tmp_path):
    config = json.loads(json.dumps(config))
    config["train"].update(checkpoint=str(path), steps=8)
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump(config))
    return ["run", str(pipeline), "--set", "train.resume=true"]


def setter(*keys, value):
    def change(d):
        for key in keys[:-1]:
            d = d[key]
        d[keys[-1]] = value

    return change


def deleter(key):
    return lambda d: d.pop(key)


# (id, meta change, arrays change, what the one error line says, does generate read it)
DAMAGED = [
    (
        "version-string",
        setter("format_version", value="2"),
        None,
        "meta format_version: expected an integer, got '2'",
        True,
    ),
    ("version-newer", setter("format_version", value=7), None, "newer charrnn", True),
    ("config-string", setter("config", value="x"), None, "meta config: expected a mapping, got 'x'", True),
    (
        "model-string",
        setter("config", "model", value="x"),
        None,
        "meta config: must be a resolved pipeline with model, optimizer and train sections",
        True,
    ),
    (
        "model-type-int",
        setter("config", "model", "type", value=5),
        None,
        "meta config: must be a resolved pipeline",
        True,
    ),
    ("model-bad-option", setter("config", "model", "hidden_size", value="big"), None, "hidden_size", True),
    ("vocab-int", setter("vocab", value=5), None, "meta vocab: expected a list of strings, got 5", True),
    (
        "vocab-long-symbols",
        setter("vocab", value=["ab", "c"]),
        None,
        "meta vocab: must be a list of at least 2 distinct one-character strings",
        True,
    ),
    (
        "vocab-repeated",
        lambda m: m["vocab"].__setitem__(1, m["vocab"][0]),
        None,
        "meta vocab: must be a list of at least 2 distinct",
        True,
    ),
    ("vocab-shorter", lambda m: m["vocab"].pop(), None, "shape|vocabulary differs", True),
    (
        "encoding",
        setter("encoding", value="latin-1"),
        None,
        "meta encoding: must be one of utf-8, bytes, got 'latin-1'",
        True,
    ),
    ("no-config", deleter("config"), None, "lacks 'config'", True),
    ("step-negative", setter("step", value=-1), None, "meta step: must be >= 0, got -1", True),
    ("step-string", setter("step", value="3"), None, "meta step: expected an integer, got '3'", True),
    (
        "position-negative",
        setter("data_position", value=-5),
        None,
        "meta data_position: must be >= 0, got -5",
        True,
    ),
    (
        "position-float",
        setter("data_position", value=2.5),
        None,
        "meta data_position: expected an integer or null, got 2.5",
        True,
    ),
    ("rng-string", setter("rng", value="x"), None, "meta rng: expected a mapping or null, got 'x'", True),
    (
        "rng-negative",
        setter("rng", "state", "inc", value=-1),
        None,
        "meta rng: must be a PCG64 bit generator state",
        True,
    ),
    (
        "rng-other-generator",
        setter("rng", "bit_generator", value="MT19937"),
        None,
        "meta rng: must be a PCG64 bit generator state",
        True,
    ),
    (
        "smooth-loss-string",
        setter("smooth_loss", value="low"),
        None,
        "meta smooth_loss: expected a number or null, got 'low'",
        True,
    ),
    (
        "batch-size-string",
        setter("config", "train", "batch_size", value="2"),
        None,
        "meta config: must be a resolved pipeline",
        True,
    ),
    ("param-strings", None, setter("param/Wxh", value=np.array(["a", "b"])), "param/Wxh", True),
    ("param-shape", None, setter("param/Wxh", value=np.zeros((3, 3))), "param/Wxh has shape", True),
    (
        "param-int",
        None,
        lambda a: a.__setitem__("param/by", a["param/by"].astype(np.int64)),
        "param/by",
        True,
    ),
    ("param-nan", None, lambda a: a["param/Whh"].__setitem__((0, 0), np.nan), "NaN", True),
    ("param-missing", None, deleter("param/Why"), "parameters", True),
    ("param-extra", None, setter("param/extra", value=np.zeros(2)), "parameters", True),
    ("array-unknown-group", None, setter("weights/x", value=np.zeros(2)), "unexpected array", True),
    ("state-shape", None, setter("state/h", value=np.zeros((5, 8))), "state/h has shape", False),
    ("state-strings", None, setter("state/h", value=np.array("h")), "state/h", False),
    ("state-inf", None, lambda a: a["state/h"].__setitem__((0, 0), np.inf), "infinite", False),
    ("optim-shape", None, setter("optim/mem.Wxh", value=np.zeros(3)), "optim/mem.Wxh has shape", False),
    ("optim-missing", None, deleter("optim/mem.by"), "optimizer state", False),
]


@pytest.mark.parametrize(
    ("meta", "arrays", "message", "in_generate"), [d[1:] for d in DAMAGED], ids=[d[0] for d in DAMAGED]
)
def test_damaged_checkpoint_is_one_error_line(capsys, good, tmp_path, meta, arrays, message, in_generate):
    path, config = good
    damaged = rewrite(path, tmp_path / "damaged.npz", meta, arrays)
    if in_generate:
        assert re.search(message, one_error(capsys, ["generate", str(damaged), "--num-chars", "5"]))
    else:  # generation does not read optimizer or hidden state: it works
        assert main(["generate", str(damaged), "--num-chars", "5"]) == 0
        capsys.readouterr()
    assert re.search(message, one_error(capsys, resume_argv(config, damaged, tmp_path)))


def npy_member(header_shape, data: bytes, dtype="<f8") -> bytes:
    out = io.BytesIO()
    header = {"descr": dtype, "fortran_order": False, "shape": header_shape}
    np.lib.format.write_array_header_1_0(out, header)
    return out.getvalue() + data


def with_member(src, dst, name, content, compress=zipfile.ZIP_STORED):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            if info.filename != name:
                zout.writestr(info.filename, zin.read(info.filename))
        zout.writestr(name, content, compress_type=compress)
    return dst


def test_array_declaring_745_gib_fails_before_allocating(capsys, good, tmp_path):
    path, config = good
    huge = with_member(path, tmp_path / "huge.npz", "param/Wxh.npy", npy_member((10**11,), b"\0" * 64))
    tracemalloc.start()
    try:
        line = one_error(capsys, ["generate", str(huge)])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "param/Wxh" in line and "declares shape (100000000000,)" in line
    assert peak < 50 << 20  # nothing near the declared size was allocated
    assert "declares shape" in one_error(capsys, resume_argv(config, huge, tmp_path))


@pytest.mark.slow
def test_zip_bomb_is_refused_before_decompressing(capsys, good, tmp_path):
    path, config = good
    zeros = bytes(64 << 20)  # 64 MiB of zeros: a member of about 64 kB compressed
    bomb = with_member(
        path,
        tmp_path / "bomb.npz",
        "param/Wxh.npy",
        npy_member((len(zeros) // 8,), zeros),
        zipfile.ZIP_DEFLATED,
    )
    del zeros
    assert bomb.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        line = one_error(capsys, ["generate", str(bomb)])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "param/Wxh has shape (8388608,)" in line
    assert peak < 16 << 20  # the 64 MiB member was never inflated into memory
    assert "param/Wxh has shape" in one_error(capsys, resume_argv(config, bomb, tmp_path))


@pytest.mark.slow
def test_single_byte_damage_is_exit_0_or_one_error_line(capsys, good, tmp_path):
    path, config = good
    raw = path.read_bytes()
    rng = np.random.default_rng(1234)
    damaged = tmp_path / "damaged.npz"
    resume = resume_argv(config, damaged, tmp_path)
    for i, pos in enumerate(rng.integers(0, len(raw), size=30)):
        if i % 2:
            damaged.write_bytes(raw[:pos])  # truncated
        else:
            flipped = bytearray(raw)
            flipped[pos] ^= 1 << int(rng.integers(0, 8))
            damaged.write_bytes(bytes(flipped))
        for argv in (["generate", str(damaged), "--num-chars", "5"], resume):
            status = main(argv)
            out, err = capsys.readouterr()
            assert status in (0, 2), (pos, argv[0], err)
            if status == 2:
                lines = err.strip().splitlines()
                assert len(lines) == 1 and lines[0].startswith("error: "), (pos, err)


# -- atomic writes -------------------------------------------------------------------------


def test_concurrent_saves_and_loads_never_see_a_partial_file(good, tmp_path):
    saved = ckpt_io.load(good[0])
    target = tmp_path / "shared.npz"
    ckpt_io.save(target, saved)
    errors: list[BaseException] = []
    stop = threading.Event()

    def writer(tag):
        try:
            for i in range(30):
                meta = dict(saved.meta, step=i, writer=tag)
                ckpt_io.save(target, ckpt_io.Checkpoint(saved.params, meta, saved.optim, saved.state))
        except BaseException as exc:
            errors.append(exc)

    def reader():
        try:
            while not stop.is_set():
                back = ckpt_io.load(target)
                assert back.meta["vocab"] == saved.meta["vocab"]
                assert all(np.array_equal(back.params[k], v) for k, v in saved.params.items())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(t,)) for t in "ab"]
    watcher = threading.Thread(target=reader)
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    watcher.join()
    assert errors == []
    assert [p.name for p in tmp_path.iterdir()] == ["shared.npz"]  # no temporaries left behind
    assert ckpt_io.load(target).meta["step"] == 29


def test_full_disk_leaves_no_temporary_and_keeps_the_old_file(good, tmp_path, monkeypatch):
    saved = ckpt_io.load(good[0])
    target = tmp_path / "model.npz"
    ckpt_io.save(target, saved)
    before = target.read_bytes()

    def full(f, **arrays):
        f.write(b"PK\x03\x04 partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", full)
    with pytest.raises(CheckpointError) as info:
        ckpt_io.save(target, saved)
    assert str(info.value) == f"cannot write checkpoint {target}: No space left on device"
    assert [p.name for p in tmp_path.iterdir()] == ["model.npz"]
    assert target.read_bytes() == before


def test_atomic_write_reports_with_the_given_error_and_cleans_up(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(CorpusError, match=f"cannot write the cache {target}: No space"):
        with atomic_write(target, "the cache", CorpusError) as f:
            f.write(b"x")
            raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(target) as f:
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    with atomic_write(target) as f:
        f.write(b"done")
    assert target.read_bytes() == b"done" and list(tmp_path.iterdir()) == [target]


# -- resume: the optimizer -----------------------------------------------------------------


def test_resume_with_a_changed_optimizer_option_names_it(capsys, tmp_path):
    config = small_config(tmp_path)
    config["optimizer"] = {"type": "sgd", "lr": 0.1, "momentum": 0.9}
    run_pipeline(config, stderr=io.StringIO())
    config["optimizer"]["momentum"] = 0.0
    argv = resume_argv(config, tmp_path / "model.npz", tmp_path)
    line = one_error(capsys, argv)
    assert "optimizer.momentum is 0.0" in line and "0.9" in line and "only lr may change" in line


def test_resume_with_another_optimizer_names_its_type(capsys, tmp_path):
    config = small_config(tmp_path)
    run_pipeline(config, stderr=io.StringIO())
    config["optimizer"] = {"type": "adam"}
    line = one_error(capsys, resume_argv(config, tmp_path / "model.npz", tmp_path))
    assert "optimizer.type is 'adam'" in line and "'adagrad'" in line


def test_resume_may_change_the_learning_rate(tmp_path):
    config = small_config(tmp_path)
    run_pipeline(config, stderr=io.StringIO())
    config["optimizer"]["lr"] = 0.05
    config["train"].update(steps=6, resume=True)
    assert run_pipeline(config, stderr=io.StringIO()).train.steps == 6


class PickyOptimizer:
    """Keeps no state; its load_state_dict refuses whatever it is given (as a damaged state would)."""

    def step(self, params, grads):
        pass

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        raise ValueError("state from another version")


class PickyPlugin:
    import charrnn as _charrnn

    @_charrnn.hookimpl
    def charrnn_optimizer(self, register):
        register("picky", PickyOptimizer)


def test_optimizer_load_state_dict_error_is_a_checkpoint_error(tmp_path):
    config = small_config(tmp_path)
    config["optimizer"] = {"type": "picky"}
    run_pipeline(config, plugins=[PickyPlugin()], stderr=io.StringIO())
    config["train"].update(steps=6, resume=True)
    with pytest.raises(
        CheckpointError, match="optimizer state in .* does not fit optimizer 'picky': state from"
    ):
        run_pipeline(config, plugins=[PickyPlugin()], stderr=io.StringIO())


# -- init_from with a subset of the vocabulary -----------------------------------------------


def test_init_from_encodes_a_subset_corpus_with_the_checkpoint_vocabulary(tmp_path, good):
    base_path, _ = good
    base, base_meta = params_of(base_path)
    config = small_config(tmp_path, init_from=str(base_path), steps=1)
    subset = "".join(ch for ch in TINY_TEXT if ch not in "gk.")  # fewer characters than the base vocabulary
    (tmp_path / "tiny.txt").write_text(subset, encoding="utf-8")
    config["optimizer"]["lr"] = 1e-30
    config["stages"] = ["train", "generate"]
    result = run_pipeline(config, stderr=io.StringIO())
    tuned, meta = params_of(tmp_path / "model.npz")
    assert meta["vocab"] == base_meta["vocab"]
    assert all(np.allclose(tuned[k], base[k]) for k in base if k.startswith("param/"))
    assert result.text.startswith("the ") and len(result.text) == 24


def test_corpus_with_vocab_remaps_ids_and_names_missing_characters():
    corpus = Corpus.from_text("abba")
    wide = corpus.with_vocab(["x", "b", "a"])
    assert wide.vocab == ["x", "b", "a"] and wide.ids.tolist() == [2, 1, 1, 2]
    assert wide.decode(wide.ids) == "abba"
    assert corpus.with_vocab(["a", "b"]) is corpus
    with pytest.raises(CorpusError, match=r"lacks 1 of the text's characters \(new: 'b'\)"):
        corpus.with_vocab(["a", "c"])


def test_saved_checkpoint_gets_the_usual_file_mode(good, tmp_path):
    import os

    umask = os.umask(0o022)
    os.umask(umask)
    target = tmp_path / "model.npz"
    ckpt_io.save(target, ckpt_io.load(good[0]))
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # not the 0600 of a temporary file
