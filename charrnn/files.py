"""The files of a run: their names beside the checkpoint (`RunFiles`), and the one atomic writer.

`atomic_write` writes a unique temporary beside the file and renames it over the file. The
temporary is named `.<name>.<pid>-<start>.<random>.tmp`: the writer's process id and its start
time (clock ticks after boot, field 22 of /proc/<pid>/stat; 0 where there is no /proc). A writer
killed with SIGKILL (or by the OOM killer, or a power cut) cannot remove its temporary, so each
later write of the same file removes the temporaries whose writer is gone first: no process has
that id (`os.kill(pid, 0)`), the one that has it is a zombie, or it started at another time (the
id was reused, after a reboot or a wrap-around). A temporary whose writer cannot be judged is kept:
nothing removes a live writer's file.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO

from charrnn.errors import CharrnnError, CheckpointError

_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: temporary files are created 0600, the result gets the usual mode

#: what follows `.<name>.` in a temporary's name: pid, start time, mkstemp's 8 random characters
_TEMPORARY = re.compile(r"(\d+)-(\d+)\.[a-z0-9_]{8}\.tmp")
#: the longest such tail: a 7-digit pid (Linux's largest), a 20-digit start, 8 characters, `.tmp`
_TAG_BYTES = 7 + 1 + 20 + 1 + 8 + 4


class RunFiles:
    """The files that belong with a checkpoint, named from its path in this one place.

    `runs/x/model.npz` has `model.best.npz` (the best validation loss), `model.metrics.jsonl`
    and `model.loss.svg` beside it, and its TensorBoard events in `runs/x/tb/model/`; a name
    without `.npz` keeps all of it (`model.ckpt` -> `model.ckpt.best.npz`). Each of these files
    is written through `atomic_write`, whose temporaries `temporary_prefix` names.
    """

    #: the most bytes a name beside the checkpoint adds to the checkpoint's own name
    NAME_RESERVE = len(".metrics.jsonl")

    def __init__(self, checkpoint: str | os.PathLike[str]) -> None:
        self.checkpoint = Path(checkpoint)

    @classmethod
    def from_metrics(cls, metrics: str | os.PathLike[str]) -> RunFiles:
        """The run a metrics file belongs to (`model.metrics.jsonl`; a bare `.jsonl` too)."""
        path = Path(metrics)
        for suffix in (".metrics.jsonl", ".jsonl"):
            if path.name.endswith(suffix) and len(path.name) > len(suffix):
                return cls(path.with_name(path.name.removesuffix(suffix) + ".npz"))
        return cls(path.with_name(path.name + ".npz"))

    @property
    def name(self) -> str:
        """The run's name: the checkpoint's file name without `.npz` (`model`); the best model
        of a run (`model.best.npz`) belongs to the same run."""
        for suffix in (".best.npz", ".npz"):
            if self.checkpoint.name.endswith(suffix) and len(self.checkpoint.name) > len(suffix):
                return self.checkpoint.name.removesuffix(suffix)
        return self.checkpoint.name

    def _beside(self, suffix: str) -> Path:
        return self.checkpoint.with_name(self.name + suffix)

    @property
    def best(self) -> Path:
        return self._beside(".best.npz")

    @property
    def metrics(self) -> Path:
        return self._beside(".metrics.jsonl")

    @property
    def plot(self) -> Path:
        return self._beside(".loss.svg")

    @property
    def tensorboard(self) -> Path:
        return self.checkpoint.parent / "tb" / self.name


@contextmanager
def atomic_write(
    path: str | Path, what: str = "checkpoint", error: type[CharrnnError] = CheckpointError
) -> Iterator[IO[bytes]]:
    """A binary file that replaces `path` only once the block completes (unique temporary, fsync, rename).

    Concurrent writers never share a temporary, readers see the old file or the new one, and the
    temporary is removed whatever happens (a full disk included); what a killed writer left is
    removed by the next write (module docstring). OSError becomes
    `error("cannot write <what> <path>: <reason>")`.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temporary_prefix(path), suffix=".tmp")
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


def temporary_prefix(path: Path, pid: int | None = None) -> str:
    """`.<name>.<pid>-<start>.`: how the temporaries of `path` begin (mkstemp adds the rest)."""
    pid = os.getpid() if pid is None else pid
    return f"{_head(path)}{pid}-{process_start(pid) or 0}."


def _head(path: Path) -> str:
    """`.<name>.`, the name shortened so that any writer's temporary fits the file system.

    Shortened names may be shared by several files, whose dead writers' temporaries are garbage
    all the same; a name that fits with `_TAG_BYTES` more is never shortened.
    """
    name, room = path.name, _name_max(path.parent) - 2 - _TAG_BYTES
    while len(os.fsencode(name)) > room and name:
        name = name[:-1]
    return f".{name}."


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Remove the temporaries of `path` whose writer is gone (module docstring); the removed ones."""
    head = _head(path)
    removed = []
    try:
        entries = os.listdir(path.parent)
    except OSError:
        return removed
    for entry in entries:
        found = _TEMPORARY.fullmatch(entry[len(head) :]) if entry.startswith(head) else None
        if found and writer_gone(int(found[1]), int(found[2])):
            with suppress(OSError):  # another writer removed it first, or the folder is read-only
                os.unlink(path.parent / entry)
                removed.append(path.parent / entry)
    return removed


def writer_gone(pid: int, start: int) -> bool:
    """Whether process `pid`, started at `start` (0: unknown), has ended; False when it cannot be told."""
    if sys.platform == "win32" or pid <= 0:  # there os.kill(pid, 0) sends Ctrl+C; 0 is a process group
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # EPERM: alive, another user's
        pass
    seen = _stat(pid)
    if seen is None:  # no /proc, or hidden: cannot tell
        return False
    state, started = seen
    return state in ("Z", "X") or (start != 0 and started != start)


def process_start(pid: int) -> int | None:
    """When process `pid` started, in clock ticks after boot (/proc/<pid>/stat); None without /proc."""
    seen = _stat(pid)
    return None if seen is None else seen[1]


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, start time) of process `pid` from /proc/<pid>/stat, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()  # after the command name, which may hold spaces
        return fields[0].decode("ascii"), int(fields[19])  # fields 3 (state) and 22 (starttime)
    except (OSError, IndexError, ValueError, UnicodeDecodeError):
        return None


def _name_max(folder: Path) -> int:
    try:
        return min(os.pathconf(folder, "PC_NAME_MAX"), 255)
    except (OSError, ValueError, AttributeError):  # no pathconf (Windows) or no answer
        return 255
