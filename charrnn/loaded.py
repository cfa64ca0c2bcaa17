"""A trained model, loaded once, that generates many times with options given per call.

`charrnn.load(path)` returns a `LoadedModel`, as simonw/llm's `get_model` returns a model to
prompt: options are checked at each call against the same descriptions a pipeline uses, and a
bad one is named in the caller's words (`num_chars: must be >= 0, got -1`). The generate stage,
`charrnn generate`, `generate_text`/`generate_samples` and the server are thin callers; every
one of them builds a `charrnn.engine.Request`, so one seed gives one text on every path.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, overload

import numpy as np

from charrnn import checkpoint as ckpt_io
from charrnn import config as cfg
from charrnn.assembly import Assembly
from charrnn.engine import Batch, Request, run
from charrnn.errors import CheckpointError, ConfigError, CorpusError
from charrnn.types import Corpus, Model

#: the parts of a training pipeline that generation uses
GENERATION_SECTIONS = ("seed", "generate")
#: how the Python API names what it was given, in messages (`num_chars: must be >= 0, got -1`)
API_LABELS = {
    "generate.num_chars": "num_chars",
    "generate.seed_text": "seed_text",
    "generate.num_samples": "num_samples",
    "generate.stop": "stop",
    "seed": "seed",
    "sampler.type": "sampler",
}


class Generation(Sequence[str]):
    """The samples of one `generate` call: a sequence of texts (seed text first in each), shown
    joined by the pipeline's `generate.separator`."""

    def __init__(self, texts: list[str], separator: str, reasons: list[str] | None = None) -> None:
        self.texts, self.separator = texts, separator
        self.reasons = reasons or []  # per sample: "stop" (a stop string ended it) or "length"

    @property
    def text(self) -> str:
        return self.separator.join(self.texts)

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"Generation({self.texts!r})"

    def __len__(self) -> int:
        return len(self.texts)

    @overload
    def __getitem__(self, i: int) -> str: ...

    @overload
    def __getitem__(self, i: slice) -> list[str]: ...

    def __getitem__(self, i: int | slice) -> str | list[str]:
        return self.texts[i]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Generation):
            return self.texts == other.texts
        if isinstance(other, list):
            return self.texts == other
        return NotImplemented


