"""Shared helpers for the server tests: a trained tiny checkpoint and an in-process server on port 0."""

from __future__ import annotations

import http.client
import io
import json
import threading
from contextlib import contextmanager

import charrnn
from charrnn.loaded import LoadedModel
from charrnn_plugins.serve.engine import Engine
from charrnn_plugins.serve.server import Served, Server


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
