"""A TensorBoard logger: training reports as TensorBoard scalars and text (optional builtin).

Enable it for a run with `plugins: [charrnn_plugins.tensorboard]` (or `--set
'plugins=[charrnn_plugins.tensorboard]'`); it needs the `tensorboard` extra
(`pip install 'charrnn[tensorboard]'`, which installs `tensorboardX`: neither torch nor
TensorFlow). Each run writes to `<checkpoint folder>/tb/<checkpoint stem>`, so
`tensorboard --logdir <checkpoint folder>/tb` shows the runs of one folder side by side and a
resumed run continues its own curves.

Logged at each report: the scalars `train_loss`, `val_loss` (when evaluated), `lr` (when the
optimizer has one) and `chars_per_sec`, and the sample as text `sample`; at the start, the
resolved pipeline as text `config`.

Events are written and flushed in the training thread, at each report (tensorboardX's own
`SummaryWriter` writes from a thread of its own, which on a full disk prints its traceback and
then blocks the next report on its full queue): a failed write stops the run with one line. The
writer is kept per thread: the hooks of one training run are all called in the thread that
trains, and a module is one object shared by every plugin manager that registers it, so two
runs training in the threads of one process (a sweep's trials) keep separate writers.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from charrnn import hookimpl
from charrnn.errors import PluginError
from charrnn.files import RunFiles

EXTRA = "pip install 'charrnn[tensorboard]'"

_local = threading.local()


def log_dir(checkpoint: str) -> Path:
    """Where the run with this checkpoint path writes its event files."""
    return RunFiles(checkpoint).tensorboard


class EventFile:
    """One TensorBoard event file, named as tensorboardX names them, written where it is called."""

    def __init__(self, folder: Path, suffix: str) -> None:
        Event, RecordWriter, scalar, text = _tensorboardx()
        self.Event, self.scalar_summary, self.text_summary = Event, scalar, text
        self.path = folder / f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}{suffix}"
        with self.failing():
            self.records = RecordWriter(str(self.path))
        self.write(self.Event(wall_time=time.time(), file_version="brain.Event:2"))

    def scalar(self, tag: str, value: float, step: int) -> None:
        self.write(self.Event(summary=self.scalar_summary(tag, value), step=step, wall_time=time.time()))

    def text(self, tag: str, text: str, step: int) -> None:
        self.write(self.Event(summary=self.text_summary(tag, text), step=step, wall_time=time.time()))

    def write(self, event: Any) -> None:
        with self.failing():
            self.records.write(event.SerializeToString())

    def flush(self) -> None:
        with self.failing():
            self.records.flush()  # to disk (fsync): a full disk shows here, not at exit

    def close(self) -> None:
        with self.failing():
            self.records.close()

    @contextmanager
    def failing(self) -> Iterator[None]:
        """An OSError (a full disk) closes the file, dropping what it holds, and is one line."""
        try:
            yield
        except OSError as exc:
            records = getattr(self, "records", None)
            if records is not None:
                with suppress(OSError):  # the buffer's last flush fails again; the file closes anyway
                    records.close()
            raise PluginError(f"cannot write TensorBoard events {self.path}: {exc.strerror or exc}") from None


def _tensorboardx() -> tuple[Any, Any, Any, Any]:
    """The pieces of tensorboardX used: the event proto, its record framing, two summary builders."""
    try:
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.record_writer import RecordWriter
        from tensorboardX.summary import scalar, text
    except ImportError:
        raise PluginError(f"the TensorBoard logger needs tensorboardX: {EXTRA}") from None
    return Event, RecordWriter, scalar, text


def _code_block(text: str) -> str:
    """TensorBoard renders text as Markdown: indent it so newlines and `*` stay as they are."""
    return "\n".join("    " + line for line in text.split("\n"))


@hookimpl
def charrnn_train_start(config: dict[str, Any], checkpoint: str, step: int) -> None:
    _tensorboardx()  # without it, nothing is created
    _close()
    folder = log_dir(checkpoint)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PluginError(f"cannot create the TensorBoard folder {str(folder)!r}: {exc}") from None
    # The file name holds the time in whole seconds: a resume within the same second would
    # overwrite the first file without a suffix of its own.
    suffix = f".{os.getpid()}.{threading.get_ident()}.{step}"
    writer = EventFile(folder, suffix)
    _local.writer = writer
    writer.text("config", _code_block(json.dumps(config, indent=2, default=str)), step)
    writer.flush()  # a full disk stops the run now, before its first step


@hookimpl
def charrnn_train_report(step: int, metrics: dict[str, Any]) -> None:
    writer = getattr(_local, "writer", None)
    if writer is None:
        return
    try:
        for name in ("train_loss", "val_loss", "lr", "chars_per_sec"):
            value = metrics.get(name)
            if value is not None:
                writer.scalar(name, float(value), step)
        if metrics.get("sample") is not None:
            writer.text("sample", _code_block(metrics["sample"]), step)
        writer.flush()  # reports are rare: TensorBoard shows each one as soon as it is made
    except PluginError:
        _local.writer = None  # closed already; the end hook has nothing left to write
        raise


@hookimpl
def charrnn_train_end(checkpoint: str, step: int, metrics: dict[str, Any], reason: str) -> None:
    _close()


def _close() -> None:
    writer = getattr(_local, "writer", None)
    _local.writer = None
    if writer is not None:
        writer.close()
