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

The writer is kept per thread: the hooks of one training run are all called in the thread
that trains, and a module is one object shared by every plugin manager that registers it, so
two runs training in the threads of one process (a sweep's trials) keep separate writers.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

from charrnn import hookimpl
from charrnn.errors import PluginError

EXTRA = "pip install 'charrnn[tensorboard]'"

_local = threading.local()


def log_dir(checkpoint: str) -> Path:
    """Where the run with this checkpoint path writes its event files."""
    path = Path(checkpoint)
    return path.parent / "tb" / path.stem


def _summary_writer() -> Any:
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        raise PluginError(f"the TensorBoard logger needs tensorboardX: {EXTRA}") from None
    return SummaryWriter


def _code_block(text: str) -> str:
    """TensorBoard renders text as Markdown: indent it so newlines and `*` stay as they are."""
    return "\n".join("    " + line for line in text.split("\n"))


@hookimpl
def charrnn_train_start(config: dict[str, Any], checkpoint: str, step: int) -> None:
    writer_class = _summary_writer()
    _close()
    folder = log_dir(checkpoint)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PluginError(f"cannot create the TensorBoard folder {str(folder)!r}: {exc}") from None
    # The file name holds the time in whole seconds: a resume within the same second would
    # overwrite the first file without a suffix of its own.
    suffix = f".{os.getpid()}.{threading.get_ident()}.{step}"
    _local.writer = writer_class(logdir=str(folder), flush_secs=30, filename_suffix=suffix)
    _local.writer.add_text("config", _code_block(json.dumps(config, indent=2, default=str)), step)


@hookimpl
def charrnn_train_report(step: int, metrics: dict[str, Any]) -> None:
    writer = getattr(_local, "writer", None)
    if writer is None:
        return
    for name in ("train_loss", "val_loss", "lr", "chars_per_sec"):
        value = metrics.get(name)
        if value is not None:
            writer.add_scalar(name, float(value), step)
    if metrics.get("sample") is not None:
        writer.add_text("sample", _code_block(metrics["sample"]), step)
    writer.flush()  # reports are rare: TensorBoard shows each one as soon as it is made


@hookimpl
def charrnn_train_end(checkpoint: str, step: int, metrics: dict[str, Any], reason: str) -> None:
    _close()


def _close() -> None:
    writer = getattr(_local, "writer", None)
    _local.writer = None
    if writer is not None:
        writer.close()
