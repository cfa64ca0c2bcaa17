"""The HTTP side of `charrnn serve`: routes, auth, limits, streaming and one log line per request.

Python's `http.server.ThreadingHTTPServer`: a thread per connection parses and checks the
request, hands a job to the model's `Engine` and writes what comes back (JSON, or server-sent
events as the text is made). Every client mistake is a 4xx in OpenAI's error shape; the static
page is read from package data once, at start-up, so no route reads a file a request names.

What a hostile client can hold is bounded: at most `max_connections` connections (so threads and
descriptors), an idle one closed first when a new one needs its place; one deadline for a
request's headers and body together; the body's length, framing and JSON nesting checked
before anything reads or parses it.
"""

from __future__ import annotations

import collections
import hmac
import io
import json
import os
import queue
import select
import socket
import sys
import threading
import time
from collections.abc import Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from charrnn.errors import CharrnnError, PluginFailure
from charrnn.files import RunFiles
from charrnn.loaded import LoadedModel
from charrnn.metrics import read_metrics

from . import api
from .api import ApiError, bad
from .engine import Engine, Event, QueueFull, Stopping

MAX_BODY = 1 << 20  # bytes of a request body
MAX_CONNECTIONS = 256  # open connections, a thread each: well under a 1,024-descriptor limit
REQUEST_TIMEOUT = 30.0  # seconds for a request's headers and body together (and an idle connection)
WRITE_TIMEOUT = 60.0  # seconds a reply may wait for a client that does not read it
MAX_DEPTH = 64  # nesting of a request body's arrays and objects (the API's own need about 5)
RETRY_AFTER = 1  # seconds, in a 429's or 503's Retry-After
LINGER = 1.0  # seconds a refused connection stays open after its 503, so the client can read it
MAX_LINGERING = 64  # refused connections kept open at once; beyond, the oldest is closed
#: http.server's own errors: the `code` of their OpenAI-shaped body
ERROR_CODES = {
    400: "bad_request",
    408: "request_timeout",
    414: "uri_too_long",
    431: "headers_too_large",
    505: "http_version_not_supported",
}
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".json": "application/json",
    ".ico": "image/x-icon",
    ".txt": "text/plain; charset=utf-8",
}


def static_files() -> dict[str, tuple[bytes, str]]:
    """The page's files (`static/` package data): name -> (content, content type), read once."""
    files: dict[str, tuple[bytes, str]] = {}
    try:
        root = resources.files("charrnn_plugins.serve") / "static"
        if not root.is_dir():
            return files
        stack = [(root, "")]
        while stack:
            folder, prefix = stack.pop()
            for item in folder.iterdir():
                if item.is_dir():
                    stack.append((item, f"{prefix}{item.name}/"))
                elif not item.name.startswith("."):
                    kind = CONTENT_TYPES.get(Path(item.name).suffix.lower(), "application/octet-stream")
                    files[prefix + item.name] = (item.read_bytes(), kind)
    except (OSError, ModuleNotFoundError):
        return {}
    return files


class Served:
    """A served model: its loaded checkpoint, its engine and what `/v1/models` says of it."""

    def __init__(self, name: str, loaded: LoadedModel, engine: Engine) -> None:
        self.name, self.loaded, self.engine = name, loaded, engine
        path = Path(loaded.path or name)
        self.metrics = RunFiles(path).metrics if path.suffix == ".npz" else None
        self.model_type = loaded.model_type
        try:
            self.created = int(path.stat().st_mtime)
        except OSError:
            self.created = int(time.time())

    def card(self) -> dict[str, Any]:
        loaded = self.loaded
        return {
            "id": self.name,
            "object": "model",
            "created": self.created,
            "owned_by": "charrnn",
            "charrnn": {
                "vocab_size": len(loaded.vocab.vocab),
                "encoding": loaded.vocab.encoding,
                "model_type": self.model_type,
                "samplers": sorted(loaded.assembly.registry.components["sampler"]),
                "default_sampler": dict(loaded.config["sampler"]),
                "has_metrics": self.metrics is not None and self.metrics.is_file(),
            },
        }

    def metric_records(self) -> list[dict[str, Any]]:
        """The metrics file's records; a line still being written (the last, unfinished) is left out."""
        if self.metrics is None:
            raise ApiError(404, f"model {self.name!r} has no metrics file", None, "metrics_not_found")
        try:
            return read_metrics(self.metrics, empty_ok=True)
        except CharrnnError as exc:
            message = str(exc).replace(str(self.metrics), f"the metrics file of model {self.name!r}")
            raise ApiError(404, message, None, "metrics_not_found") from None


