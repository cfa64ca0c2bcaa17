"""The corpus loaders `text` (with `encoding` and `cache`), `files` and `url`, and the ids cache."""

from __future__ import annotations

import functools
import hashlib
import io
import os
import socket
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

import charrnn
import charrnn_plugins.files
import charrnn_plugins.url
from charrnn import ConfigError, Corpus, CorpusError
from charrnn_plugins import cache
from charrnn_plugins.files import load_files
from charrnn_plugins.text import load_text
from charrnn_plugins.url import load_url
from conftest import option_problem

MIXED = "héllo wörld ✓ 😀 ab\n" * 20  # 1-, 2-, 3- and 4-byte characters


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("CHARRNN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CHARRNN_LOAD_PLUGINS", "")
    return tmp_path / "cache"


def cached_files(home: Path, kind: str) -> list[str]:
    folder = home / kind
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# -- text: encoding -----------------------------------------------------------------------


@pytest.mark.parametrize("use_cache", [False, True])
def test_bytes_encoding_loads_any_file(tmp_path, use_cache):
    raw = bytes(range(256)) + b"\xff\xfe\xc3 not UTF-8 \xe2\x9c"
    path = tmp_path / "blob.bin"
    path.write_bytes(raw)
    corpus = load_text(str(path), encoding="bytes", cache=use_cache)
    assert corpus.encoding == "bytes" and len(corpus.vocab) == 256
    assert corpus.ids.dtype == np.uint8 and bytes(corpus.ids) == raw
    assert corpus.decode(corpus.encode("héllo ✓")) == "héllo ✓"


