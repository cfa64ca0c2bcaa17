"""An `ExportNetwork` as one self-contained web page that runs the model in plain JavaScript.

The page is `static/page.html` with the style (`page.css`), the script (`page.js`) and the
model filled in: a JSON description in a `<script type="application/json">` element, the
arrays one base64 string of little-endian float32 (float64 models are written as float32).
Nothing is fetched, and the page's Content-Security-Policy forbids fetching anything, so it
works opened from a file with the network off. Layouts, chosen for the script's loops (each a
row-by-row dot product over contiguous memory):

    layer 0    E (V, G) = W.T, one row per id (the one-hot product is a row lookup)
    layer l>0  W (G, I)
    every      R (G, H), Wb (G,), Rb (G,)
    output     WhyT (V, H) = Why.T, by (V,)
"""

from __future__ import annotations

import base64
import html
import json
import re
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from charrnn import __version__
from charrnn.files import atomic_write

from . import ExportError

if TYPE_CHECKING:
    from . import Source

STATIC = Path(__file__).resolve().parent / "static"
#: the playground's look, which the page shares (its own `page.css` follows it)
PLAYGROUND_STYLE = resources.files("charrnn_plugins.serve") / "static" / "style.css"
PAGE_SAMPLERS = ("greedy", "temperature", "top_k")  # what the page's script implements
SLOT = re.compile(r"\{\{(title|style|script|model)\}\}")


class Arrays:
    """Arrays laid end to end as float32; each is referred to by its offset and shape."""

    def __init__(self) -> None:
        self.parts: list[np.ndarray] = []
        self.size = 0

    def add(self, a: np.ndarray) -> dict[str, Any]:
        a = np.ascontiguousarray(a, dtype="<f4")
        ref = {"offset": self.size, "shape": list(a.shape)}
        self.parts.append(a.reshape(-1))
        self.size += a.size
        return ref

    def base64(self) -> str:
        return base64.b64encode(np.concatenate(self.parts).tobytes()).decode("ascii")


def defaults(config: dict[str, Any]) -> dict[str, Any]:
    """The page's starting values: the generation settings saved with the model.

    A saved sampler the page does not implement (top_p, beam, a plugin's) starts it on
    `temperature` with the saved temperature.
    """
    sampler, generate = config.get("sampler", {}), config.get("generate", {})
    kind = sampler.get("type")
    return {
        "seed_text": generate.get("seed_text", ""),
        "num_chars": generate.get("num_chars", 500),
        "sampler": kind if kind in PAGE_SAMPLERS else "temperature",
        "temperature": float(sampler.get("temperature", 1.0)),
        "top_k": int(sampler.get("k", 40)) if kind == "top_k" else 40,
    }


def model_json(source: Source) -> dict[str, Any]:
    """The description the page's script reads (see the module docstring for the layouts)."""
    arrays, layers = Arrays(), []
    for n, layer in enumerate(source.network.layers):
        W = np.asarray(layer.W)
        entry: dict[str, Any] = {
            "op": layer.op,
            "hidden": int(layer.R.shape[1]),
            "inputs": int(W.shape[1]),
            "state": list(layer.state),
        }
        if n == 0:
            entry["E"] = arrays.add(W.T)  # (V, G)
        else:
            entry["W"] = arrays.add(W)  # (G, I)
        entry.update(R=arrays.add(layer.R), Wb=arrays.add(layer.Wb), Rb=arrays.add(layer.Rb))
        layers.append(entry)
    return {
        "format": "charrnn-page",
        "version": 1,
        "charrnn": __version__,
        "name": source.name,
        "type": source.model_type,
        "summary": source.summary(),
        "parameters": source.parameters,
        "step": source.step,
        "vocab": source.vocab,
        "encoding": source.encoding,
        "defaults": defaults(source.config),
        "layers": layers,
        "WhyT": arrays.add(np.asarray(source.network.Why).T),  # (V, H)
        "by": arrays.add(source.network.by),
        "floats": arrays.size,
        "weights": arrays.base64(),
    }


def script_safe(text: str) -> str:
    """JSON text that cannot end the `<script>` element holding it: every `<` escaped."""
    return text.replace("<", "\\u003c")


def render(source: Source) -> str:
    """The page's HTML, everything inline."""
    template = (STATIC / "page.html").read_text(encoding="utf-8")
    filled = {
        "title": html.escape(f"{source.name} · charrnn"),
        "style": PLAYGROUND_STYLE.read_text(encoding="utf-8")
        + (STATIC / "page.css").read_text(encoding="utf-8"),
        "script": (STATIC / "page.js").read_text(encoding="utf-8"),
        "model": script_safe(json.dumps(model_json(source), ensure_ascii=False, separators=(",", ":"))),
    }
    return SLOT.sub(lambda m: filled[m.group(1)], template)


def write_page(source: Source, output: str | Path) -> int:
    """Write the page of `source` to `output` (atomically); returns its size in bytes."""
    data = render(source).encode("utf-8")
    with atomic_write(output, "page", ExportError) as f:
        f.write(data)
    return len(data)
