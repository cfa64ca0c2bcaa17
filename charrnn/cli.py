"""The `charrnn` command: a thin layer over the Python API.

User errors print one line, `error: ...`, on stderr and exit with status 2. A failing plugin,
an unwritable stdout or a bug print one line too and exit with status 1 (`CHARRNN_DEBUG=1`
shows the traceback of a failure). The heavy modules are imported inside `main`, so a Ctrl+C
while they load is handled like any other.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any, NoReturn

from charrnn import __version__
from charrnn.errors import CharrnnError, PluginFailure

DEBUG_VARIABLE = "CHARRNN_DEBUG"


class OutputError(Exception):
    """stdout is closed or a write to it failed (a full disk, say): nothing more can be shown."""


class _Stdout:
    """sys.stdout as the commands see it: UTF-8 text, and a failed write is an `OutputError`.

    A broken pipe (`charrnn ... | head`) stays a `BrokenPipeError`: the reader is done, not
    an error.
    """

    def __init__(self, stream: object) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        from charrnn.pipeline import write_text

        try:
            write_text(self.stream, text)  # type: ignore[arg-type]
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise OutputError(f"cannot write to stdout: {exc.strerror or exc}") from exc
        return len(text)

    def flush(self) -> None:
        pass  # every write is flushed


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see '{self.prog} --help')\n")


def _parser(commands: dict[str, Any]) -> argparse.ArgumentParser:
    """The argument parser with a subcommand for every registered command."""
    parser = _Parser(prog="charrnn", description="Character-level text generation in pure NumPy.")
    parser.add_argument("--version", action="version", version=f"charrnn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, command in commands.items():
        command.add_arguments(sub.add_parser(name, help=command.help, description=command.help))
    return parser


def _commands() -> dict[str, Any]:
    """Every registered command, builtins first (`charrnn.commands`), then installed plugins'."""
    from charrnn.plugins import Registry, calling, get_plugin_manager

    registry = Registry(get_plugin_manager())
    commands = {}
    for name, component in registry.components["command"].items():
        with calling(registry.label("command", name)):
            commands[name] = component.factory()
    return commands


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status (0 ok, 1 failure, 2 user error, 130 Ctrl+C)."""
    try:
        return _main(argv)
    except KeyboardInterrupt:  # also while the modules load or the arguments are parsed
        print("interrupted", file=sys.stderr)
        return 130


def _main(argv: Sequence[str] | None) -> int:
    try:
        commands = _commands()
    except Exception as exc:  # a broken plugin: nothing can be parsed without the commands
        return report(exc)
    try:
        args = _parser(commands).parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors: return the status, do not exit
        return int(exc.code or 0)
    _utf8(sys.stdout)
    warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"  # one line, no source
    try:
        from charrnn.interrupts import Aborted  # noqa: F401 - the first heavy import: numpy
    except Exception as exc:  # pragma: no cover - a broken installation
        print(f"error: cannot load charrnn: {type(exc).__name__}: {_one_line(str(exc))}", file=sys.stderr)
        return 1
    try:
        if sys.stdout is None:
            raise OutputError("stdout is closed; redirect it to a file or /dev/null instead")
        from charrnn import tuning

        tuning.state()  # a misspelt CHARRNN_TUNING stops every command here, not deep in a server
        return commands[args.command](args, _Stdout(sys.stdout))
    except Exception as exc:
        return report(exc)
    except BaseException as exc:  # Aborted (a second Ctrl+C); KeyboardInterrupt goes on to main
        if type(exc).__name__ == "Aborted":
            return report(exc)
        raise


def report(exc: BaseException) -> int:
    """Print a failure as one line on stderr; its exit status (2 the user's mistake, 1 a failure).

    With CHARRNN_DEBUG=1 a failure that is not the user's re-raises, for the traceback.
    """
    from charrnn.interrupts import Aborted

    debug = bool(os.environ.get(DEBUG_VARIABLE))
    hint = f" (set {DEBUG_VARIABLE}=1 for the traceback)"
    if isinstance(exc, CharrnnError):
        print(f"error: {_one_line(str(exc))}", file=sys.stderr, flush=True)
        return getattr(exc, "code", 2)
    if isinstance(exc, Aborted):
        print(str(exc), file=sys.stderr, flush=True)
        return exc.code
    if isinstance(exc, BrokenPipeError):  # `charrnn run ... | head`: not an error; keep Python quiet at exit
        _silence_stdout()
        return 0
    if isinstance(exc, OutputError):
        _silence_stdout()
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    if debug or not isinstance(exc, Exception):
        raise exc
    if isinstance(exc, PluginFailure):
        print(f"error: {_one_line(str(exc))}{hint}", file=sys.stderr, flush=True)
        return 1
    # a bug in charrnn itself: one line, the traceback on request
    print(
        f"error: internal error: {type(exc).__name__}: {_one_line(str(exc))}{hint}",
        file=sys.stderr,
        flush=True,
    )
    return 1


def _silence_stdout() -> None:
    """Point fd 1 at /dev/null so the interpreter's final flush of stdout cannot fail again."""
    if sys.stdout is not None:
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass


def _one_line(message: str) -> str:
    return " ".join(message.split())


def _utf8(stream: object) -> None:
    reconfigure = getattr(stream, "reconfigure", None)
    if reconfigure is not None:
        try:
            reconfigure(encoding="utf-8")
        except (ValueError, OSError):
            pass
