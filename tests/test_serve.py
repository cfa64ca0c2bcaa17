"""`charrnn serve`: the OpenAI-compatible API, talked to over real HTTP on 127.0.0.1."""

from __future__ import annotations

import http.client
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from serve_helpers import events, post, request, serving, streamed_texts, tiny_checkpoint, train_tiny

import charrnn
from charrnn.engine import log_softmax
from charrnn.loaded import LoadedModel
from conftest import wait_for


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def server(checkpoint):
    with serving(checkpoint, max_tokens_limit=5000) as (srv, port):
        yield srv, port


@pytest.fixture
def port(server):
    return server[1]


def complete(port, **body):
    status, _, out = post(port, {"model": "model", **body})
    assert status == 200, out
    return out


def test_models_describe_the_checkpoint(port, checkpoint):
    status, _, out = request(port, "GET", "/v1/models")
    assert status == 200
    [card] = out["data"]
    assert out["object"] == "list"
    assert card["id"] == "model" and card["object"] == "model" and card["owned_by"] == "charrnn"
    loaded = LoadedModel.load(checkpoint, load_entrypoints=False)
    extra = card["charrnn"]
    assert extra["vocab_size"] == len(loaded.vocab.vocab)
    assert extra["model_type"] == "rnn" and extra["encoding"] == "utf-8"
    assert {"temperature", "greedy", "top_k", "top_p", "min_p", "beam"} <= set(extra["samplers"])
    assert extra["default_sampler"]["type"] == "temperature"
    assert extra["has_metrics"] is True
    assert request(port, "GET", "/v1/models/model")[2]["id"] == "model"


def test_metrics_route_gives_the_records_beside_the_checkpoint(port, checkpoint):
    status, _, out = request(port, "GET", "/v1/models/model/metrics")
    assert status == 200
    lines = Path(checkpoint.replace(".npz", ".metrics.jsonl")).read_text(encoding="utf-8").splitlines()
    assert out["data"] == [json.loads(line) for line in lines]
    assert [r["step"] for r in out["data"]] == [10, 20, 30]
    status, _, out = request(port, "GET", "/v1/models/nope/metrics")
    assert status == 404 and "served: model" in out["error"]["message"]


def test_completion_has_openai_shape_and_asked_length(port):
    out = complete(port, prompt="the ", max_tokens=37, seed=5)
    assert out["object"] == "text_completion" and out["id"].startswith("cmpl-") and out["model"] == "model"
    [choice] = out["choices"]
    assert len(choice["text"]) == 37 and choice["index"] == 0
    assert choice["finish_reason"] == "length" and choice["logprobs"] is None
    assert out["usage"] == {"prompt_tokens": 4, "completion_tokens": 37, "total_tokens": 41}


def test_same_seed_same_text_as_the_loaded_model(port, checkpoint):
    a = complete(port, prompt="the ", max_tokens=60, seed=11, n=3)
    b = complete(port, prompt="the ", max_tokens=60, seed=11, n=3)
    c = complete(port, prompt="the ", max_tokens=60, seed=12, n=3)
    texts = [ch["text"] for ch in a["choices"]]
    assert texts == [ch["text"] for ch in b["choices"]]
    assert texts != [ch["text"] for ch in c["choices"]]
    assert len(set(texts)) == 3  # n rows are independent samples
    loaded = LoadedModel.load(checkpoint, load_entrypoints=False)
    direct = loaded.generate(seed_text="the ", num_chars=60, num_samples=3, seed=11)
    assert ["the " + t for t in texts] == direct


def test_prompt_list_gives_n_choices_per_prompt(port):
    out = complete(port, prompt=["the ", "a "], n=2, max_tokens=10, seed=1, echo=True)
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    assert [c["text"][:2] for c in out["choices"]] == ["th", "th", "a ", "a "]
    assert out["usage"]["prompt_tokens"] == 6 and out["usage"]["completion_tokens"] == 40


def test_temperature_zero_is_greedy(port, checkpoint):
    out = complete(port, prompt="the ", max_tokens=20, temperature=0)
    loaded = LoadedModel.load(checkpoint, load_entrypoints=False)
    assert (
        out["choices"][0]["text"] == loaded.generate(seed_text="the ", num_chars=20, sampler="greedy")[0][4:]
    )


