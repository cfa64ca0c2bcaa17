"""`charrnn serve` against hostile clients, over raw sockets on 127.0.0.1 (issue 16, defect 5).

Every probe is bounded in count and time: deadlines are made short through the server's
constructor, and the subprocess tests run the real command with its default flags.
"""

from __future__ import annotations

import http.client
import json
import resource
import signal
import socket
import threading
import time

import numpy as np
import pytest
from serve_helpers import (
    cli_server,
    events,
    exchange,
    parse_reply,
    post,
    read_reply,
    request,
    serving,
    tiny_checkpoint,
)

from charrnn import options
from charrnn_plugins.serve.api import CompletionBody
from charrnn_plugins.serve.server import MAX_CONNECTIONS, REQUEST_TIMEOUT, json_depth
from conftest import wait_for

KEY = "s3cret"
AUTH = {"Authorization": f"Bearer {KEY}"}
TIMEOUT = 1.0  # the request deadline of the servers in this file, in seconds


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("hostile"))


@pytest.fixture(scope="module")
def keyed(checkpoint):
    """A server with an API key and a short request deadline: (server, port)."""
    with serving(checkpoint, api_key=KEY, request_timeout=TIMEOUT) as (srv, port):
        yield srv, port


@pytest.fixture
def port(keyed):
    return keyed[1]


def is_error(out) -> bool:
    """Whether a body is OpenAI's error shape."""
    return isinstance(out, dict) and set(out.get("error", {})) == {"message", "type", "param", "code"}


def raw(port, head: str, body: bytes = b"") -> tuple[int, dict, object]:
    return parse_reply(exchange(port, head.encode("latin-1") + b"\r\n\r\n" + body))


# -- connections and threads ----------------------------------------------------------------


def test_the_default_limits_are_the_documented_flags(checkpoint):
    import argparse

    from charrnn_plugins.serve import Serve

    parser = argparse.ArgumentParser()
    Serve().add_arguments(parser)
    args = parser.parse_args([checkpoint])
    assert args.max_connections == MAX_CONNECTIONS == 256
    assert args.request_timeout == REQUEST_TIMEOUT == 30


def test_an_empty_charrnn_api_key_is_refused_not_ignored(checkpoint, capsys, monkeypatch):
    """An empty variable (`CHARRNN_API_KEY="$UNSET_KEY"`) meant a key: it must not serve without one."""
    from charrnn.cli import main

    monkeypatch.setenv("CHARRNN_API_KEY", "")
    assert main(["serve", checkpoint]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "CHARRNN_API_KEY" in err and "empty" in err, err


def test_an_empty_key_given_to_the_server_is_refused(checkpoint):
    from charrnn_plugins.serve.server import Server

    with pytest.raises(ValueError, match="empty"):
        Server(("127.0.0.1", 0), {}, api_key="")


def busy(srv) -> bool:
    """Whether every open connection of the server is inside a request (none idle)."""
    with srv.connections_lock:
        return all(not c.idle for c in srv.connections.values())


def test_beyond_the_cap_a_connection_gets_503_with_retry_after(checkpoint):
    with serving(checkpoint, max_connections=4, request_timeout=20) as (srv, port):
        held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(4)]
        try:
            for sock in held:  # each inside a request whose headers never end
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            assert wait_for(lambda: len(srv.connections) == 4 and busy(srv))
            status, headers, out = parse_reply(
                exchange(port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", timeout=10)
            )
            assert status == 503 and headers["retry-after"] == "1", out
            assert is_error(out) and out["error"]["code"] == "too_many_connections"
            assert "4 connections" in out["error"]["message"]
        finally:
            for sock in held:
                sock.close()
        assert wait_for(lambda: not srv.connections)
        assert request(port, "GET", "/health")[0] == 200


def test_idle_connections_make_room_for_a_request(checkpoint):
    """Connections that never send a byte are closed, oldest first, when the cap is reached."""
    with serving(checkpoint, max_connections=4, request_timeout=20) as (srv, port):
        idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(12)]
        try:
            assert wait_for(lambda: len(srv.connections) == 4)
            assert request(port, "GET", "/health")[0] == 200
            assert len(srv.connections) <= 4
            closed = 0
            for sock in idle[:8]:  # the oldest were closed by the server to make room
                sock.settimeout(5)
                closed += sock.recv(1) == b""
            assert closed == 8
        finally:
            for sock in idle:
                sock.close()