class Connection:
    """One open connection: its socket, and whether it waits for a request (and may be closed)."""

    __slots__ = ("sock", "idle", "closed")

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.idle, self.closed = sock, True, False


class Server(ThreadingHTTPServer):
    """The HTTP server and what its handlers share: models, key, limits, open connections, log."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # the listen backlog: a burst of clients connects at once (default 5)

    def __init__(
        self,
        address: tuple[str, int],
        models: Mapping[str, Served],
        *,
        api_key: str | None = None,
        max_tokens_limit: int = 4096,
        max_body: int = MAX_BODY,
        max_connections: int = MAX_CONNECTIONS,
        request_timeout: float = REQUEST_TIMEOUT,
        chat: str | None = None,
        log: TextIO | None = None,
    ) -> None:
        if api_key is not None and not api_key.strip():
            raise ValueError("api_key is empty: give a key, or None to serve without one")
        if max_connections < 1 or not request_timeout > 0:
            raise ValueError(f"max_connections {max_connections} and request_timeout {request_timeout}")
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.models = dict(models)
        self.api_key = api_key.encode() if api_key is not None else None
        self.max_tokens_limit, self.max_body, self.chat = max_tokens_limit, max_body, chat
        self.max_connections, self.request_timeout = max_connections, request_timeout
        self.log = log if log is not None else sys.stderr
        self.log_lock = threading.Lock()
        self.static = static_files()
        self.connections: dict[socket.socket, Connection] = {}  # oldest first
        self.connections_lock = threading.Lock()
        self.lingering: collections.deque[tuple[float, socket.socket]] = collections.deque()
        self.active = 0  # requests generating: what `stop` waits for
        self.active_lock = threading.Condition()
        self.serving = False
        super().__init__(address, Handler)

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        self.serving = True
        super().serve_forever(poll_interval)

    @property
    def loaded(self) -> dict[str, LoadedModel]:
        return {name: s.loaded for name, s in self.models.items()}

    def write_log(self, line: str) -> None:
        with self.log_lock:
            try:
                self.log.write(line + "\n")
                self.log.flush()
            except (OSError, ValueError):
                pass

    # -- connections ----------------------------------------------------------------------

    def process_request(self, request: Any, client_address: Any) -> None:
        """A thread for the new connection if it has a place; a 503 at once otherwise."""
        if self._place(request):
            super().process_request(request, client_address)
        else:
            self._refuse(request)

    def _place(self, sock: socket.socket) -> bool:
        """Room for one more connection, made by closing the oldest idle one when all are taken."""
        with self.connections_lock:
            if len(self.connections) >= self.max_connections:
                # idle: waiting for a request, and none has begun to arrive
                idle = next((c for c in self.connections.values() if c.idle and not readable(c.sock)), None)
                if idle is None:
                    return False
                self._close(idle)
            self.connections[sock] = Connection(sock)
            return True

    def _close(self, conn: Connection) -> None:
        """End a connection waiting for a request (its handler sees the end of its input)."""
        conn.closed = True
        self.connections.pop(conn.sock, None)
        try:
            conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def set_idle(self, sock: socket.socket, idle: bool) -> bool:
        """Mark a connection as waiting for a request or busy with one; False once it was closed."""
        with self.connections_lock:
            conn = self.connections.get(sock)
            if conn is None or conn.closed:
                return False
            conn.idle = idle
            return True

    def _refuse(self, sock: socket.socket) -> None:
        """Beyond the cap: a 503 with Retry-After, written without waiting (no thread); the
        connection lingers `LINGER` seconds so that a request already sent does not turn the
        close into a reset the client would see instead of the 503."""
        error = ApiError(
            503,
            f"the server has {self.max_connections} connections open, its limit; retry after {RETRY_AFTER} s",
            None,
            "too_many_connections",
        )
        body = json.dumps(error.body()).encode()
        head = (
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: {RETRY_AFTER}\r\nConnection: close\r\n\r\n"
        )
        try:
            sock.setblocking(False)
            sock.send(head.encode() + body)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            sock.close()
            return
        self.write_log("- - 503 0 0ms")
        self.lingering.append((time.monotonic(), sock))
        if len(self.lingering) > MAX_LINGERING:
            self._drop(self.lingering.popleft()[1])

    def service_actions(self) -> None:
        """Between accepts: close the refused connections whose 503 had time to be read."""
        now = time.monotonic()
        while self.lingering and now - self.lingering[0][0] > LINGER:
            self._drop(self.lingering.popleft()[1])

    @staticmethod
    def _drop(sock: socket.socket) -> None:
        """Close a refused connection, reading first what it sent, so closing sends no reset."""
        try:
            sock.recv(1 << 16)
        except OSError:
            pass
        sock.close()

    def shutdown_request(self, request: Any) -> None:
        with self.connections_lock:
            self.connections.pop(request, None)
        super().shutdown_request(request)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, cut the open generations at their next chunk, wait for their replies."""
        if self.serving:
            self.shutdown()
        for served in self.models.values():
            served.engine.stop()
        deadline = time.monotonic() + timeout
        with self.active_lock:
            while self.active and time.monotonic() < deadline:
                self.active_lock.wait(0.05)
        with self.connections_lock:
            for conn in [c for c in self.connections.values() if c.idle]:
                self._close(conn)
        while self.lingering:
            self._drop(self.lingering.popleft()[1])
        self.server_close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection that breaks is the client's business: one log line, no traceback."""
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError, socket.timeout)):
            return
        self.write_log(f"error: serving {client_address[0]}: {type(exc).__name__}: {exc}")


