"""Lock files with the holder's process id: one sweep per output folder, one process per trial.

The lock is an flock on an open file, so the kernel drops it when its last holder ends, however
it ends (a SIGKILL included): no stale lock to guess about. The process id written in the file
is for the message that names who holds it. Where `fcntl` is missing (Windows) nothing is locked.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

#: seconds to wait for a trial's process left from a killed sweep (saving, ending) to let go of it
ORPHAN_WAIT = 30.0


def take(path: Path, wait: float = 0.0) -> int | None:
    """An open descriptor holding the lock on `path`, or None if another process still holds it
    after `wait` seconds. The file then names this process; `name` it for a child that inherits it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait
    while fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                return None
            time.sleep(0.1)
    name(fd, os.getpid())
    return fd


def name(fd: int, pid: int) -> None:
    """Write `pid` as the holder of the lock held on `fd`."""
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, f"{pid}\n".encode())


def holder(path: Path) -> str:
    """The process id written in a lock file, for messages (`?` when it cannot be read)."""
    try:
        return path.read_text(encoding="utf-8").strip() or "?"
    except (OSError, UnicodeDecodeError):
        return "?"


def release(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)