def test_stream_with_n_and_stop_matches_the_whole_response(port):
    body = {"prompt": "the ", "max_tokens": 200, "seed": 4, "n": 3, "stop": ["og", "at"]}
    whole = complete(port, **body)
    status, headers, text = post(port, {"model": "model", **body, "stream": True})
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    chunks = events(text)
    assert chunks[-1] == "[DONE]"
    texts, reasons = streamed_texts(chunks)
    assert texts == {c["index"]: c["text"] for c in whole["choices"]}
    for index, seen in reasons.items():
        assert seen[-1] == whole["choices"][index]["finish_reason"] == "stop"
        assert all(r is None for r in seen[:-1])
    assert all("og" not in t and "at" not in t for t in texts.values())


def test_stream_sends_text_in_small_pieces_and_usage_last(port):
    status, _, text = post(
        port,
        {
            "model": "model",
            "prompt": "the ",
            "max_tokens": 100,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    chunks = events(text)
    pieces = [c["choices"][0]["text"] for c in chunks[:-2] if c["choices"][0]["finish_reason"] is None]
    assert len(pieces) >= 5 and all(1 <= len(p) <= 16 for p in pieces)
    assert "".join(pieces) == "".join(c["choices"][0]["text"] for c in chunks[:-2])
    assert chunks[-2]["choices"] == [] and chunks[-2]["usage"]["completion_tokens"] == 100
    assert all(c["usage"] is None for c in chunks[:-2])


def test_echo_streams_the_prompt_first(port):
    status, _, text = post(
        port, {"model": "model", "prompt": "the ", "max_tokens": 8, "stream": True, "echo": True}
    )
    texts, _ = streamed_texts(events(text))
    assert texts[0].startswith("the ") and len(texts[0]) == 12


def test_logprobs_give_the_top_characters_at_each_position(port, checkpoint):
    out = complete(port, prompt="the ", max_tokens=12, seed=2, logprobs=3)
    choice = out["choices"][0]
    lp = choice["logprobs"]
    assert lp["tokens"] == list(choice["text"])
    assert lp["text_offset"] == list(range(12))
    loaded = LoadedModel.load(checkpoint, load_entrypoints=False)
    state = loaded.model.init_state(1)
    for ch in "the " + choice["text"][:-1]:  # the model's own distribution before each generated char
        logits, state = loaded.model.step(loaded.vocab.encode(ch), state)
        if ch == " " and len(lp["tokens"]) == 12 and "the ".endswith(ch):
            pass
    # recompute position by position
    state = loaded.model.init_state(1)
    ids = loaded.vocab.encode("the " + choice["text"])
    expected = []
    for i in range(len(ids) - 1):
        logits, state = loaded.model.step(ids[i : i + 1], state)
        if i >= 3:
            expected.append(log_softmax(logits)[0])
    for pos, (token, chosen, tops) in enumerate(
        zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True)
    ):
        want = expected[pos]
        assert chosen == pytest.approx(want[loaded.vocab.index[token]], abs=1e-5)
        best = np.argsort(-want)[:3]
        assert list(tops) == [loaded.vocab.vocab[i] for i in best]
        assert list(tops.values()) == pytest.approx([want[i] for i in best], abs=1e-5)


def test_max_tokens_zero_with_echo_gives_the_distribution_after_the_prompt(port, checkpoint):
    out = complete(port, prompt="the c", max_tokens=0, echo=True, logprobs=5)
    choice = out["choices"][0]
    assert choice["text"] == "the c"
    lp = choice["logprobs"]
    assert lp["tokens"] == list("the c") and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    loaded = LoadedModel.load(checkpoint, load_entrypoints=False)
    state = loaded.model.init_state(1)
    for ch in "the c":
        logits, state = loaded.model.step(loaded.vocab.encode(ch), state)
    want = log_softmax(logits)[0]
    best = np.argsort(-want)[:5]
    nxt = lp["next_top_logprobs"]
    assert list(nxt) == [loaded.vocab.vocab[i] for i in best]
    assert list(nxt.values()) == pytest.approx([want[i] for i in best], abs=1e-5)
    assert out["usage"]["completion_tokens"] == 0


def test_charrnn_extras_select_samplers(port, checkpoint):
    loaded = LoadedModel.load(checkpoint, load_entrypoints=False)
    beam = complete(port, prompt="the ", max_tokens=15, beam_width=3)
    want = loaded.generate(seed_text="the ", num_chars=15, sampler={"type": "beam", "beam_width": 3})[0]
    assert beam["choices"][0]["text"] == want[4:]
    k1 = complete(port, prompt="the ", max_tokens=15, top_k=1, seed=3)
    greedy = loaded.generate(seed_text="the ", num_chars=15, sampler="greedy")[0]
    assert k1["choices"][0]["text"] == greedy[4:]  # top_k 1 keeps only the argmax
    tiny_p = complete(port, prompt="the ", max_tokens=15, top_p=0.01, seed=9)
    assert tiny_p["choices"][0]["text"] == greedy[4:]
    for extra in ({"min_p": 0.5}, {"repetition_penalty": 1.3}, {"sampler": "top_k", "top_k": 3}):
        a = complete(port, prompt="the ", max_tokens=30, seed=1, **extra)
        b = complete(port, prompt="the ", max_tokens=30, seed=1, **extra)
        assert len(a["choices"][0]["text"]) == 30 and a["choices"] == b["choices"]


BAD_REQUESTS = [
    ({"prompt": "the Z"}, 400, "prompt", "'Z'"),
    ({"model": "nope"}, 404, "model", "served: model"),
    ({"top_k": 0}, 400, "top_k", "top_k: must be in [1, 1048576], got 0"),
    ({"temperature": -1}, 400, "temperature", "temperature: must be in [0, 100], got -1"),
    ({"temperature": 1e38}, 400, "temperature", "temperature: must be in [0, 100], got 1e+38"),
    ({"temperature": "hot"}, 400, "temperature", "number"),
    ({"top_p": 1.5}, 400, "top_p", "(0, 1]"),
    ({"min_p": 2}, 400, "min_p", "[0, 1]"),
    ({"repetition_penalty": 0}, 400, "repetition_penalty", "must be in (0, 100], got 0"),
    ({"beam_width": 0}, 400, "beam_width", "beam_width: must be in [1, 32], got 0"),
    ({"beam_width": 10**6}, 400, "beam_width", "beam_width: must be in [1, 32], got 1000000"),
    ({"beam_width": 32, "max_tokens": 4096, "n": 2}, 400, "beam_width", "must be at most 131,072"),
    ({"prompt": "a" * 40_000}, 400, "prompt", "at most 32768 characters per prompt"),
    ({"prompt": ["the ", "a" * 40_000]}, 400, "prompt", "at most 32768 characters per prompt"),
    ({"max_tokens": 5001}, 400, "max_tokens", "[0, 5000]"),
    ({"max_tokens": -1}, 400, "max_tokens", "[0, 5000]"),
    ({"n": 0}, 400, "n", "[1, 64]"),
    ({"n": 40, "prompt": ["a", "b"]}, 400, "n", "at most 64"),
    ({"logprobs": 99}, 400, "logprobs", "[0, 20]"),
    ({"stop": 3}, 400, "stop", "string"),
    ({"seed": 1.5}, 400, "seed", "integer"),
    ({"stream": "yes"}, 400, "stream", "true or false"),
    ({"stream_options": {"include_usage": True}}, 400, "stream_options", "stream: true"),
    ({"prompt": [1, 2, 3]}, 400, "prompt", "token ids"),
    ({"suffix": "end"}, 400, "suffix", "not supported"),
    ({"best_of": 3}, 400, "best_of", "not supported"),
    ({"logit_bias": {"1": 5}}, 400, "logit_bias", "not supported"),
    ({"presence_penalty": 0.5}, 400, "presence_penalty", "not supported"),
    ({"frequency_penalty": 1}, 400, "frequency_penalty", "not supported"),
    ({"top_k": 3, "top_p": 0.5}, 400, "top_p", "cannot be combined"),
    ({"sampler": "nope"}, 400, "sampler", "known:"),
    ({"sampler": "greedy", "top_k": 3}, 400, "top_k", "does not apply"),
    ({"sampler": "beam", "temperature": 0.5}, 400, "temperature", "does not apply"),
    ({"wat": 1}, 400, "wat", "wat: unknown key; known keys: model, prompt, max_tokens"),
    ({"temperatur": 1}, 400, "temperatur", "temperatur: unknown key (did you mean 'temperature'?)"),
    ({"beam_width": 2, "logprobs": 2}, 400, "logprobs", "searches"),
]


@pytest.mark.parametrize(("fields", "status", "param", "words"), BAD_REQUESTS)
def test_client_mistakes_are_4xx_in_openai_shape(port, fields, status, param, words):
    got, _, out = post(port, {"model": "model", "prompt": "the ", "max_tokens": 5, **fields})
    assert got == status, out
    error = out["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and words in error["message"], error
    assert "/" not in error["message"].split("served")[0] or "tmp" not in error["message"]  # no server paths


def test_inert_fields_at_their_defaults_are_accepted(port):
    out = complete(
        port,
        prompt="the ",
        max_tokens=3,
        suffix=None,
        best_of=1,
        logit_bias={},
        presence_penalty=0,
        frequency_penalty=0.0,
        user="me",
        top_p=1,
        temperature=1,
    )
    assert len(out["choices"][0]["text"]) == 3


def test_protocol_mistakes_are_4xx_and_the_server_goes_on(port):
    cases = [
        (request(port, "POST", "/v1/completions", raw=b"{not json"), 400, "invalid_json"),
        (request(port, "POST", "/v1/completions", raw=b"[1, 2]"), 400, None),
        (
            request(
                port,
                "POST",
                "/v1/completions",
                raw=b'{"prompt": "a"}',
                headers={"Content-Type": "text/plain"},
            ),
            415,
            "unsupported_media_type",
        ),
        (request(port, "POST", "/v1/completions", raw=b"\xff\xfe"), 400, "invalid_json"),
        (request(port, "GET", "/v1/nothing"), 404, "not_found"),
        (request(port, "GET", "/v1/completions"), 405, "method_not_allowed"),
        (request(port, "PUT", "/v1/models"), 405, "method_not_allowed"),
        (request(port, "BREW", "/health"), 405, "method_not_allowed"),
        (
            request(
                port,
                "POST",
                "/v1/chat/completions",
                {"model": "model", "messages": [{"role": "user", "content": "the "}]},
            ),
            400,
            "chat_not_supported",
        ),
        (request(port, "GET", "/static/../../etc/passwd"), 404, "not_found"),
    ]
    for (status, _headers, out), want, code in cases:
        assert status == want, out
        assert out["error"]["code"] == code, out
    assert "/v1/completions" in cases[8][0][2]["error"]["message"]
    assert cases[5][0][1]["Allow"] == "POST"
    assert request(port, "GET", "/health")[0] == 200


def read_all(sock):
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data.decode()


def test_missing_content_length_is_411(port):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\r\n")
        reply = read_all(sock)
    assert reply.startswith("HTTP/1.1 411") and '"length_required"' in reply


def test_an_oversize_body_is_413_before_it_is_read(port):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 2000000\r\n\r\n{"
        )
        reply = read_all(sock)
    assert reply.startswith("HTTP/1.1 413") and '"body_too_large"' in reply and "1048576" in reply
    assert request(port, "GET", "/health")[0] == 200


def test_a_malformed_request_line_is_400_in_openai_shape(port):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1 extra\r\n\r\n")
        reply = read_all(sock)
    assert reply.startswith("HTTP/1.1 400"), reply
    assert '"error"' in reply


def test_one_log_line_per_request(checkpoint):
    with serving(checkpoint) as (srv, port):
        complete(port, prompt="the ", max_tokens=21)
        assert wait_for(lambda: srv.log.getvalue().count("\n") == 1)  # written after the reply
        request(port, "GET", "/nowhere")
        assert wait_for(lambda: srv.log.getvalue().count("\n") == 2)
        time.sleep(0.05)
        lines = srv.log.getvalue().splitlines()
    assert len(lines) == 2
    method, route, status, chars, ms = lines[0].split()
    assert (method, route, status, chars) == ("POST", "/v1/completions", "200", "21") and ms.endswith("ms")
    assert lines[1].split()[:4] == ["GET", "/nowhere", "404", "0"]


def test_keep_alive_serves_several_requests_on_one_connection(port):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    for _ in range(3):
        conn.request(
            "POST",
            "/v1/completions",
            body=json.dumps({"model": "model", "max_tokens": 4}),
            headers={"Content-Type": "application/json"},
        )
        resp = conn.getresponse()
        assert resp.status == 200 and len(json.loads(resp.read())["choices"][0]["text"]) == 4
    conn.close()


def test_static_page_from_package_data_with_its_content_type(server):
    srv, port = server
    saved = dict(srv.static)
    try:
        srv.static.clear()
        status, _, out = request(port, "GET", "/")
        assert status == 404 and out["error"]["code"] == "not_found"
        srv.static.update(
            {
                "index.html": (b"<!doctype html><p>hi", "text/html; charset=utf-8"),
                "app.js": (b"1", "text/javascript; charset=utf-8"),
            }
        )
        status, headers, out = request(port, "GET", "/")
        assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8" and out.endswith("hi")
        status, headers, _ = request(port, "GET", "/static/app.js")
        assert status == 200 and headers["Content-Type"].startswith("text/javascript")
        assert request(port, "GET", "/static/missing.css")[0] == 404
    finally:
        srv.static.clear()
        srv.static.update(saved)


def test_chat_last_user_uses_the_last_user_message(checkpoint):
    with serving(checkpoint, chat="last-user") as (_, port):
        messages = [
            {"role": "user", "content": "a "},
            {"role": "assistant", "content": "x"},
            {"role": "user", "content": "the "},
        ]
        status, _, out = post(
            port, {"model": "model", "messages": messages, "max_tokens": 9, "seed": 2}, "/v1/chat/completions"
        )
        assert status == 200 and out["object"] == "chat.completion"
        plain = complete(port, prompt="the ", max_tokens=9, seed=2)["choices"][0]["text"]
        assert out["choices"][0]["message"] == {"role": "assistant", "content": plain}
        status, _, text = post(
            port,
            {"model": "model", "messages": messages, "max_tokens": 9, "seed": 2, "stream": True},
            "/v1/chat/completions",
        )
        chunks = [c for c in events(text) if c != "[DONE]"]
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == plain
        status, _, out = post(
            port, {"model": "model", "messages": [{"role": "system", "content": "x"}]}, "/v1/chat/completions"
        )
        assert status == 400 and out["error"]["param"] == "messages"


def test_auth_requires_the_bearer_key_but_not_for_health(checkpoint):
    with serving(checkpoint, api_key="s3cret") as (_, port):
        assert request(port, "GET", "/health")[0] == 200
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": "s3cret"},
            {"Authorization": "Basic s3cret"},
        ):
            status, hdrs, out = request(port, "GET", "/v1/models", headers=headers)
            assert (
                status == 401
                and out["error"]["code"] == "invalid_api_key"
                and hdrs["WWW-Authenticate"] == "Bearer"
            )
            assert post(port, {"model": "model"}, headers=headers)[0] == 401
        ok = {"Authorization": "Bearer s3cret"}
        assert request(port, "GET", "/v1/models", headers=ok)[0] == 200
        assert post(port, {"model": "model", "max_tokens": 3}, headers=ok)[0] == 200


def test_disconnect_stops_generation_at_the_next_chunk(server):
    srv, port = server
    engine = srv.models["model"].engine
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    body = json.dumps({"model": "model", "prompt": "the ", "max_tokens": 5000, "stream": True}).encode()
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    received = b""
    while b"data: " not in received:
        received += sock.recv(4096)
    sock.close()
    assert wait_for(lambda: not engine.groups)
    steps = engine.steps
    time.sleep(0.2)
    assert engine.steps == steps
    assert wait_for(lambda: " 499 " in srv.log.getvalue())


class Gate:
    """A model whose steps wait for `open`: holds the batch still while requests queue.

    Its requests have one-character prompts, which prime without a step.
    """

    def __init__(self, model):
        self.model, self.open = model, threading.Event()
        self.vocab_size, self.dtype = model.vocab_size, model.dtype
        self.calls = 0  # steps begun

    def init_state(self, k):
        return self.model.init_state(k)

    def step(self, ids, state):
        self.calls += 1
        self.open.wait(10)
        return self.model.step(ids, state)


def test_full_queue_answers_429_with_retry_after(checkpoint):
    with serving(checkpoint, model=Gate, max_batch=1, queue_size=1) as (srv, port):
        gate = srv.models["model"].loaded.model
        results = []

        def call():
            results.append(post(port, {"model": "model", "prompt": "t", "max_tokens": 20}))

        first = threading.Thread(target=call)
        first.start()  # primes, then waits in its first step: the batch is full
        engine = srv.models["model"].engine
        assert wait_for(lambda: engine.groups)
        second = threading.Thread(target=call)
        second.start()  # waits in the queue
        assert wait_for(lambda: len(engine.waiting) == 1)
        status, headers, out = post(port, {"model": "model", "prompt": "t", "max_tokens": 20})
        assert status == 429 and headers["Retry-After"] == "1" and out["error"]["code"] == "queue_full"
        gate.open.set()
        first.join(10)
        second.join(10)
        assert sorted(r[0] for r in results) == [200, 200]


#: per request: samplers sampled together in one argmax (temperature, greedy) and called alone
MIXED = [
    {},
    {"top_k": 5},
    {"temperature": 0},
    {"logprobs": 2},
    {"temperature": 0.7},
    {"repetition_penalty": 1.3},
]


def test_concurrent_requests_share_batched_steps(checkpoint):
    with serving(checkpoint, model=Gate) as (srv, port):
        gate = srv.models["model"].loaded.model
        engine = srv.models["model"].engine
        results = {}

        def call(i):
            results[i] = complete(port, prompt="t", max_tokens=40, seed=i, **MIXED[i])

        threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
        threads[0].start()
        assert wait_for(lambda: engine.groups)
        for t in threads[1:]:
            t.start()
        assert wait_for(lambda: len(engine.waiting) == 5)
        gate.open.set()
        for t in threads:
            t.join(10)
        assert len(results) == 6 and all(len(r["choices"][0]["text"]) == 40 for r in results.values())
        assert engine.steps <= 2 * 40  # 6 x 40 characters in at most two passes, not six
        for i in range(6):  # the texts do not depend on what shared the batch
            alone = complete(port, prompt="t", max_tokens=40, seed=i, **MIXED[i])
            assert results[i]["choices"][0]["text"] == alone["choices"][0]["text"], MIXED[i]
            shared, own = results[i]["choices"][0]["logprobs"], alone["choices"][0]["logprobs"]
            if own is not None:  # equal up to the rounding of a batched product
                assert shared["tokens"] == own["tokens"]
                np.testing.assert_allclose(shared["token_logprobs"], own["token_logprobs"], atol=1e-4)


@pytest.mark.slow
def test_a_burst_of_32_streaming_clients_all_complete(port):
    results = {}

    def client(i):
        status, _, text = post(
            port,
            {
                "model": "model",
                "prompt": "the ",
                "max_tokens": 50 + i,
                "stream": True,
                "seed": i,
                "n": 1 + i % 2,
            },
        )
        results[i] = (status, text)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 32
    for i, (status, text) in results.items():
        assert status == 200
        chunks = events(text)
        assert chunks[-1] == "[DONE]"
        texts, reasons = streamed_texts(chunks)
        assert len(texts) == 1 + i % 2
        assert all(len(t) == 50 + i for t in texts.values())
        assert all(r[-1] == "length" for r in reasons.values())


HAS_OPENAI = importlib.util.find_spec("openai") is not None
needs_openai = pytest.mark.skipif(
    not HAS_OPENAI and not os.environ.get("CI"), reason="the openai client (test extra) is not installed"
)


@needs_openai
def test_the_openai_client_drives_the_server(port):
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["model"]
    out = client.completions.create(model="model", prompt="the ", max_tokens=25, seed=8, n=2, logprobs=2)
    assert len(out.choices) == 2 and all(len(c.text) == 25 for c in out.choices)
    assert out.usage.completion_tokens == 50 and len(out.choices[0].logprobs.tokens) == 25
    stream = client.completions.create(model="model", prompt="the ", max_tokens=25, seed=8, n=2, stream=True)
    texts = {}
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    assert texts == {c.index: c.text for c in out.choices}
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="model", prompt="the Z", max_tokens=5)
    assert "'Z'" in str(err.value)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="the ", max_tokens=5)