def test_bytes_encoding_keeps_the_byte_order_mark(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbfab")
    assert bytes(load_text(str(path), encoding="bytes").ids) == b"\xef\xbb\xbfab"
    assert load_text(str(path)).vocab == ["a", "b"]


def test_unknown_encoding_names_the_choices(corpus_file, tiny_config):
    assert option_problem(load_text, "corpus", path=str(corpus_file), encoding="latin-1") == (
        "encoding: must be one of utf-8, bytes, got 'latin-1'"
    )
    assert option_problem(load_text, "corpus", path=str(corpus_file), encoding="UTF8").endswith(
        "got 'UTF8' (did you mean 'utf-8'?)"
    )
    tiny_config["corpus"]["encoding"] = "ascii"
    with pytest.raises(ConfigError, match=r"corpus.encoding: must be one of utf-8, bytes, got 'ascii'"):
        charrnn.run_pipeline(tiny_config)


def test_invalid_utf8_names_the_byte(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes("héllo".encode() + b"\xff rest")
    with pytest.raises(CorpusError, match=r"bad.txt is not valid UTF-8 \(byte 6: invalid start byte\)"):
        load_text(str(path))


# -- files --------------------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name, text in {
        "src/b.py": "B",
        "src/a.py": "A",
        "src/sub/c.py": "C",
        "src/notes.txt": "N",
        "src/.hidden/h.py": "H",
    }.items():
        Path(name).parent.mkdir(parents=True, exist_ok=True)
        Path(name).write_text(text, encoding="utf-8")
    return tmp_path


def test_files_joins_matches_in_sorted_order(tree):
    corpus = load_files("src/**/*.py")
    assert corpus.decode(corpus.ids) == "A\n\nB\n\nC"
    assert corpus.source == "src/**/*.py"
    corpus = load_files("src/**/*.py", separator="|")
    assert corpus.decode(corpus.ids) == "A|B|C"
    assert corpus.vocab == ["A", "B", "C", "|"]


def test_files_folder_means_every_file_under_it_but_hidden_ones(tree):
    corpus = load_files("src", separator="")
    assert corpus.decode(corpus.ids) == "ABNC"  # src/a.py, src/b.py, src/notes.txt, src/sub/c.py
    Path("take[1]").mkdir()
    Path("take[1]/x.txt").write_text("X", encoding="utf-8")
    assert load_files("take[1]").vocab == ["X"]  # a folder name is not a pattern


def test_files_bytes_encoding(tree):
    Path("src/sub/c.py").write_bytes(b"\xff")
    corpus = load_files("src/**/*.py", separator="é", encoding="bytes")
    assert bytes(corpus.ids) == b"A\xc3\xa9B\xc3\xa9\xff"


def test_files_no_match_names_the_glob(tree):
    with pytest.raises(CorpusError, match=r"corpus glob 'src/\*\*/\*\.rs' matches no file"):
        load_files("src/**/*.rs")


def test_files_not_utf8_is_an_error_or_skipped(tree):
    Path("src/b.py").write_bytes(b"\x80B")
    with pytest.raises(CorpusError, match=r"src/b.py is not valid UTF-8 \(byte 0.*errors: skip"):
        load_files("src/**/*.py")
    with pytest.warns(UserWarning, match=r"skipped 1 of 3 files that are not valid UTF-8: src/b.py"):
        corpus = load_files("src/**/*.py", separator="", errors="skip")
    assert corpus.decode(corpus.ids) == "AC"
    assert option_problem(load_files, "corpus", glob="src/**/*.py", errors="ignore") == (
        "errors: must be one of strict, skip, got 'ignore'"
    )
    with pytest.raises(CorpusError, match=r"none of the 1 corpus files is valid UTF-8"):
        load_files("src/b.py", errors="skip")


def test_files_skip_warns_again_from_the_cache(tree):
    Path("src/b.py").write_bytes(b"\x80B")
    for _ in range(2):
        with pytest.warns(UserWarning, match=r"skipped 1 of 3"):
            corpus = load_files("src/**/*.py", separator="", errors="skip", cache=True)
        assert isinstance(corpus.ids, np.memmap) and corpus.decode(corpus.ids) == "AC"


# -- url ----------------------------------------------------------------------------------


class Server:
    """A quiet HTTP server on 127.0.0.1 serving `root`, in a thread."""

    def __init__(self, root: Path) -> None:
        class Quiet(SimpleHTTPRequestHandler):
            def log_message(self, *args):
                pass

        self.root = root
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        self.running = True

    def stop(self) -> None:
        if self.running:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.thread.join()
            self.running = False


@pytest.fixture
def server(tmp_path, monkeypatch, tiny_text):
    for var in ("http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
        monkeypatch.delenv(var.upper(), raising=False)
    root = tmp_path / "www"
    root.mkdir()
    (root / "tiny.txt").write_text(tiny_text, encoding="utf-8")
    (root / "mixed.txt").write_text(MIXED, encoding="utf-8")
    srv = Server(root)
    yield srv
    srv.stop()


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_url_downloads_once_then_works_offline(server, cache_home):
    url = server.url + "/mixed.txt"
    digest = sha256_of(server.root / "mixed.txt")
    corpus = load_url(url, sha256=digest.upper())
    assert corpus.decode(corpus.ids) == MIXED and corpus.source == url
    assert len([n for n in cached_files(cache_home, "downloads") if n.endswith("mixed.txt")]) == 1
    server.stop()
    for kwargs in ({}, {"sha256": digest}, {"cache": True}, {"encoding": "bytes"}):
        again = load_url(url, **kwargs)  # from the cache: the server is gone
        assert again.decode(again.ids) == MIXED
    assert not any(n.startswith(".") for n in cached_files(cache_home, "downloads"))


def test_url_sha256_mismatch_discards_the_download(server, cache_home):
    url = server.url + "/tiny.txt"
    wrong, right = "0" * 64, sha256_of(server.root / "tiny.txt")
    with pytest.raises(CorpusError, match=rf"sha256 mismatch for {url}: expected {wrong}, got {right}"):
        load_url(url, sha256=wrong)
    assert cached_files(cache_home, "downloads") == []
    load_url(url, sha256=right)
    server.stop()
    with pytest.raises(CorpusError, match=rf"cannot download {url}: .*cached copy's sha256 is {right}"):
        load_url(url, sha256=wrong)  # a different expected digest needs a new download


def test_url_neither_cached_nor_reachable(server):
    with pytest.raises(CorpusError, match=r"cannot download http://127.0.0.1:\d+/nope.txt: HTTP 404"):
        load_url(server.url + "/nope.txt")
    server.stop()
    with pytest.raises(CorpusError, match=r"^cannot download http://127.0.0.1:\d+/tiny.txt: [^\n]+$"):
        load_url(server.url + "/tiny.txt")


def test_url_timeout():
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts connections, never answers
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/x.txt"
        with pytest.raises(CorpusError, match=r"cannot download .*: no answer within 0.2 s"):
            load_url(url, timeout=0.2)


def test_url_bad_options():
    assert option_problem(load_url, "corpus", url="file:///etc/passwd") == (
        "url: must be an http:// or https:// URL, got 'file:///etc/passwd'"
    )
    assert option_problem(load_url, "corpus", url="http://127.0.0.1/x", sha256="abc") == (
        "sha256: must be 64 hex digits, got 'abc'"
    )
    assert option_problem(load_url, "corpus", url="http://127.0.0.1/x", timeout=0).startswith(
        "timeout: must be in (0, "
    )


# -- the ids cache ------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["utf-8", "bytes"])
def test_cached_ids_are_mapped_and_equal_in_memory_ids(tmp_path, cache_home, encoding):
    path = tmp_path / "mixed.txt"
    path.write_text("\ufeff" + MIXED, encoding="utf-8")
    plain = load_text(str(path), encoding=encoding)
    mapped = load_text(str(path), encoding=encoding, cache=True)
    assert isinstance(mapped.ids, np.memmap) and not isinstance(plain.ids, np.memmap)
    assert mapped.ids.dtype == plain.ids.dtype and np.array_equal(mapped.ids, plain.ids)
    assert (mapped.vocab, mapped.source, mapped.encoding) == (plain.vocab, plain.source, plain.encoding)
    if encoding == "utf-8":
        reference = Corpus.from_utf8(path.read_bytes())
        assert plain.vocab == reference.vocab and np.array_equal(plain.ids, reference.ids)
    assert len(cached_files(cache_home, "corpora")) == 2  # ids (.npy) and vocabulary (.json)
    again = load_text(str(path), encoding=encoding, cache=True)
    assert np.array_equal(again.ids, plain.ids) and len(cached_files(cache_home, "corpora")) == 2


def test_cache_is_rebuilt_when_the_file_changes(tmp_path, cache_home):
    path = tmp_path / "t.txt"
    path.write_text("abcabc", encoding="utf-8")
    assert load_text(str(path), cache=True).vocab == list("abc")
    before = cached_files(cache_home, "corpora")
    path.write_text("xyzxyzxyz", encoding="utf-8")  # new size
    assert load_text(str(path), cache=True).vocab == list("xyz")
    st = path.stat()
    path.write_text("uvwuvwuvw", encoding="utf-8")  # same size: the mtime tells
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    corpus = load_text(str(path), cache=True)
    assert corpus.decode(corpus.ids) == "uvwuvwuvw"
    after = cached_files(cache_home, "corpora")
    assert len(after) == 2 and not set(before) & set(after)  # the stale cache is gone


def test_files_cache_is_rebuilt_when_a_file_is_added(tree):
    assert load_files("src/**/*.py", separator="", cache=True).vocab == list("ABC")
    Path("src/d.py").write_text("D", encoding="utf-8")
    corpus = load_files("src/**/*.py", separator="", cache=True)
    assert corpus.decode(corpus.ids) == "ABDC"  # src/a.py, src/b.py, src/d.py, src/sub/c.py


@pytest.mark.parametrize("damage", ["truncate", "garbage", "no vocabulary"])
def test_broken_cache_is_rebuilt(tmp_path, cache_home, damage):
    path = tmp_path / "t.txt"
    path.write_text(MIXED, encoding="utf-8")
    load_text(str(path), cache=True)
    npy = next((cache_home / "corpora").glob("*.npy"))
    if damage == "truncate":
        npy.write_bytes(npy.read_bytes()[:-5])
    elif damage == "garbage":
        npy.write_bytes(b"not numpy")
    else:
        npy.with_suffix(".json").unlink()
    corpus = load_text(str(path), cache=True)
    assert corpus.decode(corpus.ids) == MIXED


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 5, 7, 64])
def test_streaming_joins_characters_split_across_chunks(tmp_path, chunk_size):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_bytes(b"\xef\xbb\xbf" + MIXED.encode())
    b.write_text("ü😀", encoding="utf-8")
    expected = Corpus.from_text(MIXED + "—" + "ü😀")
    options = {"source": "x", "encoding": "utf-8", "separator": "—", "chunk_size": chunk_size}
    for corpus in (
        cache.encode_files([a, b], **options),
        cache.cached_corpus([a, b], identity={"test": chunk_size}, **options),
    ):
        assert corpus.vocab == expected.vocab and np.array_equal(corpus.ids, expected.ids)


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 4, 1000])
def test_streaming_names_the_first_invalid_byte(tmp_path, chunk_size):
    path = tmp_path / "bad.txt"
    path.write_bytes("aé✓".encode() + b"\xe2\x9c" + b"z")  # a truncated 3-byte character at byte 6
    with pytest.raises(CorpusError, match=r"bad.txt is not valid UTF-8 \(byte 6: invalid continuation"):
        cache.encode_files([path], source="bad", encoding="utf-8", chunk_size=chunk_size)
    path.write_bytes("aé✓".encode() + b"\xe2\x9c")  # ... cut off by the end of the file
    with pytest.raises(CorpusError, match=r"not valid UTF-8 \(byte 6: unexpected end of data"):
        cache.encode_files([path], source="bad", encoding="utf-8", chunk_size=chunk_size)


