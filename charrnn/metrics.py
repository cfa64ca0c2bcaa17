"""The metrics file training appends to (`<checkpoint>.metrics.jsonl`), read in one place.

`charrnn plot`, a sweep's results and the server's metrics route all read it while a run may
still be appending, or after a run was killed mid-line: the last line is left out while it is
unfinished (no newline yet), and every other line must be a record, or the file is refused
with one line naming the file and the line. `read_jsonl` is the same reader for any file of
JSON lines (a sweep's results.jsonl).
"""

from __future__ import annotations

import json
import math
import numbers
import os
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from charrnn.errors import CharrnnError

#: bytes in one line at most; a metrics line is a few hundred, so a longer one is not a metrics file
MAX_LINE = 1 << 20

Check = Callable[[Any], "str | None"]


def read_metrics(
    path: str | os.PathLike,
    *,
    empty_ok: bool = False,
    warn: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """The records of a metrics file, oldest first.

    A file without records is an error unless `empty_ok` (a run that has not reported yet);
    `warn` hears about an unfinished last line, which is left out either way.
    """
    records = read_jsonl(path, "metrics file", record_problem, warn=warn)
    if not records and not empty_ok:
        raise CharrnnError(f"{path}: no metrics records (an empty file?)")
    return records


def read_jsonl(
    path: str | os.PathLike,
    what: str,
    check: Check | None = None,
    *,
    warn: Callable[[str], None] | None = None,
) -> list[Any]:
    """The JSON values of a file of JSON lines; `check(value)` returns a problem or None.

    Blank lines are skipped. Errors are `CharrnnError`s that name `what`, the file and the line.
    """
    path = Path(path)
    values: list[Any] = []
    with _open_regular(path, what) as f:
        number = 0
        while True:
            try:
                raw = f.readline(MAX_LINE + 1)
            except OSError as exc:
                raise CharrnnError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
            if not raw:
                break
            number += 1
            if len(raw) > MAX_LINE:
                raise CharrnnError(f"{path}:{number}: a line longer than {MAX_LINE:,} bytes; is it a {what}?")
            unfinished = not raw.endswith(b"\n")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                if unfinished and exc.reason == "unexpected end of data":  # a character cut by a kill
                    _skip(path, number, warn)
                    break
                raise CharrnnError(
                    f"{path}:{number}: not UTF-8 text (byte {exc.start}); is it a {what}?"
                ) from None
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except RecursionError:
                raise CharrnnError(f"{path}:{number}: not a JSON line (nested too deeply)") from None
            except ValueError as exc:  # JSONDecodeError, or an integer of more digits than Python converts
                if unfinished:
                    _skip(path, number, warn)
                    break
                raise CharrnnError(f"{path}:{number}: not a JSON line ({getattr(exc, 'msg', exc)})") from None
            problem = check(value) if check is not None else None
            if problem:
                raise CharrnnError(f"{path}:{number}: {problem}")
            values.append(value)
    return values


def record_problem(record: Any) -> str | None:
    """What is wrong with one metrics record, or None: a JSON object with a `step` and numeric losses."""
    if not isinstance(record, dict):
        return f'expected a JSON object like {{"step": 100, "train_loss": 2.1}}, got {type(record).__name__}'
    step = record.get("step")
    if not is_number(step) or step < 0:
        return f"'step' must be a number >= 0, got {_show(step)}"
    if not math.isfinite(step):
        return f"'step' must be finite, got {_show(step)}"
    for key in ("train_loss", "val_loss"):
        if record.get(key) is not None and not is_number(record[key]):
            return f"{key!r} must be a number or null, got {_show(record[key])}"
    return None


def is_number(value: Any) -> bool:
    """A float, or an int (NumPy's too) that converts to one, not a bool: what a step or a loss may be."""
    if isinstance(value, float):
        return True
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return False
    try:
        float(value)
    except OverflowError:  # a 4,000-digit integer: JSON allows it, nothing can draw or rank it
        return False
    return True


def _show(value: Any, limit: int = 40) -> str:
    """A value for a one-line message, cut to `limit` characters."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**limit:
        return f"an integer of {len(str(abs(value)))} digits"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _skip(path: Path, number: int, warn: Callable[[str], None] | None) -> None:
    if warn is not None:
        warn(f"{path}:{number}: the last line is unfinished (a run still writing it, or killed); left out")


@contextmanager
def _open_regular(path: Path, what: str) -> Iterator[BinaryIO]:
    """`path` opened for binary reading if it is a regular file. Anything else (a folder, a FIFO,
    /dev/zero) is refused before a byte is read: reading one would block or never end."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO would block in open
    except FileNotFoundError:
        raise CharrnnError(f"{what} not found: {path}") from None
    except IsADirectoryError:  # Windows; elsewhere a folder opens, and fstat says what it is
        raise CharrnnError(f"{what} path is a directory, not a file: {path}") from None
    except OSError as exc:
        raise CharrnnError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        if stat.S_ISDIR(mode):
            raise CharrnnError(f"{what} path is a directory, not a file: {path}")
        raise CharrnnError(f"{path} is not a regular file (a device or a pipe?); give a {what}")
    with os.fdopen(fd, "rb") as f:
        yield f
