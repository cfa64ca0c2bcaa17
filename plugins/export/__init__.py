"""`charrnn export CHECKPOINT -o FILE.html|FILE.onnx`: a trained model to run without charrnn.

The command is registered through `charrnn_command` like any plugin's. Export is per model
type: the exporter a plugin registers for the checkpoint's model type (`charrnn_exporter`)
turns the model into an `ExportNetwork` (stacked recurrent layers in ONNX's conventions), and
one writer per format, chosen by the output's suffix, writes that network: `page` a single
self-contained web page that runs the model in plain JavaScript (its files are package data
under `static/`), `graph` an ONNX graph (the `onnx` extra).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from charrnn.errors import CharrnnError, PluginFailure
from charrnn.hookspecs import hookimpl
from charrnn.types import EXPORT_OPS, ExportLayer, ExportNetwork

#: output suffix -> what is written
FORMATS = {".html": "a self-contained web page", ".onnx": "an ONNX graph"}


class ExportError(CharrnnError):
    """The checkpoint cannot be exported as asked (format, model type, missing extra)."""


@dataclass
class Exported:
    """What `export` wrote: the file, its size, and the model in words."""

    path: Path
    size: int
    summary: str


@dataclass
class Source:
    """A loaded checkpoint as the writers see it: the network and what to say about the model."""

    network: ExportNetwork
    name: str
    model_type: str
    vocab: list[str]
    encoding: str
    parameters: int
    step: int
    config: dict[str, Any]  # the generation sections saved with the model: seed, sampler, generate

    def summary(self) -> str:
        """`lstm, 2 layers of 512, 65 symbols, 3,316,289 parameters`."""
        sizes = [layer.R.shape[1] for layer in self.network.layers]
        width = str(sizes[0]) if len(set(sizes)) == 1 else "/".join(map(str, sizes))
        layers = f"{len(sizes)} layer{'s' if len(sizes) > 1 else ''} of {width}"
        symbols = "256 bytes" if self.encoding == "bytes" else f"{len(self.vocab)} symbols"
        return f"{self.model_type}, {layers}, {symbols}, {self.parameters:,} parameters"


def format_of(output: str | Path) -> str:
    """The format `output`'s suffix names; any other suffix is an ExportError listing the formats."""
    suffix = Path(output).suffix.lower()
    if suffix not in FORMATS:
        known = ", ".join(f"{s} ({what})" for s, what in FORMATS.items())
        raise ExportError(
            f"cannot tell the format of {output}: name the output FILE.html or FILE.onnx ({known})"
        )
    return suffix


def export(checkpoint: str | Path, output: str | Path, *, plugins: Iterable[object] = ()) -> Exported:
    """Write the model of `checkpoint` to `output`, in the format its suffix names (see `FORMATS`)."""
    fmt = format_of(output)
    if fmt == ".onnx":
        from .graph import require_onnx

        require_onnx()  # before the checkpoint is read: a missing extra is said at once
    source = load(checkpoint, plugins)
    if fmt == ".html":
        from .page import write_page

        size = write_page(source, output)
    else:
        from .graph import write_graph

        size = write_graph(source, output)
    return Exported(Path(output), size, source.summary())


def load(checkpoint: str | Path, plugins: Iterable[object] = ()) -> Source:
    """The checkpoint's model through its type's exporter, checked, with what the writers show."""
    from charrnn.checkpoint import read_meta
    from charrnn.loaded import LoadedModel
    from charrnn.plugins import calling

    loaded = LoadedModel.load(checkpoint, plugins=plugins)
    meta = read_meta(checkpoint)
    model_type = meta["config"]["model"]["type"]
    registry = loaded.assembly.registry
    exporter = registry.components["exporter"].get(model_type)
    if exporter is None:
        owner = registry.components["model"][model_type].plugin
        raise ExportError(
            f"checkpoint {checkpoint}: model {model_type!r} (plugin {owner!r}) cannot be exported: "
            "no loaded plugin registers an exporter for it (charrnn_exporter)"
        )
    label = f"plugin {exporter.plugin!r} (exporter {model_type!r})"
    with calling(label):
        try:
            network = exporter.factory(loaded.model)
        except ValueError as exc:
            raise ExportError(
                f"checkpoint {checkpoint}: model {model_type!r} cannot be exported: {exc}"
            ) from None
    vocab = list(loaded.vocab.vocab)
    check_network(network, len(vocab), label)
    return Source(
        network=network,
        name=Path(checkpoint).stem,
        model_type=model_type,
        vocab=vocab,
        encoding=loaded.vocab.encoding,
        parameters=int(sum(np.size(p) for p in loaded.model.params.values())),
        step=int(meta.get("step", 0)),
        config=loaded.config,
    )