class DeadlineReader(io.RawIOBase):
    """A connection's input, each read bounded by what is left until `deadline` (monotonic).

    With `waiting` set, the next read is the wait for a request: the connection is idle (the
    server may close it to make room) until input is there, and is claimed before it is read,
    so a request that has begun to arrive is never taken for an idle connection.
    """

    def __init__(self, sock: socket.socket, server: Server, timeout: float) -> None:
        self.sock, self.server, self.timeout = sock, server, timeout
        self.deadline: float | None = None
        self.waiting = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = None if self.deadline is None else self.deadline - time.monotonic()
        if left is not None and left <= 0:
            raise TimeoutError("the request's deadline passed")
        if self.waiting:
            self.waiting = False
            self.server.set_idle(self.sock, True)
            ready = readable(self.sock, left)
            if not self.server.set_idle(self.sock, False):
                return 0  # closed to make room: the end of this connection
            if not ready:
                raise TimeoutError("no request came")
        if left is None:
            return self.sock.recv_into(buffer)
        self.sock.settimeout(left)
        try:
            return self.sock.recv_into(buffer)
        finally:
            self.sock.settimeout(self.timeout)  # writes keep their own timeout


def json_depth(data: bytes) -> int:
    """How deep a JSON text's arrays and objects nest, found without parsing it, so a body too
    deep for `json.loads` (a RecursionError) is refused first.

    Escape pairs (a backslash and what follows it) go first, as a parser reads them, so every
    quote left bounds a string; the brackets between strings give the depth. In valid JSON, and
    in the valid prefix that a parser reads of invalid JSON before it fails, the count is exact.
    """
    if data.count(b"[") + data.count(b"{") <= MAX_DEPTH:  # the usual body: nothing to count
        return 0
    bare = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    outside = b"".join(bare.split(b'"')[0::2])  # the text between strings
    marks = np.frombuffer(outside.translate(None, NOT_BRACKETS), np.uint8)  # (m,) only []{}
    return int(np.cumsum(STEPS[marks], dtype=np.int32).max(initial=0))


NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")
STEPS = np.zeros(256, np.int32)  # byte -> its change of depth
STEPS[list(b"[{")], STEPS[list(b"]}")] = 1, -1


def readable(sock: socket.socket, timeout: float | None = 0) -> bool:
    """Whether a read would not block, waiting up to `timeout` seconds (None: for ever) for it.

    poll, where there is one: it takes any descriptor number, select only those below 1,024.
    """
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(None if timeout is None else max(0, int(timeout * 1000) + 1)))
    return bool(select.select([sock], [], [], timeout)[0])