@pytest.mark.slow
def test_150_slow_clients_hold_no_more_threads_than_the_cap(checkpoint):
    """Each sends a byte a second: at most `cap` get a thread (cut at the deadline), the rest a 503."""
    cap = 20
    with serving(checkpoint, max_connections=cap, request_timeout=3) as (srv, port):
        base = threading.active_count()
        message = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
        socks, replies = [], {}
        try:
            for _ in range(150):
                sock = socket.create_connection(("127.0.0.1", port), timeout=10)
                sock.sendall(message[:1])
                socks.append(sock)
                assert wait_for(lambda: busy(srv))  # its first byte is seen: not an idle connection
            most = threading.active_count()
            for k in range(1, 5):  # for longer than the deadline
                time.sleep(1)
                most = max(most, threading.active_count())
                for i, sock in enumerate(socks):
                    if i not in replies and readable(sock):
                        replies[i] = read_reply(sock)
                    elif i not in replies:
                        sock.send(message[k : k + 1])
            for i, sock in enumerate(socks):
                if i not in replies:
                    replies[i] = read_reply(sock)
        finally:
            for sock in socks:
                sock.close()
        assert most <= base + cap, (base, most)
        statuses = [parse_reply(r)[0] for r in replies.values()]
        assert statuses.count(408) == cap and statuses.count(503) == 150 - cap, statuses


def readable(sock) -> bool:
    import select

    return bool(select.select([sock], [], [], 0)[0])


def limit_descriptors():  # in the child, before exec: the 1,024 descriptors of a default shell
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))


@pytest.mark.slow
def test_health_answers_while_1100_idle_connections_are_open(checkpoint, cli_env):
    """At 1,024 descriptors, 1,100 idle connections used to leave none for /health (it hung)."""
    with cli_server(checkpoint, env=cli_env, preexec_fn=limit_descriptors) as (proc, port):
        idle = []
        try:
            for _ in range(1100):
                idle.append(socket.create_connection(("127.0.0.1", port), timeout=10))
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", "/health")
            resp = conn.getresponse()
            assert resp.status == 200 and json.loads(resp.read())["status"] == "ok"
            conn.close()
        finally:
            for sock in idle:
                sock.close()
        assert proc.poll() is None


# -- one deadline per request ---------------------------------------------------------------


def test_a_client_dribbling_a_byte_at_a_time_is_cut_with_408(port):
    message = (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Content-Length: 30\r\n\r\n{"model": "model", "n": 1}    '
    )
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sent, reply = 0, b""
        for byte in message:
            sock.sendall(bytes([byte]))
            sent += 1
            sock.settimeout(0.25)  # each byte a quarter of a second after the last
            try:
                reply = sock.recv(65536)
            except TimeoutError:
                continue
            break
        reply += read_reply(sock)
    assert sent < len(message), "the whole request went through: no deadline"
    status, headers, out = parse_reply(reply)
    assert status == 408 and is_error(out) and out["error"]["code"] == "request_timeout", out
    assert out["error"]["type"] == "invalid_request_error" and headers["connection"] == "close"