def check_network(network: object, V: int, label: str) -> None:
    """An exporter's result has the shapes `ExportNetwork` documents, or it is that plugin's failure."""

    def fail(problem: str) -> NoReturn:
        raise PluginFailure(label, f"returned {problem}")

    if not isinstance(network, ExportNetwork):
        fail(f"a {type(network).__name__}, not a charrnn.types.ExportNetwork")
    if not network.layers:
        fail("no layers")
    inputs, names = V, set()
    for n, layer in enumerate(network.layers):
        where = f"layer {n}"
        if not isinstance(layer, ExportLayer):
            fail(f"{where}: a {type(layer).__name__}, not a charrnn.types.ExportLayer")
        if layer.op not in EXPORT_OPS:
            fail(f"{where}: op {layer.op!r}, not one of {', '.join(EXPORT_OPS)}")
        R = np.asarray(layer.R)
        H = R.shape[1] if R.ndim == 2 else 0
        G = EXPORT_OPS[layer.op] * H
        shapes = {"W": (G, inputs), "R": (G, H), "Wb": (G,), "Rb": (G,)}
        for key, shape in shapes.items():
            a = np.asarray(getattr(layer, key))
            if H < 1 or a.shape != shape or a.dtype.kind != "f":
                fail(f"{where}: {key} of shape {a.shape} ({a.dtype}), expected floats of shape {shape}")
            if not np.isfinite(a).all():
                fail(f"{where}: {key} with values that are not finite")
        wanted = 2 if layer.op == "LSTM" else 1
        state = tuple(layer.state)
        if len(state) != wanted or not all(isinstance(s, str) and s.isidentifier() for s in state):
            fail(f"{where}: state {state!r}, expected {wanted} name{'s' if wanted > 1 else ''}")
        if names & set(state) or {"ids", "logits"} & set(state):
            fail(f"{where}: state {state!r}, whose names are taken")
        names |= set(state)
        inputs = H
    for key, shape in (("Why", (inputs, V)), ("by", (V,))):
        a = np.asarray(getattr(network, key))
        if a.shape != shape or a.dtype.kind != "f" or not np.isfinite(a).all():
            fail(f"{key} of shape {a.shape} ({a.dtype}), expected finite floats of shape {shape}")


def human_size(size: int) -> str:
    """`17.7 MB`: a file size in decimal units."""
    if size < 1000:
        return f"{size} bytes"
    exponent = min(int(math.log10(size) // 3), 3)
    return f"{size / 1000**exponent:.1f} {['kB', 'MB', 'GB'][exponent - 1]}"


class Export:
    help = "write a checkpoint as a self-contained web page (.html) or an ONNX graph (.onnx)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        from charrnn.commands import add_plugin

        parser.add_argument("checkpoint", help="a .npz checkpoint written by training")
        parser.add_argument(
            "-o",
            "--output",
            required=True,
            metavar="FILE",
            help="FILE.html: one page that runs the model offline; FILE.onnx: an ONNX graph "
            "(pip install 'charrnn[onnx]')",
        )
        add_plugin(parser)

    def __call__(self, args: argparse.Namespace, out: Any) -> int:
        done = export(args.checkpoint, args.output, plugins=args.plugins)
        out.write(f"wrote {done.path} ({human_size(done.size)}): {done.summary}\n")
        return 0


@hookimpl
def charrnn_command(register):
    register("export", Export)
