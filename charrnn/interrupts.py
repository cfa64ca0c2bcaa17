"""What Ctrl+C means to a training run; the caller decides, the loop only reads two flags.

`SignalInterrupts` is the CLI's meaning: the first Ctrl+C (or SIGUSR1, which Open MPI's
`mpiexec` forwards while it kills jobs on SIGINT) stops after the current step, saves and goes
on to the next stage; a second Ctrl+C, or SIGTERM, saves and exits (status 130 or 143). The
handlers only set flags, which the loop reads between steps, so parameters are never saved
half-updated. Under `mpiexec` (MPICH's forwards SIGINT and SIGTERM to every rank) the loop
shares the flags at each step, so every rank stops at the same step, rank 0 saves, and only then
do all ranks leave, with the largest status asked. `NoInterrupts` installs nothing: for callers
(a sweep trial, a thread) that handle signals themselves.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import Any, Protocol


class Aborted(BaseException):
    """Training was stopped by a second Ctrl+C or SIGTERM; `code` is the exit status."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class Interrupts(Protocol):
    """Read by the loop after every step: `stop` ends the run gracefully, `abort` (an exit
    status) saves and raises `Aborted`. Entered as a context manager around the run."""

    stop: bool
    abort: int | None

    def __enter__(self) -> Any: ...

    def __exit__(self, *exc: object) -> None: ...


class NoInterrupts:
    """Never asks the loop to stop; installs no handler."""

    stop = False
    abort: int | None = None

    def __enter__(self) -> NoInterrupts:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


class SignalInterrupts:
    """SIGINT/SIGUSR1 -> stop after this step; a second SIGINT or SIGTERM -> save and exit."""

    def __init__(self, log: Callable[[str], None] = lambda message: None) -> None:
        self.log = log
        self.stop = False
        self.abort: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> SignalInterrupts:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: object) -> None:
        if signum in (signal.SIGINT, signal.SIGUSR1) and not self.stop:
            self.stop = True
            self.log("interrupted: stopping after this step and saving (Ctrl+C again to quit at once)")
            return
        if signum == signal.SIGUSR1:
            return  # a repeated SIGUSR1 asks for nothing more
        self.abort = 130 if signum == signal.SIGINT else 143