@pytest.mark.parametrize(
    "partial",
    [
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Content-Length: 100\r\n\r\n{"model": "model"',  # a body shorter than its length
        b"GET /health HTTP/1.1\r\nHost: x\r\n",  # headers that never end
        b"GET /heal",  # a request line that never ends
    ],
)
def test_a_request_that_stops_arriving_is_408_at_the_deadline_not_500(keyed, partial):
    srv, port = keyed
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(partial)  # and the connection is held open
        reply = read_reply(sock, timeout=10 * TIMEOUT)
    status, _, out = parse_reply(reply)
    assert status == 408 and is_error(out), reply
    assert f"{TIMEOUT:g} s" in out["error"]["message"]
    assert request(port, "GET", "/health")[0] == 200


def test_an_idle_connection_is_closed_at_the_deadline_without_a_reply(port):
    with socket.create_connection(("127.0.0.1", port), timeout=10 * TIMEOUT) as sock:
        assert sock.recv(1) == b""  # closed by the server (a TimeoutError here: kept open)


@pytest.mark.slow
def test_keep_alive_gets_a_fresh_deadline_per_request(port):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    for _ in range(3):
        conn.request("GET", "/health")
        assert conn.getresponse().read()
        time.sleep(TIMEOUT * 0.6)  # together longer than one deadline, each wait shorter
    conn.request("GET", "/health")
    assert conn.getresponse().status == 200
    conn.close()


# -- framing: Content-Length, Transfer-Encoding, versions -----------------------------------

BAD_LENGTHS = ["\xb2", "-1", "abc", "+5", "5.0", "0x10", "", "1" * 30, "9" * 5000, "1 2"]


@pytest.mark.parametrize("value", BAD_LENGTHS, ids=lambda v: repr(v[:8]))
@pytest.mark.parametrize(
    ("method", "path"), [("POST", "/v1/completions"), ("GET", "/health"), ("GET", "/nope")]
)
def test_a_bad_content_length_is_a_400_naming_it_before_auth(port, value, method, path):
    status, headers, out = raw(
        port,
        f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {value}",
    )
    assert status == 400, out
    assert is_error(out) and out["error"]["code"] == "invalid_content_length"
    assert "Content-Length" in out["error"]["message"] and headers["connection"] == "close"


@pytest.mark.parametrize(
    "headers",
    [
        "Content-Length: 2\r\nContent-Length: 20",
        "Content-Length: 2, 20",
        "Content-Length: 2\r\nTransfer-Encoding: chunked",
        "Transfer-Encoding: chunked\r\nContent-Length: 2",
    ],
)
def test_conflicting_lengths_are_400_not_first_wins(port, headers):
    """RFC 9112 6.3: differing Content-Lengths, or one beside Transfer-Encoding, are invalid framing."""
    status, _, out = raw(
        port,
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{headers}",
        b"{}",
    )
    assert status == 400 and out["error"]["code"] == "invalid_content_length", out


def test_repeated_equal_lengths_and_zeros_are_one_length(port):
    status, _, out = raw(
        port, "GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 02", b"{}"
    )
    assert status == 200 and out["status"] == "ok"


def test_a_post_without_content_length_stays_411(port):
    status, _, out = raw(
        port,
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAuthorization: Bearer {KEY}",
    )
    assert status == 411 and out["error"]["code"] == "length_required"


def test_a_huge_valid_length_is_413_before_the_body_is_read(port):
    status, _, out = raw(
        port,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {KEY}\r\nContent-Length: 999999999999",
    )
    assert status == 413 and out["error"]["code"] == "body_too_large"


@pytest.mark.parametrize(
    "line", ["GET /health HTTP/9.9", "GET /health HTTP/2.0", "GET /health HTTP/3.0", "GET /health"]
)
def test_unsupported_http_versions_are_505_typed_as_the_clients_mistake(port, line):
    status, _, out = parse_reply(exchange(port, line.encode() + b"\r\n\r\n"))
    assert status == 505, out
    assert is_error(out) and out["error"]["type"] == "invalid_request_error"
    assert out["error"]["code"] == "http_version_not_supported"


@pytest.mark.parametrize("line", ["GET /health HTTP/1.1.1", "GET /health HTTP/\xb2.1", "GET /health FTP/1.1"])
def test_malformed_versions_are_400(port, line):
    status, _, out = parse_reply(exchange(port, line.encode("latin-1") + b"\r\n\r\n"))
    assert status == 400 and is_error(out), out


def test_huge_headers_are_431_and_a_huge_request_line_414(port):
    many = "".join(f"X-H{i}: v\r\n" for i in range(5000))
    status, _, out = raw(port, f"GET /health HTTP/1.1\r\nHost: x\r\n{many}".rstrip("\r\n"))
    assert status == 431 and is_error(out), out
    status, _, out = raw(port, "GET /health HTTP/1.1\r\nX-Long: " + "a" * 100_000)
    assert status == 431 and is_error(out), out
    status, _, out = raw(port, "GET /" + "a" * 70_000 + " HTTP/1.1")
    assert status == 414 and is_error(out), out
    assert request(port, "GET", "/health")[0] == 200


# -- JSON bodies ------------------------------------------------------------------------------


def post_raw(port, data: bytes, content_type="application/json"):
    headers = {**AUTH, "Content-Type": content_type} if content_type else dict(AUTH)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", "/v1/completions", body=data, headers=headers)
    resp = conn.getresponse()
    text = resp.read().decode()
    conn.close()
    return resp.status, json.loads(text)


@pytest.mark.parametrize("where", ["user", "prompt", "model"])
def test_a_body_nested_100000_deep_is_a_quick_400_not_a_recursion_error(port, where):
    deep = "[" * 100_000 + "]" * 100_000
    data = f'{{"model": "model", "max_tokens": 2, "{where}": {deep}}}'.encode()
    status, out = post_raw(port, data)
    assert status == 400 and out["error"]["code"] == "invalid_json", out
    assert "100001 deep" in out["error"]["message"] and "64" in out["error"]["message"]
    status, out = post_raw(port, b'{"user": ' + b"{" * 100_000)  # deep and invalid
    assert status == 400 and out["error"]["code"] == "invalid_json"


def test_brackets_inside_strings_do_not_count_as_nesting(port):
    user = '"' + "[{" * 5000 + '\\"' + "]}" * 100 + "\\"  # quotes and backslashes among them
    data = json.dumps({"model": "model", "max_tokens": 3, "user": user}).encode()
    assert data.endswith(b'\\\\"}')  # an escaped backslash, then the string's real end
    status, out = post_raw(port, data)
    assert status == 200 and len(out["choices"][0]["text"]) == 3, out


def test_json_depth_is_the_nesting_a_parser_sees():
    def depth(value):
        if isinstance(value, dict):
            return 1 + max(map(depth, value.values()), default=0)
        if isinstance(value, list):
            return 1 + max(map(depth, value), default=0)
        return 0

    rng = np.random.default_rng(0)
    strings = ['[{"', '\\"]', "\\\\", '\\\\"', "}]", "a\\n", ""]
    for _ in range(200):
        value = [str(rng.choice(strings))]
        for _ in range(int(rng.integers(60, 90))):
            pick = rng.integers(3)
            value = (
                [value, str(rng.choice(strings))]
                if pick == 0
                else {str(rng.choice(strings)): value}
                if pick == 1
                else [value]
            )
        text = json.dumps(value).encode()
        assert json_depth(text) == depth(json.loads(text))
    assert json_depth(b"[" * 10) == 0  # too few brackets to count


MALFORMED = [
    b"",
    b"{",
    b"null",
    b'"text"',
    b"[]",
    b'{"a": 1}{"b": 2}',
    b"\xef\xbb\xbf{}",
    b"\xff\xfe{\x00}\x00",
    b'{"prompt": NaN}',
    b'{"max_tokens": 1e999}',
    b'{"max_tokens": ' + b"1" * 5000 + b"}",
    b'{"prompt": "\\ud800"}',
    b'{"prompt": "the ", "prompt": 3}',
    b'{"model": {"$ne": null}}',
]


@pytest.mark.parametrize("data", MALFORMED, ids=lambda d: repr(d[:12]))
def test_malformed_json_bodies_are_4xx(port, data):
    status, out = post_raw(port, data)
    assert 400 <= status < 500 and is_error(out), (status, out)


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/jsonx", "multipart/form-data"])
def test_a_wrong_content_type_is_415(port, content_type):
    status, out = post_raw(port, b'{"model": "model"}', content_type)
    assert status == 415 and out["error"]["code"] == "unsupported_media_type", out


HOSTILE_VALUES = [None, True, -1, 0, 0.5, 1e308, -1e308, 2**64, "", "x", [], {}, [None], {"a": 1}]
#: sampler options whose huge values are refused by their ranges (tested with the words below)
HUGE = [("temperature", 1e38), ("temperature", 1e308), ("repetition_penalty", 1e308)]


@pytest.mark.slow
def test_every_field_with_hostile_values_is_4xx_never_5xx(port):
    for field in options.schema_of(CompletionBody).names():
        for value in HOSTILE_VALUES:
            body = {"model": "model", "prompt": "the ", "max_tokens": 2, field: value}
            status, _, out = post(port, body, headers=AUTH)
            assert status < 500, (field, value, out)
            if status >= 400:
                assert is_error(out), (field, value, out)


@pytest.mark.parametrize(("field", "value"), HUGE)
def test_a_huge_sampler_value_gives_no_5xx_and_no_warning(port, field, value):
    """In this process warnings are errors, so an overflow warning in the engine shows as a 5xx."""
    status, _, out = post(
        port, {"model": "model", "prompt": "the ", "max_tokens": 20, field: value}, headers=AUTH
    )
    assert status == 400, out
    assert out["error"]["param"] == field
    assert (
        out["error"]["message"]
        == f"{field}: must be in {'[0' if field == 'temperature' else '(0'}, 100], got {value}"
    )


# -- auth and routes ------------------------------------------------------------------------

CLOSED_PATHS = [
    "/v1/models",
    "/v1/models/model",
    "/v1/models/model/metrics",
    "/v1/models/nope",
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/nothing",
    "/nope",
    "/admin",
    "/health/",
    "/health/x",
    "//v1/models",
    "/HEALTH",
    "/static",
    "/v1/models/../../health",
    "/index.html",
]
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE", "BREW"]


def test_without_the_key_every_closed_path_and_method_answers_401(port):
    """Auth before routing: no 404 against 405 to map the routes with."""
    for path in CLOSED_PATHS:
        for method in METHODS:
            status, headers, out = request(port, method, path, body={"model": "model"})
            assert status == 401, (method, path, status)
            assert headers["WWW-Authenticate"] == "Bearer"
            if method != "HEAD":
                assert out["error"]["code"] == "invalid_api_key", (method, path)


def test_the_open_paths_answer_without_the_key(keyed):
    srv, port = keyed
    assert request(port, "GET", "/health")[0] == 200
    assert request(port, "GET", "/")[0] == (200 if "index.html" in srv.static else 404)
    for name in srv.static:
        assert request(port, "GET", f"/static/{name}")[0] == 200
    assert request(port, "POST", "/health")[0] == 405


AUTH_PROBES = [
    {},
    {"Authorization": ""},
    {"Authorization": "Bearer"},
    {"Authorization": "Bearer "},
    {"Authorization": "Bearer wrong"},
    {"Authorization": f"Bearer {KEY[:-1]}"},
    {"Authorization": f"Bearer {KEY}x"},
    {"Authorization": f"Bearer {KEY.upper()}"},
    {"Authorization": f"Bearer x{KEY}"},
    {"Authorization": KEY},
    {"Authorization": f"Basic {KEY}"},
    {"Authorization": "Basic czNjcmV0"},
    {"Authorization": f"Token {KEY}"},
    {"Authorization": f"Bearer {KEY} {KEY}"},
    {"Authorization": f"Bearer {KEY}, Bearer {KEY}"},
    {"Authorization": f"Bearer{KEY}"},
    {"X-Api-Key": KEY},
    {"Api-Key": KEY},
    {"Cookie": f"key={KEY}"},
]


@pytest.mark.parametrize("headers", AUTH_PROBES, ids=lambda h: repr(h)[:40])
def test_auth_probes_find_no_bypass(port, headers):
    for method, path in [
        ("GET", "/v1/models"),
        ("POST", "/v1/completions"),
        ("GET", f"/v1/models?key={KEY}"),
    ]:
        status, _, out = request(
            port, method, path, body={"model": "model", "max_tokens": 2}, headers=headers
        )
        assert status == 401 and out["error"]["code"] == "invalid_api_key", (headers, path)


def test_auth_with_raw_header_tricks_finds_no_bypass(port):
    for header in (
        f"Authorization: Bearer {KEY}\x00",
        f"Authorization: Bearer \x00{KEY}",
        "Authorization: Bearer wrong\r\nAuthorization: Bearer " + KEY,
        f"authorization: Bearer {KEY[:3]}",
        f"Authorization : Bearer {KEY}x",
    ):
        status, _, out = raw(port, f"GET /v1/models HTTP/1.1\r\nHost: x\r\n{header}")
        assert status in (400, 401), (header, status, out)
    assert raw(port, f"GET /v1/models HTTP/1.1\r\nHost: x\r\nauthorization: bearer  {KEY} ")[0] == 200


def test_every_route_and_method_with_the_key_answers_without_a_5xx(keyed):
    srv, port = keyed
    paths = [*CLOSED_PATHS, "/health", "/", "/static/app.js"]
    for path in paths:
        for method in METHODS:
            body = {"model": "model", "prompt": "the ", "max_tokens": 2}
            status, headers, out = request(port, method, path, body=body, headers=AUTH)
            assert status < 500, (method, path, out)
            if status == 405:
                assert headers["Allow"], (method, path)
            elif status >= 400 and method != "HEAD":
                assert is_error(out), (method, path, out)


TRAVERSALS = [
    "/static/../server.py",
    "/static/../../etc/passwd",
    "/static/../../../../../../etc/passwd",
    "/static/%2e%2e/server.py",
    "/static/%2e%2e%2fserver.py",
    "/static/..%2fserver.py",
    "/static/..%5cserver.py",
    "/static/%252e%252e/server.py",
    "/static/....//server.py",
    "/static//etc/passwd",
    "/static/\\..\\server.py",
    "/static/app.js/../../server.py",
    "/static/./app.js",
    "/static/APP.JS",
    "/static/app.js%00.html",
    "/static/",
    "/static/.",
    "/static/..",
    "/static/../__init__.py",
    "/static/~/.ssh/id_rsa",
    "/static/../../../../proc/self/environ",
]


def test_path_traversal_under_static_gives_only_the_page_files(keyed):
    srv, port = keyed
    assert len(TRAVERSALS) == 21
    for path in TRAVERSALS:
        status, _, out = request(port, "GET", path)
        assert status == 404 and is_error(out), (path, status)
        text = json.dumps(out)
        assert "import " not in text and "root:" not in text and "PATH=" not in text, path


# -- streams and shutdown -------------------------------------------------------------------


class Slow:
    """The model, a millisecond a step: a long stream lasts long enough to be cut."""

    def __init__(self, model):
        self.model, self.vocab_size, self.dtype = model, model.vocab_size, model.dtype

    def init_state(self, k):
        return self.model.init_state(k)

    def step(self, ids, state):
        time.sleep(0.001)
        return self.model.step(ids, state)


def test_a_stream_cut_at_shutdown_says_so_in_its_last_chunk(checkpoint):
    with serving(checkpoint, model=Slow, max_tokens_limit=5000) as (srv, port):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        body = {"model": "model", "prompt": "the ", "max_tokens": 5000, "stream": True, "n": 2}
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        first = resp.fp.readline()
        whole = {}

        def whole_request():
            whole["reply"] = post(port, {"model": "model", "prompt": "the ", "max_tokens": 5000})

        waiting = threading.Thread(target=whole_request)
        waiting.start()
        assert wait_for(lambda: srv.models["model"].engine.busy_rows() == 3)
        srv.stop(timeout=10)
        rest = (first + resp.read()).decode()
        conn.close()
        waiting.join(10)
    chunks = events(rest)
    assert chunks[-1] == "[DONE]"
    last = chunks[-2]
    assert set(last) == {"error"} and last["error"]["code"] == "shutting_down", last
    assert "cut" in last["error"]["message"]
    reasons = [c["finish_reason"] for chunk in chunks[:-2] for c in chunk["choices"]]
    assert reasons and all(r is None for r in reasons)  # no choice claims it finished
    status, _, out = whole["reply"]
    assert status == 503 and out["error"]["code"] == "shutting_down", out


def test_a_stream_that_is_never_read_holds_nobody_else_up(checkpoint):
    with serving(checkpoint, model=Slow, max_tokens_limit=4096) as (srv, port):
        engine = srv.models["model"].engine
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        body = json.dumps({"model": "model", "prompt": "the ", "max_tokens": 4096, "n": 32, "stream": True})
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n{body}".encode()
        )  # and never read
        assert wait_for(lambda: engine.busy_rows() == 32)
        status, _, out = post(port, {"model": "model", "prompt": "the ", "max_tokens": 20})
        assert status == 200 and len(out["choices"][0]["text"]) == 20
        sock.close()
        assert wait_for(lambda: not engine.groups)
        assert wait_for(lambda: " 499 " in srv.log.getvalue())