class LoadedModel:
    """A model with its vocabulary and the resolved pipeline it was trained with.

    `config` is that pipeline, as the checkpoint stores it (or as the run resolved it); its
    `sampler`, `seed` and `generate` sections are the defaults of `generate`.
    """

    def __init__(
        self,
        model: Model,
        vocab: Corpus,
        assembly: Assembly,
        path: str | None = None,
        config: dict[str, Any] | None = None,
        model_type: str | None = None,
    ) -> None:
        self.model, self.vocab, self.assembly, self.path = model, vocab, assembly, path
        self.config: dict[str, Any] = config if config is not None else assembly.config
        self.model_type: str = model_type or self.config["model"]["type"]
        self.model_label = assembly.registry.label("model", self.model_type)

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
        module because a file says so. The saved sampler is needed only when a call does not
        name one (a checkpoint trained with a plugin's sampler generates with `temperature`
        without that plugin).
        """
        path = str(path)
        saved = ckpt_io.read_meta(path)["config"]
        base = {k: copy.deepcopy(saved[k]) for k in GENERATION_SECTIONS if k in saved}
        where = f"checkpoint {path}"
        labels = {**{k: f"{where}: {k}" for k in (*GENERATION_SECTIONS, "sampler")}, **(labels or {})}
        assembly = Assembly(base, plugins=plugins, load_entrypoints=load_entrypoints, labels=labels)
        return cls.from_path(path, assembly, saved)

    @classmethod
    def from_path(cls, path: str, assembly: Assembly, config: dict[str, Any] | None = None) -> LoadedModel:
        """The model a checkpoint holds, rebuilt with `assembly`'s plugins, generating with
        `config`'s settings (default: `assembly`'s, as a pipeline's generate stage does).

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
        corpus = Corpus(np.zeros(0, np.uint8), list(saved.meta["vocab"]), path, saved.meta["encoding"])
        return cls(model, corpus, assembly, path, config, saved.meta["config"]["model"]["type"])

    # -- one call's options ----------------------------------------------------------------------

    def options(
        self,
        *,
        num_chars: int | None = None,
        seed_text: str | None = None,
        num_samples: int | None = None,
        stop: str | Iterable[str] | None = None,
        seed: int | None = None,
        sampler: str | Mapping[str, Any] | None = None,
        sampler_options: Mapping[str, Any] | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> tuple[dict[str, Any], dict[str, Any], int, cfg.Lines]:
        """The generate section, the sampler section and the seed for one call, validated, and
        where each value came from (for the messages of what is built from them).

        `None` means the value saved with the model. A sampler name other than the saved one
        starts from that sampler's defaults; `sampler_options` then set options. `labels` say
        how the caller's values were given (`{"sampler.k": "-o k"}`), so a bad one is named in
        the caller's words.
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
        section.update(sampler_options or {})
        lines: cfg.Lines = dict(self.assembly.lines)
        lines.update({tuple(key.split(".")): label for key, label in (labels or {}).items()})
        raw = {"seed": self.config["seed"] if seed is None else seed, "generate": g, "sampler": section}
        checked = cfg.validate(raw, lines)
        try:
            self.vocab.encode(checked["generate"]["seed_text"])
        except CorpusError as exc:
            raise CorpusError(f"{cfg.where(('generate', 'seed_text'), lines)}: {exc}") from None
        sampler_section = self.assembly.resolve("sampler", checked["sampler"], lines)
        return checked["generate"], sampler_section, checked["seed"], lines

    def request(
        self,
        *,
        labels: Mapping[str, str] | None = None,
        on_text: Callable[[int, str], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
        logprobs: int | None = None,
        score_prompt: bool = False,
        stream_index: int = 0,
        **options: Any,
    ) -> Request:
        """One call's options (see `options`) as a request for the engine.

        `stream_index` picks another random stream of the same seed (the server's second prompt).
        """
        g, section, seed, lines = self.options(labels=labels, **options)
        sampler = self.assembly.sampler(self.vocab.vocab, section, lines)
        return Request(
            g["seed_text"],
            sampler,
            np.random.default_rng([seed, 2] if stream_index == 0 else [seed, 2, stream_index]),
            g["num_chars"],
            n=g["num_samples"],
            stop=g["stop"],
            logprobs=logprobs,
            score_prompt=score_prompt,
            labels={"model": self.model_label, "sampler": self.assembly.label("sampler", section)},
            on_text=on_text,
            cancelled=cancelled,
        )

    # -- generating --------------------------------------------------------------------------------

    def generate(
        self,
        seed_text: str | None = None,
        num_chars: int | None = None,
        *,
        sampler: str | Mapping[str, Any] | None = None,
        seed: int | None = None,
        num_samples: int | None = None,
        stop: str | Iterable[str] | None = None,
        stream: bool = False,
        on_text: Callable[[str], None] | None = None,
        labels: Mapping[str, str] | None = None,
        **sampler_options: Any,
    ) -> Generation | Iterator[str]:
        """Samples of `num_chars` characters after `seed_text` (defaults: the pipeline's).

        `sampler` is a name or a `{type: ..., option: ...}` mapping; a name other than the saved
        one starts from that sampler's defaults, and `sampler_options` (`temperature=0.8`, `k=5`)
        set options. `stream=True` returns an iterator over the first sample's text as it is made
        (seed text first) instead of the finished `Generation`; `on_text` receives the same pieces
        while `generate` runs. `labels` name the options in another caller's words (`--num-chars`).
        """
        given = {
            "generate.num_chars": num_chars,
            "generate.seed_text": seed_text,
            "generate.num_samples": num_samples,
            "generate.stop": stop,
            "seed": seed,
            "sampler.type": sampler,
        }
        words = {key: API_LABELS[key] for key, value in given.items() if value is not None}
        words.update({f"sampler.{k}": k for k in sampler_options})
        words.update(labels or {})
        pieces: list[str] = []

        def first_row(row: int, text: str) -> None:
            if row == 0:
                (pieces.append if stream else on_text)(text)  # type: ignore[operator]

        request = self.request(
            labels=words,
            on_text=first_row if stream or on_text is not None else None,
            num_chars=num_chars,
            seed_text=seed_text,
            num_samples=num_samples,
            stop=stop,
            seed=seed,
            sampler=sampler,
            sampler_options=sampler_options,
        )
        if stream:
            return self._stream(request, pieces)
        if on_text is not None:
            on_text(request.seed_text)
        self._run(request)
        return Generation(request.texts, self.separator(), request.reasons)

    def _run(self, request: Request) -> None:
        run([request], self.model, self.vocab, model_label=self.model_label)
        if request.error is not None:
            raise request.error

    def _stream(self, request: Request, pieces: list[str]) -> Iterator[str]:
        """The request's first row, piece by piece, as the engine makes it (a chunk at a time)."""
        yield request.seed_text
        batch = Batch(self.model, self.vocab, chunk=64, model_label=self.model_label)
        batch.add([request])
        while True:
            yield from pieces
            pieces.clear()
            if not batch.requests:
                break
            batch.step()
        if request.error is not None:
            raise request.error

    def separator(self) -> str:
        return self.config["generate"]["separator"]


def load(path: str | Path, *, plugins: Iterable[object] = ()) -> LoadedModel:
    """A checkpoint's model, loaded once, to `generate` from as many times as needed.

    `plugins` are modules (or `.py` paths, or plugin objects) whose components the checkpoint
    needs: a model or a sampler that no installed plugin provides.
    """
    return LoadedModel.load(path, plugins=plugins)


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