def test_serve_is_a_command_plugin():
    from charrnn.plugins import Registry, get_plugin_manager

    commands = Registry(get_plugin_manager(load_entrypoints=False)).components["command"]
    assert commands["serve"].plugin == "charrnn_plugins.serve"


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--host", "0.0.0.0"], "--api-key"),
        (["--max-tokens-limit", "0"], "--max-tokens-limit"),
        (["--port", "70000"], "--port"),
        (["--api-key", " "], "empty"),
        (["--api-key", ""], "--api-key is empty"),
        (["--queue-size", "0"], "--queue-size"),
        (["--max-connections", "0"], "--max-connections"),
        (["--request-timeout", "0"], "--request-timeout"),
        (["--request-timeout", "nan"], "--request-timeout"),
    ],
)
def test_serve_refuses_bad_flags_in_one_line(checkpoint, capsys, monkeypatch, argv, words):
    from charrnn.cli import main

    monkeypatch.delenv("CHARRNN_API_KEY", raising=False)
    assert main(["serve", checkpoint, *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and words in err


def test_serve_refuses_a_missing_checkpoint(tmp_path, capsys):
    from charrnn.cli import main

    assert main(["serve", str(tmp_path / "none.npz")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_non_loopback_binds_with_a_key_or_no_auth(checkpoint, monkeypatch):
    import argparse

    from charrnn_plugins.serve import Serve, build

    parser = argparse.ArgumentParser()
    Serve().add_arguments(parser)
    monkeypatch.setenv("CHARRNN_API_KEY", "k")
    for extra in ([], ["--no-auth"]):
        if extra:
            monkeypatch.delenv("CHARRNN_API_KEY")
        server = build(parser.parse_args([checkpoint, "--host", "0.0.0.0", "--port", "0", *extra]))
        assert (server.api_key == b"k") is not bool(extra)
        server.stop(timeout=1)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_cuts_open_streams_cleanly_and_exits_0(checkpoint, cli_env, sig):
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "charrnn",
            "serve",
            checkpoint,
            "--port",
            "0",
            "--max-tokens-limit",
            "1000000",
        ],
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env,
    )
    try:
        line = proc.stderr.readline()
        port = int(re.search(r":(\d+)/", line).group(1))
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        body = {"model": "model", "prompt": "the ", "max_tokens": 1_000_000, "stream": True}  # cut, not done
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        first = resp.fp.readline()
        assert first.startswith(b"data: ")
        proc.send_signal(sig)
        rest = resp.read().decode()
        assert rest.rstrip().endswith("data: [DONE]")
        last = events(rest)[-2]  # a cut stream says so: an error, not a finish reason
        assert last["error"]["code"] == "shutting_down" and "cut" in last["error"]["message"]
        assert proc.wait(timeout=20) == 0
        err = proc.stderr.read()
        assert "Traceback" not in err and "POST /v1/completions 200" in err
        conn.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def readme_block(after: str, lang: str) -> str:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Serve a model") :]
    return re.search(rf"{re.escape(after)}.*?```{lang}\n(.*?)```", section, re.S).group(1)


@needs_openai
def test_readme_openai_and_curl_snippets_run_as_written(checkpoint, tmp_path):
    with serving(checkpoint, name="final_model", max_tokens_limit=5000) as (_, port):
        code = readme_block("**The `openai` client**", "python").replace("8000", str(port))
        code = code.replace('"ROMEO:"', '"the "')  # the tiny model's vocabulary has no capitals
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert len(done.stdout) == 200 + 1 + 200  # a text, its newline, a streamed text
        if shutil.which("curl"):
            script = readme_block("**curl**", "bash").replace("8000", str(port)).replace("ROMEO:", "the ")
            done = subprocess.run(["bash", "-ec", script], capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stderr
            assert '"text_completion"' in done.stdout and "data: [DONE]" in done.stdout


class BrokenSampler:
    def __init__(self, temperature: float = 1.0) -> None:
        pass

    def __call__(self, logits, rng):
        raise RuntimeError("boom")


class WildSampler(BrokenSampler):
    def __call__(self, logits, rng):
        return np.full(len(logits), logits.shape[1] + 5)  # ids outside the vocabulary


class NosySampler(BrokenSampler):
    """Samples fine; its `observe` raises once generation has begun (the prompt's id is seen first)."""

    seen = 0

    def __call__(self, logits, rng):
        return logits.argmax(1)

    def observe(self, ids):
        self.seen += 1
        if self.seen > 2:
            raise RuntimeError("nosy")


class BrokenPlugin:
    @charrnn.hookimpl
    def charrnn_sampler(self, register):
        register("broken", BrokenSampler)
        register("wild", WildSampler)
        register("nosy", NosySampler)


@pytest.mark.parametrize(
    ("sampler", "words"),
    [("broken", "boom"), ("wild", "returned [22]: expected integer ids in [0, 17)"), ("nosy", "nosy")],
)
def test_a_failing_sampler_plugin_is_a_500_naming_it_and_the_batch_goes_on(checkpoint, sampler, words):
    with serving(checkpoint, model=Gate, plugins=[BrokenPlugin()]) as (srv, port):
        gate = srv.models["model"].loaded.model
        engine = srv.models["model"].engine
        results = {}

        def call(key, **fields):
            results[key] = post(port, {"model": "model", "prompt": "t", "max_tokens": 40, **fields})

        threads = [
            threading.Thread(target=call, args=("good",), kwargs={"seed": 1}),
            threading.Thread(target=call, args=("bad",), kwargs={"sampler": sampler}),
        ]
        threads[0].start()
        assert wait_for(lambda: engine.groups)
        threads[1].start()
        assert wait_for(lambda: engine.waiting)  # joins the good one's batch at its next chunk
        gate.open.set()
        for t in threads:
            t.join(10)
        status, _, out = results["bad"]
        assert status == 500 and f"sampler {sampler!r}" in out["error"]["message"], out
        assert words in out["error"]["message"]
        status, _, out = results["good"]
        assert status == 200 and len(out["choices"][0]["text"]) == 40
        assert post(port, {"model": "model", "prompt": "t", "max_tokens": 5})[0] == 200


def test_a_client_gone_before_a_whole_response_stops_its_generation(checkpoint):
    with serving(checkpoint, model=Gate, max_tokens_limit=5000) as (srv, port):
        gate = srv.models["model"].loaded.model
        engine = srv.models["model"].engine
        body = json.dumps({"model": "model", "prompt": "t", "max_tokens": 5000}).encode()
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        assert wait_for(lambda: engine.groups)
        sock.close()
        assert wait_for(lambda: " 499 " in srv.log.getvalue())
        gate.open.set()
        assert wait_for(lambda: not engine.groups)
        assert engine.steps <= 32  # cut at the next chunk, not after 5000 characters


def test_a_bytes_model_serves_utf8_text_and_logprobs(tmp_path, tiny_config):
    tiny_config["corpus"]["encoding"] = "bytes"
    tiny_config["train"]["checkpoint"] = str(tmp_path / "bytes.npz")
    path = train_tiny(tmp_path, tiny_config, steps=5)
    with serving(path) as (_, port):
        out = complete(port, prompt="caf\u00e9 ", max_tokens=30, seed=1, logprobs=2, echo=True)
        choice = out["choices"][0]
        assert choice["text"].startswith("caf\u00e9 ")
        lp = choice["logprobs"]
        assert lp["tokens"][:3] == ["c", "a", "f"] and lp["tokens"][3].startswith("bytes:\\x")
        assert len(lp["tokens"]) == len("caf\u00e9 ".encode()) + 30
        status, _, text = post(port, {"model": "model", "prompt": "the ", "max_tokens": 40, "stream": True})
        assert status == 200 and events(text)[-1] == "[DONE]"


class WildSearch:
    """A searching sampler whose search returns ids outside the vocabulary."""

    def __call__(self, logits, rng):
        return logits.argmax(1)

    def search(self, model, state, last_ids, num_chars, rng):
        return np.full((len(last_ids), num_chars), 10**6)


class WildSearchPlugin:
    @charrnn.hookimpl
    def charrnn_sampler(self, register):
        register("wild_search", WildSearch)


def test_ids_from_a_search_are_checked_where_every_id_is_and_name_the_plugin(checkpoint):
    """Regression: the server's search path did not check ids: 500 `IndexError: list index out of
    range`, naming nobody; `charrnn generate` said which plugin failed."""
    with serving(checkpoint, plugins=[WildSearchPlugin()]) as (srv, port):
        status, _, out = post(
            port, {"model": "model", "prompt": "t", "max_tokens": 5, "sampler": "wild_search"}
        )
        assert status == 500, out
        message = out["error"]["message"]
        assert "(sampler 'wild_search') failed: search returned" in message
        assert "expected integer ids in [0, " in message and "IndexError" not in message
        assert post(port, {"model": "model", "prompt": "t", "max_tokens": 5})[0] == 200


def test_a_search_stops_between_steps_when_its_client_is_gone(checkpoint):
    """Regression: a beam search ran to its end after its client had gone, holding the model."""
    with serving(checkpoint, model=Gate, max_tokens_limit=4096) as (srv, port):
        gate = srv.models["model"].loaded.model
        body = json.dumps({"model": "model", "prompt": "t", "max_tokens": 4000, "beam_width": 32}).encode()
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        assert wait_for(lambda: gate.calls > 0)  # the search has begun (held at the gate)
        sock.close()
        assert wait_for(lambda: " 499 " in srv.log.getvalue())
        held = gate.calls
        gate.open.set()
        assert wait_for(lambda: post(port, {"model": "model", "prompt": "t", "max_tokens": 3})[0] == 200)
        assert gate.calls - held < 100  # it stopped at its next step, not after 4,000 of them