def test_empty_file_is_empty_corpus(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_bytes(b"")
    for use_cache in (False, True):
        assert len(load_text(str(path), cache=use_cache).ids) == 0


# -- end to end ---------------------------------------------------------------------------


def check_run(config, plugins=()):
    result = charrnn.run_pipeline(config, plugins=plugins, stderr=io.StringIO())
    assert result.train.steps == 20
    assert result.text.startswith("the ") and len(result.text) == 4 + 50
    return result


@pytest.mark.parametrize("options", [{}, {"cache": True}, {"encoding": "bytes"}])
def test_pipeline_text(tiny_config, options):
    tiny_config["corpus"].update(options)
    check_run(tiny_config)


@pytest.mark.parametrize("use_cache", [False, True])
def test_pipeline_files(tmp_path, tiny_config, tiny_text, use_cache):
    half = len(tiny_text) // 2
    (tmp_path / "parts").mkdir()
    (tmp_path / "parts" / "1.txt").write_text(tiny_text[:half], encoding="utf-8")
    (tmp_path / "parts" / "2.txt").write_text(tiny_text[half:], encoding="utf-8")
    tiny_config["corpus"] = {
        "type": "files",
        "glob": str(tmp_path / "parts" / "*.txt"),
        "separator": "",
        "cache": use_cache,
        "val_fraction": 0.1,
    }
    check_run(tiny_config, plugins=[charrnn_plugins.files])


def test_pipeline_url(server, tiny_config):
    url = server.url + "/tiny.txt"
    tiny_config["corpus"] = {"type": "url", "url": url, "sha256": sha256_of(server.root / "tiny.txt")}
    check_run(tiny_config, plugins=[charrnn_plugins.url])
    server.stop()
    tiny_config["corpus"]["cache"] = True
    check_run(tiny_config, plugins=[charrnn_plugins.url])