@pytest.mark.slow
@pytest.mark.parametrize("signals", [1, 2, 30])
def test_sigint_with_open_streams_exits_0_promptly(checkpoint, cli_env, signals):
    """`timeout -s INT` signals the command and then its process group: two SIGINTs, which gave
    130; a burst could also land while the handler ran and hang it (a lock taken in a handler)."""
    with cli_server(checkpoint, "--max-tokens-limit", "1000000", env=cli_env) as (proc, port):
        streams = []
        for seed in range(2):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            body = {"model": "model", "prompt": "the ", "max_tokens": 1_000_000, "stream": True, "seed": seed}
            conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
            resp = conn.getresponse()
            assert resp.fp.readline().startswith(b"data: ")
            streams.append((conn, resp))
        for _ in range(signals):
            proc.send_signal(signal.SIGINT)
            time.sleep(0)  # microseconds apart: the next may come while the last is handled
        for conn, resp in streams:
            chunks = events(resp.read().decode())
            assert chunks[-1] == "[DONE]" and chunks[-2]["error"]["code"] == "shutting_down"
            conn.close()
        assert proc.wait(timeout=30) == 0
        err = proc.stderr.read()
        assert "Traceback" not in err and "interrupted" not in err, err


# -- IPv6 -----------------------------------------------------------------------------------


def ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not ipv6_loopback(), reason="this machine has no IPv6 loopback (::1 cannot be bound)")
def test_host_ipv6_loopback_listens(checkpoint, monkeypatch):
    import argparse

    from charrnn_plugins.serve import Serve, build

    monkeypatch.delenv("CHARRNN_API_KEY", raising=False)
    parser = argparse.ArgumentParser()
    Serve().add_arguments(parser)
    server = build(parser.parse_args([checkpoint, "--host", "::1", "--port", "0"]))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        conn = http.client.HTTPConnection("::1", server.server_address[1], timeout=10)
        conn.request("GET", "/health")
        assert conn.getresponse().status == 200
        conn.close()
    finally:
        server.stop(timeout=5)
        thread.join(5)
