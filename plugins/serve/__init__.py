"""`charrnn serve CHECKPOINT [CHECKPOINT ...]`: an OpenAI-compatible text API for trained models.

The command is registered through `charrnn_command` like any plugin's; the HTTP server, the
batching engine and the API live in this package's modules and are imported only when the
command runs. The playground page's files are package data under `static/`.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from charrnn.errors import CharrnnError
from charrnn.hookspecs import hookimpl


class Serve:
    help = "serve checkpoints over an OpenAI-compatible HTTP API (and a playground page)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        from charrnn.commands import add_plugin

        parser.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT", help=".npz checkpoints to serve")
        parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
        parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
        parser.add_argument(
            "--name", help="the model's id when serving one checkpoint (default: its file stem)"
        )
        parser.add_argument(
            "--api-key",
            help="require 'Authorization: Bearer KEY' on every route but /health (or CHARRNN_API_KEY)",
        )
        parser.add_argument(
            "--no-auth", action="store_true", help="allow binding a non-loopback address without an API key"
        )
        parser.add_argument(
            "--max-tokens-limit",
            type=int,
            default=4096,
            help="the largest max_tokens a request may ask (default 4096)",
        )
        parser.add_argument(
            "--max-batch", type=int, default=64, help="rows generated together per model (default 64)"
        )
        parser.add_argument(
            "--queue-size",
            type=int,
            default=64,
            help="requests that may wait per model before 429 (default 64)",
        )
        parser.add_argument(
            "--max-connections",
            type=int,
            default=256,
            help="connections open at once (a thread each); an idle one is closed to make room, "
            "else 503 (default 256)",
        )
        parser.add_argument(
            "--request-timeout",
            type=float,
            default=30.0,
            help="seconds a client has to send a whole request, headers and body (else 408), "
            "and that an idle connection stays open (default 30)",
        )
        parser.add_argument(
            "--chat",
            choices=["none", "last-user"],
            default="none",
            help="/v1/chat/completions: 'none' answers 400; 'last-user' uses the last user message as the prompt",
        )
        add_plugin(parser)

    def __call__(self, args: argparse.Namespace, out: Any) -> int:
        signalled: list[int] = []

        def on_signal(signum: int, frame: Any) -> None:
            signalled.append(signum)  # no lock here: a second signal can come while this one runs

        # Installed before the checkpoints load and kept until the server is down: a signal then
        # (`timeout` sends SIGINT twice, to the process and to its group) still means "stop".
        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            server = build(args)
            one_blas_thread()
            thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
            if not signalled:
                thread.start()
                host, port = server.server_address[:2]
                print(
                    f"serving {', '.join(server.models)} on http://{_url_host(host)}:{port}/ (Ctrl+C stops)",
                    file=sys.stderr,
                    flush=True,
                )
                while not signalled:
                    time.sleep(0.2)
            print("stopping: open generations are cut at their next chunk", file=sys.stderr, flush=True)
            server.stop()
            if thread.is_alive():
                thread.join(5)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return 0


def one_blas_thread() -> bool:
    """Run BLAS on one thread (with threadpoolctl, unless a *_NUM_THREADS variable says otherwise).

    A batched step is a small product; OpenBLAS's own threads spinning for it take the cores
    the HTTP threads and the worker need: measured with 16 clients, 0.7x of serial throughput
    with them against 1.9x without (tests/bench_serve.py).
    """
    from charrnn.threads import for_serving

    return for_serving() is not None


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def build(args: argparse.Namespace) -> Any:
    """The server for parsed `serve` arguments, bound and ready; user errors as `CharrnnError`."""
    from charrnn.loaded import LoadedModel

    from .engine import Engine
    from .server import Served, Server, env_key, loopback

    for flag, value in (("--max-tokens-limit", args.max_tokens_limit), ("--max-batch", args.max_batch)):
        if value < 1:
            raise CharrnnError(f"{flag} must be >= 1, got {value}")
    for flag, value in (("--queue-size", args.queue_size), ("--max-connections", args.max_connections)):
        if value < 1:
            raise CharrnnError(f"{flag} must be >= 1, got {value}")
    if not args.request_timeout > 0 or args.request_timeout == float("inf"):
        raise CharrnnError(f"--request-timeout must be a number of seconds > 0, got {args.request_timeout}")
    if not 0 <= args.port <= 65535:
        raise CharrnnError(f"--port must be in [0, 65535], got {args.port}")
    if args.name is not None and len(args.checkpoints) > 1:
        raise CharrnnError(
            "--name names the model when serving one checkpoint; several are named by file stem"
        )
    key = args.api_key if args.api_key is not None else env_key()
    if key is not None and not key.strip():
        source = "--api-key" if args.api_key is not None else "the CHARRNN_API_KEY variable"
        raise CharrnnError(f"{source} is empty: give a key, or leave it out to serve without one")
    if not loopback(args.host) and key is None and not args.no_auth:
        raise CharrnnError(
            f"--host {args.host} is reachable from other machines: give --api-key (or CHARRNN_API_KEY), "
            "or --no-auth to serve without one"
        )
    names: dict[str, str] = {}
    for path in args.checkpoints:
        name = args.name or Path(path).stem
        if name in names:
            raise CharrnnError(f"two checkpoints would both be served as {name!r}: {names[name]} and {path}")
        names[name] = path
    served = {}
    for name, path in names.items():
        loaded = LoadedModel.load(path, plugins=args.plugins)
        engine = Engine(loaded, max_batch=args.max_batch, queue_size=args.queue_size)
        served[name] = Served(name, loaded, engine)
    try:
        return Server(
            (args.host, args.port),
            served,
            api_key=key,
            max_tokens_limit=args.max_tokens_limit,
            max_connections=args.max_connections,
            request_timeout=args.request_timeout,
            chat=None if args.chat == "none" else args.chat,
        )
    except OSError as exc:
        for s in served.values():
            s.engine.stop()
        raise CharrnnError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None


@hookimpl
def charrnn_command(register):
    register("serve", Serve)
