"""Writing files so that a reader never sees half of one: the one atomic writer of charrnn."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO

from charrnn.errors import CharrnnError, CheckpointError

_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: temporary files are created 0600, the result gets the usual mode


@contextmanager
def atomic_write(
    path: str | Path, what: str = "checkpoint", error: type[CharrnnError] = CheckpointError
) -> Iterator[IO[bytes]]:
    """A binary file that replaces `path` only once the block completes (unique temporary, fsync, rename).

    Concurrent writers never share a temporary, readers see the old file or the new one, and the
    temporary is removed whatever happens (a full disk included). OSError becomes
    `error("cannot write <what> <path>: <reason>")`.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise error(f"cannot write {what} {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
            if hasattr(os, "fchmod"):  # not on Windows before Python 3.13
                os.fchmod(f.fileno(), 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except OSError as exc:
        raise error(f"cannot write {what} {path}: {exc.strerror or exc}") from None
    finally:
        with suppress(OSError):  # gone already after the rename
            os.unlink(tmp)
