"""Reading text files one way: `evaluate.path` as the loaders do, and no FIFO or device opened."""

from __future__ import annotations

import codecs
import os
import threading

import numpy as np
import pytest

from charrnn import CorpusError, run_pipeline
from charrnn.cli import main
from charrnn.textfile import check_regular, encode_file
from charrnn_plugins import cache
from charrnn_plugins.files import load_files
from charrnn_plugins.text import load_text

TEXT = "café au lait, crème brûlée. " * 12


@pytest.fixture
def fifo(tmp_path):
    """A FIFO; if the code under test opens it, a writer ends it at once (so a bug fails, not hangs)."""
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    path = tmp_path / "pipe.txt"
    os.mkfifo(path)

    def writer():
        with open(path, "wb"):
            pass  # opened for writing only once a reader opens it; closing gives the reader EOF

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    yield path
    while thread.is_alive():  # the writer may not have reached its open() yet: repeat until it returns
        os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))
        thread.join(0.01)


def trained(tiny_config, tmp_path, encoding):
    corpus = tmp_path / "train.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    tiny_config["corpus"].update(path=str(corpus), encoding=encoding)
    tiny_config["stages"] = ["train"]
    tiny_config["train"]["steps"] = 2
    run_pipeline(tiny_config)
    tiny_config["stages"] = ["evaluate"]
    return tiny_config


def test_bytes_model_scores_the_file_bytes_not_reencoded_ones(tiny_config, tmp_path):
    config = trained(tiny_config, tmp_path, "bytes")
    target = tmp_path / "eval.bin"
    target.write_bytes("crème brûlée ".encode() * 3)  # é is C3 A9: two ids, not four
    config["evaluate"] = {"path": str(target)}
    result = run_pipeline(config)
    assert result.evaluation["chars"] == target.stat().st_size
    ids = encode_file(target, [chr(i) for i in range(256)], "bytes")
    assert ids.tolist() == list(target.read_bytes())


def test_utf8_byte_order_mark_is_dropped_as_the_text_loader_does(tiny_config, tmp_path):
    config = trained(tiny_config, tmp_path, "utf-8")
    target = tmp_path / "eval.txt"
    target.write_bytes(codecs.BOM_UTF8 + "crème brûlée, café. ".encode() * 3)
    config["evaluate"] = {"path": str(target)}
    result = run_pipeline(config)
    assert result.evaluation["chars"] == len("crème brûlée, café. ") * 3
    loaded = load_text(str(target))
    assert encode_file(target, loaded.vocab, "utf-8").tolist() == loaded.ids.tolist()


def test_evaluate_path_errors_name_it(tiny_config, tmp_path):
    config = trained(tiny_config, tmp_path, "utf-8")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"caf\xff " * 10)
    config["evaluate"] = {"path": str(bad)}
    with pytest.raises(CorpusError, match=r"evaluate.path .*bad.txt is not valid UTF-8 \(byte 3"):
        run_pipeline(config)
    bad.write_text("café Zürich " * 10, encoding="utf-8")
    with pytest.raises(CorpusError, match=r"evaluate.path .*: character 'Z' \(U\+005A\) is not in"):
        run_pipeline(config)
    config["evaluate"] = {"path": str(tmp_path / "missing.txt")}
    with pytest.raises(CorpusError, match="evaluate.path not found: .*missing.txt"):
        run_pipeline(config)


def test_evaluate_path_fifo_is_refused_unopened(tiny_config, tmp_path, fifo, capsys):
    import yaml

    config = trained(tiny_config, tmp_path, "utf-8")
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(config))
    capsys.readouterr()
    assert main(["run", str(path), "--set", f"evaluate.path={fifo}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: evaluate.path {fifo} is a FIFO; a regular file is needed"]


@pytest.mark.parametrize(
    "load",
    [
        lambda p: load_text(str(p)),
        lambda p: load_text(str(p), encoding="bytes"),
        lambda p: load_text(str(p), cache=True),
        lambda p: cache.read_file(p, source=str(p), encoding="bytes"),
        lambda p: cache.read_file(p, source=str(p), encoding="utf-8", cache=True),
        lambda p: cache.encode_files([p], source=str(p), encoding="utf-8"),
        lambda p: cache.encode_files([p], source=str(p), encoding="bytes"),
    ],
)
def test_loaders_refuse_a_fifo_before_opening_it(fifo, load, tmp_path, monkeypatch):
    monkeypatch.setenv("CHARRNN_CACHE", str(tmp_path / "cache"))
    with pytest.raises(CorpusError, match="is a FIFO; a regular file is needed"):
        load(fifo)


def test_files_loader_leaves_out_a_fifo(fifo, tmp_path):
    (tmp_path / "a.txt").write_text("ab", encoding="utf-8")
    corpus = load_files(str(tmp_path / "*.txt"))
    assert corpus.vocab == ["a", "b"]


def test_check_regular_names_devices_and_folders(tmp_path):
    with pytest.raises(CorpusError, match="is a folder"):
        check_regular(tmp_path)
    if os.path.exists("/dev/null"):
        with pytest.raises(CorpusError, match="/dev/null is a device"):
            check_regular("/dev/null", "evaluate.path")
    (tmp_path / "ok.txt").write_text("x")
    check_regular(tmp_path / "ok.txt")
    assert np.array_equal(encode_file(tmp_path / "ok.txt", ["x"], "utf-8"), [0])
