"""Shared helpers for the server tests: a trained tiny checkpoint and an in-process server on port 0."""

from __future__ import annotations

import http.client
import io
import json
import re
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import charrnn
from charrnn.loaded import LoadedModel
from charrnn_plugins.serve.engine import Engine
from charrnn_plugins.serve.server import Served, Server
from conftest import TINY_TEXT, tiny_pipeline


def train_tiny(tmp_path, tiny_config, steps: int = 30) -> str:
    config = dict(tiny_config, stages=["train"])
    config["train"] = dict(config["train"], steps=steps)
    charrnn.run_pipeline(config, stdout=io.StringIO(), stderr=io.StringIO())
    return config["train"]["checkpoint"]


@contextmanager
def serving(checkpoint: str, *, model=None, plugins=(), max_batch=64, queue_size=64, name="model", **options):
    """A server on 127.0.0.1:0 in a thread; yields (server, port). `model` wraps the loaded one."""
    loaded = LoadedModel.load(checkpoint, plugins=plugins, load_entrypoints=False)
    if model is not None:
        loaded.model = model(loaded.model)
    engine = Engine(loaded, max_batch=max_batch, queue_size=queue_size)
    log = io.StringIO()
    server = Server(("127.0.0.1", 0), {name: Served(name, loaded, engine)}, log=log, **options)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server, server.server_address[1]
    finally:
        server.stop(timeout=5)
        thread.join(5)


def request(port, method, path, body=None, headers=None, raw=None):
    """(status, headers, parsed JSON or text) of one request on a fresh connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    hdrs = {"Content-Type": "application/json"} if data is not None else {}
    hdrs.update(headers or {})
    conn.request(method, path, body=data, headers=hdrs)
    resp = conn.getresponse()
    text = resp.read().decode("utf-8")
    conn.close()
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = text
    return resp.status, dict(resp.getheaders()), parsed


def post(port, body, path="/v1/completions", headers=None):
    return request(port, "POST", path, body, headers)


def events(text: str) -> list:
    """The `data:` payloads of a server-sent event stream, JSON parsed but for `[DONE]`."""
    out = []
    for block in text.split("\n\n"):
        if block.startswith("data: "):
            payload = block[len("data: ") :]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def streamed_texts(chunks: list) -> tuple[dict, dict]:
    """Per choice index: the joined text and the finish reasons seen (None for every chunk but the last)."""
    texts, reasons = {}, {}
    for c in chunks:
        if c == "[DONE]":
            continue
        for choice in c["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
            reasons.setdefault(choice["index"], []).append(choice["finish_reason"])
    return texts, reasons


def tiny_checkpoint(tmp) -> str:
    """A checkpoint trained 30 steps on the tiny text (with its metrics file), in `tmp`."""
    corpus = tmp / "tiny.txt"
    corpus.write_text(TINY_TEXT, encoding="utf-8")
    return train_tiny(tmp, tiny_pipeline(corpus, tmp / "model.npz"))


@contextmanager
def cli_server(checkpoint: str, *flags: str, env=None, preexec_fn=None):
    """`python -m charrnn serve CHECKPOINT --port 0 FLAGS` in a subprocess; yields (process, port).

    Its stderr is a pipe: the first line (which names the port) is read here, the rest is the test's.
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", "charrnn", "serve", checkpoint, "--port", "0", *flags],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=preexec_fn,
    )
    try:
        line = proc.stderr.readline()
        found = re.search(r":(\d+)/", line)
        assert found, line + proc.stderr.read()
        yield proc, int(found.group(1))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def exchange(port, data: bytes, timeout: float = 10.0) -> bytes:
    """Send raw bytes on a fresh connection, half-close it, and read the reply to its end."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        return read_reply(sock, timeout)


def read_reply(sock, timeout: float = 10.0) -> bytes:
    """What the server sends until it closes the connection (at most `timeout` seconds)."""
    deadline = time.monotonic() + timeout
    data = b""
    while time.monotonic() < deadline:
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return data


def parse_reply(data: bytes) -> tuple[int, dict, object]:
    """(status, headers with lower-case names, JSON body or text) of one raw HTTP/1.x reply."""
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    text = body.decode("utf-8", "replace")
    try:
        return status, headers, json.loads(text)
    except ValueError:
        return status, headers, text
