"""A trained model, loaded once, that generates many times with options given per call.

`charrnn generate`, the generate stage, `generate_text`/`generate_samples` and the server are
thin callers of `LoadedModel.generate`. Options are validated at each call against the same
schema and sampler signatures a pipeline uses, so a bad option is the caller's one-line error.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from charrnn import checkpoint as ckpt_io
from charrnn import config as cfg
from charrnn.assembly import Assembly
from charrnn.errors import CheckpointError, ConfigError, CorpusError
from charrnn.generate import generate
from charrnn.types import Corpus, Model

#: the parts of a training pipeline that generation uses
GENERATION_SECTIONS = ("seed", "sampler", "generate")


class LoadedModel:
    """A model with its vocabulary and the pipeline it was trained with (sampler defaults included)."""

    def __init__(
        self,
        model: Model,
        vocab: Corpus,
        assembly: Assembly,
        path: str | None = None,
        model_type: str | None = None,
    ) -> None:
        self.model, self.vocab, self.assembly, self.path = model, vocab, assembly, path
        self.config = assembly.config
        self.model_label = assembly.registry.label("model", model_type or assembly.config["model"]["type"])

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        plugins: Iterable[object] = (),
        load_entrypoints: bool = True,
        labels: Mapping[str, str] | None = None,
    ) -> LoadedModel:
        """Read a checkpoint and rebuild its model with the plugins loaded here.

        The plugins the checkpoint's pipeline names are not imported: generation never runs a
        module because a file says so.
        """
        path = str(path)
        saved_cfg = ckpt_io.read_meta(path)["config"]
        base = {k: copy.deepcopy(saved_cfg[k]) for k in GENERATION_SECTIONS if k in saved_cfg}
        where = f"checkpoint {path}"
        labels = {**{f"{k}": f"{where}: {k}" for k in base}, **(labels or {})}
        assembly = Assembly(base, plugins=plugins, load_entrypoints=load_entrypoints, labels=labels)
        return cls.from_path(path, assembly)

    @classmethod
    def from_path(cls, path: str, assembly: Assembly) -> LoadedModel:
        """The model a checkpoint holds, rebuilt with `assembly`'s plugins, generating with its settings.

        The model is built from the checkpoint's metadata first, so the archive's arrays are
        checked against the shapes it needs before any of them is read.
        """
        built: list[Model] = []

        def expect(meta: dict[str, Any]) -> dict[str, Any]:
            built.append(model_for(meta, assembly, path))
            return {"param": ckpt_io.specs(built[0].params, "f")}

        saved = ckpt_io.load(path, expect)
        model = built[0]
        ckpt_io.load_params(model, saved, path)
        corpus = Corpus(
            np.zeros(0, np.uint8), list(saved.meta["vocab"]), path, saved.meta.get("encoding", "utf-8")
        )
        return cls(model, corpus, assembly, path, saved.meta["config"]["model"]["type"])

    def options(
        self,
        *,
        num_chars: int | None = None,
        seed_text: str | None = None,
        num_samples: int | None = None,
        stop: Iterable[str] | None = None,
        seed: int | None = None,
        sampler: str | Mapping[str, Any] | None = None,
        temperature: float | None = None,
        sampler_options: Mapping[str, Any] | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> tuple[dict[str, Any], dict[str, Any], int, cfg.Lines]:
        """The generate section, the sampler section and the seed for one call, validated, and
        where each value came from (for the messages of what is built from them).

        `None` means the value saved with the model. A sampler name other than the saved one
        starts from that sampler's defaults; `temperature` and `sampler_options` then set
        options. `labels` say how the caller's values were given (`{"sampler.k": "-o k"}`), so
        a bad one is named in the caller's words.
        """
        g = dict(self.config["generate"])
        for key, value in (("num_chars", num_chars), ("seed_text", seed_text), ("num_samples", num_samples)):
            if value is not None:
                g[key] = value
        if stop is not None:
            g["stop"] = list(stop) if not isinstance(stop, str) else stop
        section = dict(self.config["sampler"])
        if isinstance(sampler, str) and sampler != section.get("type"):
            section = {"type": sampler}
        elif isinstance(sampler, Mapping):
            section = dict(sampler)
        if temperature is not None:
            section["temperature"] = temperature
        section.update(sampler_options or {})
        lines: cfg.Lines = dict(self.assembly.lines)
        if self.path is not None and not lines:  # loaded from a checkpoint: its values are named so
            for name, keys in (("generate", g), ("sampler", section)):
                lines.update({(name, key): f"checkpoint {self.path}: {name}.{key}" for key in keys})
            lines[("seed",)] = f"checkpoint {self.path}: seed"
        lines.update({tuple(key.split(".")): label for key, label in (labels or {}).items()})
        raw = {"seed": self.config["seed"] if seed is None else seed, "generate": g, "sampler": section}
        checked = cfg.validate(raw, lines)
        try:
            self.vocab.encode(checked["generate"]["seed_text"])
        except CorpusError as exc:
            raise CorpusError(f"{cfg.where(('generate', 'seed_text'), lines)}: {exc}") from None
        sampler_section = self.assembly.resolve("sampler", checked["sampler"], lines)
        return checked["generate"], sampler_section, checked["seed"], lines

    def generate(self, *, on_text: Callable[[str], None] | None = None, **options: Any) -> list[str]:
        """Samples of `generate.num_chars` characters after the seed text (see `options`).

        `on_text` receives the first sample as it is produced (streaming).
        """
        g, section, seed, lines = self.options(**options)
        sampler = self.assembly.sampler(self.vocab.vocab, section, lines)
        return generate(
            self.model,
            sampler,
            self.vocab,
            np.random.default_rng([seed, 2]),
            g["seed_text"],
            g["num_chars"],
            num_samples=g["num_samples"],
            stop=g["stop"],
            on_text=on_text,
            labels={"model": self.model_label, "sampler": self.assembly.label("sampler", section)},
        )

    def separator(self) -> str:
        return self.config["generate"]["separator"]


def model_for(meta: dict[str, Any], assembly: Assembly, path: str) -> Model:
    """The (untrained) model a checkpoint's metadata describes, built by `assembly`'s plugins."""
    section = meta["config"]["model"]
    name = section["type"]
    known = assembly.registry.components["model"]
    if name not in known:
        raise CheckpointError(
            f"checkpoint {path} needs model {name!r}, which no loaded plugin provides; install its plugin "
            f"or name it with --plugin (available: {', '.join(sorted(known))})"
        )
    try:
        section = assembly.resolve("model", section, {("model",): f"checkpoint {path}: model"})
        return assembly.build("model", section, vocab_size=len(meta["vocab"]), rng=np.random.default_rng(0))
    except ConfigError as exc:
        raise CheckpointError(f"checkpoint {path}: its model section does not build: {exc}") from None
    except MemoryError:
        raise CheckpointError(
            f"checkpoint {path}: its model section describes a model too large to build"
        ) from None