class Handler(BaseHTTPRequestHandler):
    server: Server
    protocol_version = "HTTP/1.1"
    server_version = "charrnn"
    timeout = WRITE_TIMEOUT  # the socket's timeout for writes; reads have the request's deadline

    # -- plumbing ---------------------------------------------------------------------------

    def setup(self) -> None:
        super().setup()
        try:  # small event-stream writes go out at once, not after the client's delayed ACK
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        self.rfile.close()
        self.reader = DeadlineReader(self.connection, self.server, self.timeout)
        self.rfile = io.BufferedReader(self.reader, 1 << 16)

    def handle_one_request(self) -> None:
        """One request within its deadline, as `BaseHTTPRequestHandler`'s but for the time limits.

        Waiting for a request's first byte, the connection is idle and may be closed to make room
        (or after `request_timeout`); from that byte its headers and body have `request_timeout`
        seconds together, then 408.
        """
        self.command, self.request_version, self.requestline = None, "HTTP/1.1", ""
        self._t0: float | None = None
        self._status, self._chars, self._head = 0, 0, False
        self._length: int | None = None  # the body's, from `_framing`
        self._chunked = False
        limit = self.server.request_timeout
        self.reader.deadline, self.reader.waiting = time.monotonic() + limit, True
        try:
            first = self.rfile.peek(1)  # a pipelined request may be read already: no wait then
        except OSError:  # nothing came in time
            first = b""
        self.reader.waiting = False
        if not first:  # no request in time, the client's end, or closed to make room
            self.close_connection = True
            return
        self.reader.deadline = time.monotonic() + limit
        try:
            self.raw_requestline = self.rfile.readline(65537)
            if len(self.raw_requestline) > 65536:
                self.send_error(HTTPStatus.REQUEST_URI_TOO_LONG)
                return
            if not self.parse_request():
                return
            if self.request_version == "HTTP/0.9":
                self.send_error(505, "HTTP/0.9 is not served: send HTTP/1.1 (or HTTP/1.0)")
                return
            getattr(self, "do_" + self.command)()
            self.wfile.flush()
        except TimeoutError:
            self._timed_out()

    def _timed_out(self) -> None:
        self.close_connection = True
        if self._status:  # a reply has begun (a write timed out): nothing more can be said
            self._status = 499
            return
        self.send_error(
            408,
            f"the request did not arrive within {self.server.request_timeout:g} s (headers and body together)",
        )

    def __getattr__(self, name: str) -> Any:
        if name.startswith("do_"):  # any other method: 405, not http.server's 501
            return self._other_method
        raise AttributeError(name)

    def _other_method(self) -> None:
        self._start()
        self._finish_request(lambda: self._route(allowed_only=True))

    def do_GET(self) -> None:
        self._start()
        self._finish_request(self._route)

    def do_POST(self) -> None:
        self._start()
        self._finish_request(self._route)

    def do_HEAD(self) -> None:
        self._start()
        self._head = True
        self._finish_request(self._route)

    def _start(self) -> None:
        self._t0 = time.monotonic()

    def _finish_request(self, work: Any) -> None:
        try:
            work()
        except ApiError as exc:
            self._send_json(exc.status, exc.body(), exc.headers)
        except TimeoutError:  # the request's body did not come in time (or a reply's write)
            self._timed_out()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            self._status = self._status or 499
        except Exception as exc:  # noqa: BLE001 - a defect: said in one line, the server goes on
            self.server.write_log(f"error: {self.command} {self.path}: {type(exc).__name__}: {exc}")
            if not self._status:
                self._send_json(500, ApiError(500, f"internal error: {type(exc).__name__}: {exc}").body())
            self.close_connection = True
        finally:
            ms = (time.monotonic() - (self._t0 or time.monotonic())) * 1000
            route = self.path.split("?", 1)[0][:200]
            self.server.write_log(f"{self.command} {route} {self._status} {self._chars} {ms:.0f}ms")

    def log_message(self, format: str, *args: Any) -> None:
        """http.server's own lines are replaced by one line per request (see `_finish_request`)."""

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's errors (bad request line, too long headers) in OpenAI's shape too."""
        self._status = code
        if self.request_version in ("HTTP/0.9", ""):  # a request line too broken to parse: HTTP/1.0
            self.request_version = "HTTP/1.0"
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "error"
        body = json.dumps(ApiError(code, message or phrase, None, ERROR_CODES.get(code)).body()).encode()
        self.close_connection = True
        try:
            self.send_response(code, message)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD" and code >= 200 and code not in (204, 304):
                self.wfile.write(body)
        except OSError:
            pass
        if getattr(self, "_t0", None) is None:  # an error before any route: still one log line
            self.server.write_log(f"{getattr(self, 'command', None) or '-'} - {code} 0 0ms")

    def _send_json(self, status: int, body: Any, headers: Mapping[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self._status = status
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if not self._head:
            self.wfile.write(data)

    def _send_bytes(self, status: int, data: bytes, content_type: str) -> None:
        self._status = status
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        if not self._head:
            self.wfile.write(data)

    # -- routing ----------------------------------------------------------------------------

    def _route(self, allowed_only: bool = False) -> None:
        """Framing, then the key, then the route: without the key, every path but the open ones
        answers 401 alike, so routes cannot be mapped by 404 against 405."""
        path = self.path.split("?", 1)[0]
        self._framing()
        if not open_path(path):
            self._check_auth()
        routes = self._routes(path)
        if routes is None:
            self._discard_body()
            raise ApiError(
                404, f"no route {path}; see /v1/models, /v1/completions, /health", None, "not_found"
            )
        method = "GET" if self.command == "HEAD" else self.command
        if allowed_only or method not in routes:
            self._discard_body()
            allowed = ", ".join(sorted(routes))
            raise ApiError(
                405,
                f"{self.command} is not allowed on {path}; allowed: {allowed}",
                None,
                "method_not_allowed",
                {"Allow": allowed},
            )
        if path not in BODY_ROUTES:  # a body sent anyway is not the next request on this connection
            self._discard_body()
        routes[method](path)

    def _routes(self, path: str) -> dict[str, Any] | None:
        if path == "/health":
            return {
                "GET": lambda p: self._send_json(200, {"status": "ok", "models": list(self.server.models)})
            }
        if path == "/v1/models":
            return {
                "GET": lambda p: self._send_json(
                    200, {"object": "list", "data": [s.card() for s in self.server.models.values()]}
                )
            }
        if path.startswith("/v1/models/"):
            rest = path[len("/v1/models/") :]
            if rest.endswith("/metrics"):
                return {"GET": lambda p: self._metrics(rest[: -len("/metrics")])}
            return {"GET": lambda p: self._model(rest)}
        if path == "/v1/completions":
            return {"POST": lambda p: self._completions()}
        if path == "/v1/chat/completions":
            return {"POST": lambda p: self._chat()}
        if path == "/" or path.startswith("/static/"):
            return {"GET": self._static}
        return None

    def _check_auth(self) -> None:
        key = self.server.api_key
        if key is None:
            return
        given = self.headers.get("Authorization", "")
        scheme, _, token = given.partition(" ")
        ok = hmac.compare_digest(token.strip().encode(), key) if scheme.lower() == "bearer" else False
        if not ok:
            self._discard_body()
            raise ApiError(
                401,
                "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                None,
                "invalid_api_key",
                {"WWW-Authenticate": "Bearer"},
            )

    def _served(self, name: str) -> Served:
        served = self.server.models.get(name)
        if served is None:
            raise ApiError(
                404,
                f"model {name!r} is not served here; served: {', '.join(self.server.models)}",
                "model",
                "model_not_found",
            )
        return served

    def _model(self, name: str) -> None:
        self._send_json(200, self._served(name).card())

    def _metrics(self, name: str) -> None:
        records = self._served(name).metric_records()
        self._send_json(200, {"object": "list", "data": records})

    def _static(self, path: str) -> None:
        name = "index.html" if path == "/" else path[len("/static/") :]
        found = self.server.static.get(name)
        if found is None:
            raise ApiError(404, f"no page file {name!r}", None, "not_found")
        self._send_bytes(200, *found)

    # -- bodies -----------------------------------------------------------------------------

    def _framing(self) -> None:
        """The body's length from its headers (RFC 9112 6.3), before anything else reads them: a
        request whose length is unclear is a 400 and its connection is closed."""
        lengths = self.headers.get_all("Content-Length") or []
        if self.headers.get_all("Transfer-Encoding"):
            self.close_connection = True  # its end cannot be found: nothing more on this connection
            if lengths:
                raise self._bad_framing("a request may not have both Transfer-Encoding and Content-Length")
            self._chunked = True
            return
        values = set()
        for value in (part.strip() for header in lengths for part in header.split(",")):
            if not (value.isascii() and value.isdigit()):
                raise self._bad_framing(f"Content-Length must be a number of bytes, got {clip(value)}")
            values.add(value.lstrip("0") or "0")
        if len(values) > 1:
            raise self._bad_framing(
                f"conflicting Content-Length values: {', '.join(sorted(map(clip, values)))}"
            )
        if values:
            (value,) = values
            if len(value) > 18:
                raise self._bad_framing(f"Content-Length {clip(value)} is out of range")
            self._length = int(value)

    def _bad_framing(self, message: str) -> ApiError:
        self.close_connection = True
        return bad(message, None, "invalid_content_length")

    def _discard_body(self) -> None:
        """Read a small body away so the connection stays usable; close it otherwise."""
        length, self._length = self._length, None  # read once
        if not length:
            return
        if length > self.server.max_body or len(self.rfile.read(length)) < length:
            self.close_connection = True

    def _json_body(self) -> Any:
        if self._chunked:
            raise ApiError(
                411,
                "send the body with a Content-Length (chunked bodies are not read)",
                None,
                "length_required",
            )
        size = self._length
        if size is None:
            self.close_connection = True
            raise ApiError(411, "a Content-Length header is required", None, "length_required")
        if size > self.server.max_body:
            self.close_connection = True
            raise ApiError(
                413,
                f"the request body is {size} bytes; the limit is {self.server.max_body}",
                None,
                "body_too_large",
            )
        data = self.rfile.read(size)
        if len(data) < size:
            self.close_connection = True
            raise bad("the request body ended early")
        self.reader.deadline = None  # the request is in: generating has no deadline
        kind = self.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        if kind != "application/json":
            raise ApiError(
                415,
                f"Content-Type must be application/json, got {kind or 'none'!r}",
                None,
                "unsupported_media_type",
            )
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise bad(f"the body is not valid JSON: {exc}", None, "invalid_json") from None
        depth = json_depth(data)
        if depth > MAX_DEPTH:
            raise bad(
                f"the body nests arrays and objects {depth} deep; the limit is {MAX_DEPTH}",
                None,
                "invalid_json",
            )
        try:
            return json.loads(text)
        except ValueError as exc:
            raise bad(f"the body is not valid JSON: {exc}", None, "invalid_json") from None

    # -- generation -------------------------------------------------------------------------

    def _completions(self) -> None:
        body = self._json_body()
        request = api.parse_completion(body, self.server.loaded, self.server.max_tokens_limit)
        self._run(request, chat=False)

    def _chat(self) -> None:
        body = self._json_body()
        if self.server.chat != "last-user":
            raise bad(
                "a character model has no chat template: use POST /v1/completions with a prompt "
                "(or start the server with --chat last-user to use the last user message as the prompt)",
                "messages",
                "chat_not_supported",
            )
        if not isinstance(body, dict):
            raise bad("the request body must be a JSON object")
        messages = body.get("messages")
        prompt = last_user(messages)
        rest = {k: v for k, v in body.items() if k not in ("messages", "max_completion_tokens")}
        if body.get("max_completion_tokens") is not None and rest.get("max_tokens") is None:
            rest["max_tokens"] = body["max_completion_tokens"]
        if rest.get("logprobs") not in (None, False):
            raise bad("logprobs are offered on /v1/completions only", "logprobs", "unsupported_parameter")
        rest.pop("logprobs", None)
        rest.pop("top_logprobs", None)
        if "echo" in rest:
            raise bad("echo is offered on /v1/completions only", "echo", "unsupported_parameter")
        request = api.parse_completion(
            {**rest, "prompt": prompt}, self.server.loaded, self.server.max_tokens_limit
        )
        self._run(request, chat=True)

    def _run(self, request: api.Request, chat: bool) -> None:
        served = self.server.models[request.model]
        try:
            served.engine.submit(request.job)
        except QueueFull as exc:
            raise ApiError(
                429,
                f"the server is busy ({exc}); retry after {RETRY_AFTER} s",
                None,
                "queue_full",
                {"Retry-After": str(RETRY_AFTER)},
            ) from None
        except Stopping as exc:
            raise self._error(exc) from None
        with self.server.active_lock:
            self.server.active += 1
        try:
            if request.stream:
                self._stream(request, served, chat)
            else:
                self._whole(request, served, chat)
        finally:
            request.job.cancelled.set()  # whatever happened here, the engine need not go on
            with self.server.active_lock:
                self.server.active -= 1
                self.server.active_lock.notify_all()

    def _next(self, request: api.Request) -> Event:
        event = request.job.events.get()
        if event.kind == "error":
            raise self._error(event.error)
        return event

    @staticmethod
    def _error(exc: BaseException | None) -> ApiError:
        if isinstance(exc, Stopping):
            return ApiError(503, str(exc) or "the server is shutting down", None, "shutting_down")
        if isinstance(exc, CharrnnError):
            return bad(str(exc))
        if isinstance(exc, PluginFailure):
            return ApiError(500, str(exc), None, "plugin_failure")
        return ApiError(500, f"internal error: {type(exc).__name__}: {exc}")

    def _whole(self, request: api.Request, served: Served, chat: bool) -> None:
        finished: dict[int, Event] = {}
        while True:
            try:
                event = request.job.events.get(timeout=0.5)
            except queue.Empty:
                if self._gone():  # nobody will read the answer: stop generating it
                    request.job.cancelled.set()
                    self._status = 499
                    return
                continue
            if event.kind == "error":
                raise self._error(event.error)
            if event.kind == "finish":
                finished[event.index] = event
            elif event.kind == "done":
                break
        body = api.completion(request, finished, served.loaded, chat)
        self._chars = body["usage"]["completion_tokens"]
        self._send_json(200, body)

    def _stream(self, request: api.Request, served: Served, chat: bool) -> None:
        """Server-sent events: a chunk per piece of text, a last one per choice, then [DONE].

        A stream the server cannot finish (a failure, or shutdown cutting it) ends with an error
        in OpenAI's shape before [DONE], never like a complete one.
        """
        chunks = api.Chunks(request, served.loaded, chat)
        first = self._next(request)  # a request that fails at once still gets a plain 4xx/5xx
        self._status = 200
        self.close_connection = True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.send_header("X-Accel-Buffering", "no")
        self.end_headers()
        pending: list[bytes] = []  # events made ready together go out in one write

        def send(obj: Any) -> None:
            pending.append(b"data: " + json.dumps(obj).encode() + b"\n\n")

        def flush() -> None:
            if pending:
                self.wfile.write(b"".join(pending))
                pending.clear()

        event: Event | None = first
        try:
            while True:
                if event is None:
                    try:
                        event = request.job.events.get_nowait()  # more ready: same write
                    except queue.Empty:
                        flush()
                if event is None:
                    try:
                        event = request.job.events.get(timeout=0.5)
                    except queue.Empty:  # a quiet stream: is anybody still reading it?
                        if self._gone():
                            request.job.cancelled.set()
                            self._status = 499
                            return
                        continue
                if event.kind == "error":
                    send(self._error(event.error).body())
                    break
                if event.kind == "done":
                    break
                send(chunks.of(event))
                event = None
            tail = chunks.usage_chunk()
            if tail is not None:
                send(tail)
            pending.append(b"data: [DONE]\n\n")
            flush()
        except (BrokenPipeError, ConnectionResetError, OSError):
            request.job.cancelled.set()
            self._status = 499
        finally:
            self._chars = chunks.completion_chars

    def _gone(self) -> bool:
        """Whether the client closed its side (a readable socket with nothing to read)."""
        try:
            if not readable(self.connection):
                return False
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True


def last_user(messages: Any) -> str:
    """The text of the last user message (`--chat last-user`)."""
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list of messages", "messages")
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
                if all(isinstance(p, str) for p in parts):
                    return "".join(parts)
            raise bad("the last user message's content must be text", "messages")
    raise bad("messages has no user message (the prompt is the last user message)", "messages")


BODY_ROUTES = ("/v1/completions", "/v1/chat/completions")  # the routes that read a request body


def open_path(path: str) -> bool:
    """The paths served without the key: the health check and the page's files."""
    return path in ("/health", "/") or path.startswith("/static/")


def clip(value: str, limit: int = 40) -> str:
    """A header value for a message: quoted, and cut when long."""
    return repr(value if len(value) <= limit else value[:limit] + "...")


def loopback(host: str) -> bool:
    return host in ("localhost", "127.0.0.1", "::1") or host.startswith("127.")


def env_key() -> str | None:
    """`CHARRNN_API_KEY` as given: None when unset (an empty value is the caller's to refuse)."""
    return os.environ.get("CHARRNN_API_KEY")
