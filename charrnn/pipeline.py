"""YAML (or dict) -> validated configuration -> components -> stages (`train`, `generate`).

`run_pipeline` is the API beneath `charrnn run`; `generate_text` beneath `charrnn generate`.
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pluggy

from charrnn import checkpoint as ckpt_io
from charrnn import config as cfg
from charrnn.errors import CheckpointError, ConfigError, CorpusError
from charrnn.generate import generate
from charrnn.memory import check as check_memory
from charrnn.plugins import INJECTED, Registry, get_plugin_manager
from charrnn.textfile import encode_file
from charrnn.train import EVAL_STREAMS, Progress, Trainer, TrainResult, TrainSettings
from charrnn.train import evaluate as evaluate_loss
from charrnn.types import Corpus, Model


@dataclass
class RunResult:
    """What `run_pipeline` hands back."""

    config: dict[str, Any]
    text: str | None = None  # the samples joined by generate.separator
    texts: list[str] = field(default_factory=list)
    evaluation: dict[str, Any] | None = None
    checkpoint: str | None = None
    train: TrainResult | None = None


class Pipeline:
    """A validated configuration with its plugin manager and component registry."""

    def __init__(
        self,
        source: str | Path | Mapping[str, Any],
        *,
        plugins: Iterable[object] = (),
        overrides: Iterable[str] | Mapping[str, Any] | None = None,
        load_entrypoints: bool = True,
    ) -> None:
        raw, self.lines, self.origin = cfg.load_config(source)
        overridden = cfg.apply_overrides(raw, overrides)
        self.lines.update({tuple(key.split(".")): 0 for key in overridden})  # 0: "from --set"
        config = cfg.validate(raw, self.lines, self.origin)
        self.pm: pluggy.PluginManager = get_plugin_manager(
            load_entrypoints=load_entrypoints, extra=[*config["plugins"], *plugins]
        )
        self.registry = Registry(self.pm)
        for kind in cfg.COMPONENTS:
            config[kind] = self.resolve(kind, config[kind])
        self.config = config
        self._corpus: tuple[str, Any] | None = None  # (corpus section, what its loader returned)

    def locate(self, *path: str) -> str:
        return cfg.where(path, self.lines, self.origin)

    def resolve(self, kind: str, section: dict[str, Any]) -> dict[str, Any]:
        """Check a component section against its factory; fill the factory's defaults."""
        name = section["type"]
        component = self.registry.get(kind, name, self.locate(kind, "type"))
        own = cfg.PIPELINE_COMPONENT_OPTIONS.get(kind, {})
        options = {k: v for k, v in section.items() if k != "type" and k not in own}
        resolved = cfg.check_options(
            component.factory,
            options,
            lambda key: self.locate(kind, key),
            INJECTED if kind == "model" else (),
        )
        return {"type": name, **{k: section[k] for k in own if k in section}, **resolved}

    def build(self, kind: str, section: dict[str, Any], **injected: Any) -> Any:
        """Call the factory a section names; its ValueError/TypeError becomes a ConfigError."""
        component = self.registry.get(kind, section["type"], self.locate(kind, "type"))
        own = cfg.PIPELINE_COMPONENT_OPTIONS.get(kind, {})
        options = {k: v for k, v in section.items() if k != "type" and k not in own}
        try:
            return component.factory(**injected, **options)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{self.locate(kind)} ({section['type']}): {exc}") from None

    def model(self, vocab_size: int) -> Model:
        """The model to train; refused with one line when training it would not fit in memory.

        The factory checks its own size before allocating; a model with `memory_bytes(batch_size,
        seq_length)` is then checked with the training batch's work arrays too.
        """
        rng = np.random.default_rng([self.config["seed"], 0])
        model = self.build("model", self.config["model"], vocab_size=vocab_size, rng=rng)
        estimate = getattr(model, "memory_bytes", None)
        if callable(estimate):
            B, T = self.config["train"]["batch_size"], self.config["train"]["seq_length"]
            check_memory(
                estimate(B, T),
                f"training model {self.config['model']['type']!r} with train.batch_size={B} "
                f"and train.seq_length={T}",
                "parameters, gradients, optimizer state, activations",
            )
        return model

    def sampler(self, vocab: list[str]) -> Any:
        sampler = self.build("sampler", self.config["sampler"])
        if hasattr(sampler, "bind"):
            sampler.bind(vocab)
        return sampler

    # -- stages ---------------------------------------------------------------------------

    def load_corpus(self) -> tuple[Corpus, np.ndarray, np.ndarray | None]:
        """The corpus, its training ids and validation ids (None without a split).

        The loader runs once per corpus section: `train` then `evaluate` read the text once.
        """
        key = repr(sorted(self.config["corpus"].items()))
        if self._corpus is None or self._corpus[0] != key:
            self._corpus = (key, self.build("corpus", self.config["corpus"]))
        corpus = self._corpus[1]
        if not isinstance(corpus, Corpus):
            raise CorpusError(
                f"corpus loader {self.config['corpus']['type']!r} did not return a charrnn.Corpus"
            )
        n = len(corpus.ids)
        name = corpus.source or self.config["corpus"]["type"]
        if n == 0:
            raise CorpusError(f"corpus {name} is empty")
        if len(corpus.vocab) < 2:
            raise CorpusError(
                f"corpus {name} has {len(corpus.vocab)} distinct character(s); at least 2 are needed"
            )
        n_val = int(n * self.config["corpus"]["val_fraction"])
        train_ids, val_ids = corpus.ids[: n - n_val], (corpus.ids[n - n_val :] if n_val else None)
        t = self.config["train"]
        need = t["batch_size"] * t["seq_length"] + 1
        if len(train_ids) < need:
            raise CorpusError(
                f"training text of {name} has {len(train_ids)} characters; batch_size x seq_length + 1 = "
                f"{need} are needed (use a longer text or a smaller batch_size/seq_length)"
            )
        if val_ids is not None and len(val_ids) < t["seq_length"] + 1:
            raise CorpusError(
                f"validation split of {name} has {len(val_ids)} characters; seq_length + 1 = "
                f"{t['seq_length'] + 1} are needed (raise corpus.val_fraction or set it to 0)"
            )
        return corpus, train_ids, val_ids

    def train(self, stderr: TextIO) -> tuple[Model, Corpus, TrainResult]:
        corpus, train_ids, val_ids = self.load_corpus()
        if "generate" in self.config["stages"]:
            corpus.encode(self.config["generate"]["seed_text"])  # fail before training, not after
        t = self.config["train"]
        model = self.model(len(corpus.vocab))
        optimizer = self.build("optimizer", self.config["optimizer"])
        schedule = self.build("schedule", self.config["schedule"])
        if getattr(schedule, "constant", False):
            schedule = None  # a factor of 1 throughout: nothing to do per step
        elif not isinstance(getattr(optimizer, "lr", None), (int, float)):
            raise ConfigError(
                f"schedule {self.config['schedule']['type']!r} needs an optimizer with an `lr` attribute; "
                f"optimizer {self.config['optimizer']['type']!r} has none"
            )
        try:
            if schedule is not None:
                schedule(0, t["steps"])  # a schedule that cannot work with these settings says so now
        except (ValueError, TypeError) as exc:
            raise ConfigError(
                f"{self.locate('schedule')} ({self.config['schedule']['type']}): {exc}"
            ) from None
        sampler = self.sampler(corpus.vocab)
        digest = _sha256(train_ids)
        corpus_meta = {
            "source": corpus.source,
            "chars": int(len(corpus.ids)),
            "train_chars": int(len(train_ids)),
            "val_chars": int(0 if val_ids is None else len(val_ids)),
            "train_sha256": digest,
        }
        progress = Progress()
        if t["init_from"] and t["resume"]:
            raise ConfigError(
                "train.init_from and train.resume exclude each other: resume continues a run exactly, "
                "init_from starts a new one from a checkpoint's weights"
            )
        if t["init_from"]:
            self._init_from(t["init_from"], model, corpus)
        if t["resume"]:
            progress = self._resume(t["resume"], model, optimizer, corpus, corpus_meta)
        started = time.time()

        def save(p: Progress, extra: dict[str, Any], path: str) -> None:
            meta = {
                "format": ckpt_io.FORMAT,
                "format_version": ckpt_io.FORMAT_VERSION,
                "charrnn_version": _version(),
                "config": self.config,
                "vocab": corpus.vocab,
                "encoding": corpus.encoding,
                "step": p.step,
                "data_position": p.position,
                "smooth_loss": p.smooth_loss,
                "rng": p.rng_state,
                "best_val_loss": p.best_val,
                "bad_evals": p.bad_evals,
                "corpus": corpus_meta,
                "saved_at": time.time(),
                "elapsed_seconds": time.time() - started,
                **extra,
            }
            ckpt_io.save(
                path,
                ckpt_io.Checkpoint(
                    params=model.params,
                    meta=_jsonable(meta),
                    optim=optimizer.state_dict(),
                    state=p.state or {},
                ),
            )
            self.pm.hook.charrnn_checkpoint_saved(path=path, step=p.step)

        settings = TrainSettings(
            steps=t["steps"],
            batch_size=t["batch_size"],
            seq_length=t["seq_length"],
            sample_every=t["sample_every"],
            sample_length=t["sample_length"],
            save_every=t["save_every"],
            checkpoint=t["checkpoint"],
            seed=self.config["seed"],
            eval_every=t["eval_every"],
            patience=t["patience"],
            best_checkpoint=sibling(t["checkpoint"], ".best.npz")
            if t["keep_best"] and val_ids is not None
            else None,
            metrics_path=sibling(t["checkpoint"], ".metrics.jsonl") if t["metrics"] else None,
        )
        trainer = Trainer(
            model,
            optimizer,
            sampler,
            corpus,
            train_ids,
            val_ids,
            settings,
            save,
            report=lambda step, metrics: self.pm.hook.charrnn_train_report(step=step, metrics=metrics),
            stderr=stderr,
            schedule=schedule,
        )
        return model, corpus, trainer.run(progress)

    def _init_from(self, path: str, model: Model, corpus: Corpus) -> None:
        """Start from a checkpoint's weights (fine-tuning); optimizer and step start afresh."""
        saved = ckpt_io.load(path)
        if saved.meta["vocab"] != corpus.vocab or saved.meta.get("encoding", "utf-8") != corpus.encoding:
            old, new = set(saved.meta["vocab"]), set(corpus.vocab)
            extra = "".join(sorted(new - old))[:20]
            raise CheckpointError(
                f"train.init_from: the vocabulary of {path} ({len(old)} symbols) differs from the corpus's "
                f"({len(new)} symbols"
                + (f"; new: {extra!r}" if extra else "")
                + "); fine-tuning needs the same vocabulary "
                "(use encoding: bytes for both to share one)"
            )
        old_model = saved.meta["config"]["model"]
        if old_model.get("type") != self.config["model"]["type"]:
            raise CheckpointError(
                f"train.init_from: {path} holds a {old_model.get('type')!r} model, the pipeline builds {self.config['model']['type']!r}"
            )
        load_params(model, saved, path)

    def _resume(
        self, resume: bool | str, model: Model, optimizer: Any, corpus: Corpus, corpus_meta: dict[str, Any]
    ) -> Progress:
        t = self.config["train"]
        path = t["checkpoint"] if resume is True else resume
        if not Path(path).exists():
            raise CheckpointError(f"train.resume: no checkpoint to resume from at {path}")
        saved = ckpt_io.load(path)
        old = saved.meta["config"]
        if t["steps"] is not None and t["steps"] <= saved.meta["step"]:
            raise ConfigError(
                f"train.steps ({t['steps']}) must be beyond the checkpoint's step ({saved.meta['step']}) to resume"
            )
        for section, keys in (("model", None), ("train", ("batch_size", "seq_length"))):
            for key in keys or sorted(set(old[section]) | set(self.config[section])):
                a, b = old[section].get(key), self.config[section].get(key)
                if a != b:
                    raise CheckpointError(
                        f"cannot resume: {section}.{key} is {b!r} but the checkpoint {path} was trained with {a!r}"
                    )
        if old["optimizer"]["type"] != self.config["optimizer"]["type"]:
            raise CheckpointError(
                f"cannot resume: optimizer.type is {self.config['optimizer']['type']!r} but the checkpoint "
                f"{path} used {old['optimizer']['type']!r}"
            )
        if saved.meta["vocab"] != corpus.vocab or saved.meta.get("encoding", "utf-8") != corpus.encoding:
            raise CheckpointError(
                f"cannot resume: the corpus vocabulary differs from the checkpoint {path}'s"
            )
        if saved.meta.get("corpus", {}).get("train_sha256") != corpus_meta["train_sha256"]:
            raise CheckpointError(
                f"cannot resume: the training text differs from the one checkpoint {path} used"
            )
        load_params(model, saved, path)
        optimizer.load_state_dict(saved.optim)
        meta = saved.meta
        return Progress(
            meta["step"],
            meta["data_position"],
            meta["smooth_loss"],
            meta["rng"],
            saved.state,
            meta.get("best_val_loss"),
            meta.get("bad_evals", 0),
        )

    def generate(
        self, model: Model, vocab: Corpus, on_text: Callable[[str], None] | None = None
    ) -> list[str]:
        """The generate stage's samples; with `stream: true`, the first is also fed to `on_text`."""
        g = self.config["generate"]
        rng = np.random.default_rng([self.config["seed"], 2])
        return generate(
            model,
            self.sampler(vocab.vocab),
            vocab,
            rng,
            g["seed_text"],
            g["num_chars"],
            num_samples=g["num_samples"],
            stop=g["stop"],
            on_text=on_text if g["stream"] else None,
        )

    def run(self, stdout: TextIO | None = None, stderr: TextIO | None = None) -> RunResult:
        """Run the stages in order; generated text is written to `stdout` when given."""
        stderr = stderr if stderr is not None else sys.stderr
        result = RunResult(self.config)
        model: Model | None = None
        vocab: Corpus | None = None
        for stage in self.config["stages"]:
            if stage == "train":
                model, corpus, result.train = self.train(stderr)
                vocab, result.checkpoint = corpus, self.config["train"]["checkpoint"]
            elif stage == "evaluate":
                if model is None or vocab is None:
                    model, vocab = self.load_model(
                        self.config["evaluate"]["checkpoint"] or self.config["train"]["checkpoint"]
                    )
                result.evaluation = self.evaluate(model, vocab)
                if stdout is not None:
                    write_text(stdout, format_evaluation(result.evaluation) + "\n")
            elif stage == "generate":
                if model is None or vocab is None:
                    path = self.config["generate"]["checkpoint"] or self.config["train"]["checkpoint"]
                    model, vocab = self.load_model(path)
                streamed = stdout is not None and self.config["generate"]["stream"]
                texts = self.generate(model, vocab, (lambda t: write_text(stdout, t)) if streamed else None)
                result.texts, result.text = texts, self.config["generate"]["separator"].join(texts)
                if stdout is not None:
                    rest = result.text[len(texts[0]) :] if streamed else result.text
                    write_text(stdout, rest + "\n")
        return result

    def evaluate(self, model: Model, vocab: Corpus) -> dict[str, Any]:
        """Loss on `evaluate.path` (default: the validation split) beside n-gram baselines.

        The unigram and bigram baselines are add-one smoothed counts over the training text,
        so a model's loss can be read against what counting characters alone achieves.
        """
        corpus, train_ids, val_ids = self.load_corpus()
        if corpus.vocab != vocab.vocab or corpus.encoding != vocab.encoding:
            raise CorpusError(
                "evaluate: the corpus vocabulary differs from the model's; use the corpus it was trained on"
            )
        path = self.config["evaluate"]["path"]
        if path is not None:
            # read as the loaders read: BOM dropped, bytes kept as bytes, a FIFO refused unopened
            ids, source = encode_file(path, vocab.vocab, vocab.encoding, what="evaluate.path"), path
        elif val_ids is not None:
            ids, source = val_ids, "validation split"
        else:
            raise ConfigError(
                "evaluate: set evaluate.path or corpus.val_fraction > 0 (there is no validation split)"
            )
        T = self.config["train"]["seq_length"]
        if len(ids) < T + 1:
            raise CorpusError(
                f"evaluate: {source} has {len(ids)} characters; seq_length + 1 = {T + 1} are needed"
            )
        loss = evaluate_loss(model, np.asarray(ids), max(self.config["train"]["batch_size"], EVAL_STREAMS), T)
        unigram, bigram = ngram_baselines(train_ids, np.asarray(ids), len(vocab.vocab))
        return {"source": source, "chars": int(len(ids)), "loss": loss, "unigram": unigram, "bigram": bigram}

    def load_model(self, path: str, saved: ckpt_io.Checkpoint | None = None) -> tuple[Model, Corpus]:
        """A model rebuilt from a checkpoint with this pipeline's plugins (not the ones it names)."""
        saved = saved or ckpt_io.load(path)
        section = saved.meta["config"]["model"]
        name = section.get("type")
        if name not in self.registry.components["model"]:
            raise CheckpointError(
                f"checkpoint {path} needs model {name!r}, which no loaded plugin provides; install its plugin "
                f"or name it with --plugin (available: {', '.join(sorted(self.registry.components['model']))})"
            )
        model = self.build(
            "model", section, vocab_size=len(saved.meta["vocab"]), rng=np.random.default_rng(0)
        )
        load_params(model, saved, path)
        vocab = Corpus(
            np.zeros(0, np.uint8), list(saved.meta["vocab"]), path, saved.meta.get("encoding", "utf-8")
        )
        return model, vocab


def ngram_baselines(train_ids: np.ndarray, ids: np.ndarray, V: int) -> tuple[float, float]:
    """Mean loss in nats/char of add-one smoothed unigram and bigram models fit on `train_ids`."""
    train = np.asarray(train_ids, dtype=np.int64)
    ids = np.asarray(ids, dtype=np.int64)
    uni = np.bincount(train, minlength=V) + 1.0
    uni_loss = float(-np.log(uni[ids] / uni.sum()).mean())
    pairs = np.bincount(train[:-1] * V + train[1:], minlength=V * V).reshape(V, V) + 1.0
    cond = pairs / pairs.sum(axis=1, keepdims=True)  # (V, V): P(next | current)
    bi_loss = float(-np.log(cond[ids[:-1], ids[1:]]).mean())
    return uni_loss, bi_loss


def format_evaluation(e: dict[str, Any]) -> str:
    ln2 = np.log(2)
    rows = [("model", e["loss"]), ("unigram baseline", e["unigram"]), ("bigram baseline", e["bigram"])]
    lines = [f"evaluation on {e['source']} ({e['chars']:,} characters); baselines fit on the training text"]
    lines += [f"{name:<17} {loss:.4f} nats/char  {loss / ln2:.3f} bits/char" for name, loss in rows]
    return "\n".join(lines)


def sibling(checkpoint: str, suffix: str) -> str:
    """`runs/x/model.npz` -> `runs/x/model<suffix>`: files that belong with a checkpoint."""
    path = Path(checkpoint)
    return str(
        path.with_name(path.stem + suffix) if path.suffix == ".npz" else path.with_name(path.name + suffix)
    )


def load_params(model: Model, saved: ckpt_io.Checkpoint, path: str | Path) -> None:
    """Copy checkpoint arrays into the model's own arrays (shapes and names must agree)."""
    if set(saved.params) != set(model.params):
        raise CheckpointError(
            f"checkpoint {path} has parameters {sorted(saved.params)}, the model expects {sorted(model.params)}"
        )
    for name, value in saved.params.items():
        if value.shape != model.params[name].shape:
            raise CheckpointError(
                f"checkpoint {path}: parameter {name} has shape {value.shape}, expected {model.params[name].shape}"
            )
        model.params[name][...] = value


def write_text(stream: TextIO, text: str) -> None:
    """Write UTF-8 whatever the locale, when the stream has a byte buffer."""
    buffer = getattr(stream, "buffer", None)
    if buffer is not None:
        stream.flush()
        buffer.write(text.encode("utf-8"))
        buffer.flush()
    else:
        stream.write(text)
        stream.flush()


def _sha256(ids: np.ndarray, chunk: int = 1 << 24) -> str:
    """Digest of the ids, read in slices so a memory-mapped corpus is never copied whole."""
    h = hashlib.sha256(str(ids.dtype).encode())
    for i in range(0, len(ids), chunk):
        h.update(np.ascontiguousarray(ids[i : i + chunk]))
    return h.hexdigest()


def _version() -> str:
    from charrnn import __version__

    return __version__


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def run_pipeline(
    config: str | Path | Mapping[str, Any],
    *,
    plugins: Iterable[object] = (),
    overrides: Iterable[str] | Mapping[str, Any] | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> RunResult:
    """Run a pipeline from a YAML path or a dict; `overrides` are `KEY.PATH=VALUE` items.

    Generated text is returned in `RunResult.text` (and written to `stdout` if given);
    progress and reports go to `stderr` (default: `sys.stderr`).
    """
    return Pipeline(config, plugins=plugins, overrides=overrides).run(stdout=stdout, stderr=stderr)


def generate_samples(
    checkpoint_path: str | Path,
    num_chars: int | None = None,
    seed_text: str | None = None,
    *,
    sampler: str | Mapping[str, Any] | None = None,
    temperature: float | None = None,
    sampler_options: Mapping[str, Any] | None = None,
    seed: int | None = None,
    num_samples: int | None = None,
    stop: Iterable[str] | None = None,
    on_text: Callable[[str], None] | None = None,
    plugins: Iterable[object] = (),
) -> RunResult:
    """Generate from a checkpoint. `None` for an argument means the value saved in the checkpoint.

    `sampler` is a name or a `{type: ..., option: ...}` mapping; a name other than the saved
    one starts from that sampler's defaults; `temperature` and `sampler_options` then set
    options. `on_text` receives the first sample as it is produced (streaming). The result
    has every sample in `texts` and them joined by `generate.separator` in `text`.
    """
    saved = ckpt_io.load(checkpoint_path)
    saved_cfg = saved.meta["config"]
    overrides: dict[str, Any] = {"stages": ["generate"], "generate.checkpoint": str(checkpoint_path)}
    for key, value in (("num_chars", num_chars), ("seed_text", seed_text), ("num_samples", num_samples)):
        if value is not None:
            overrides[f"generate.{key}"] = value
    if stop is not None:
        overrides["generate.stop"] = list(stop)
    overrides["generate.stream"] = on_text is not None
    if seed is not None:
        overrides["seed"] = seed
    section = dict(saved_cfg.get("sampler", {"type": "temperature"}))
    if isinstance(sampler, str) and sampler != section.get("type"):
        section = {"type": sampler}
    elif isinstance(sampler, Mapping):
        section = dict(sampler)
    if temperature is not None:
        section["temperature"] = temperature
    section.update(sampler_options or {})
    overrides["sampler"] = section
    base = {k: saved_cfg[k] for k in ("seed", "generate", "model") if k in saved_cfg}
    # `plugins` is left out on purpose: generation never imports a module because a checkpoint names it
    pipeline = Pipeline(base, plugins=plugins, overrides=overrides)
    model, vocab = pipeline.load_model(str(checkpoint_path), saved)
    texts = pipeline.generate(model, vocab, on_text)
    return RunResult(pipeline.config, pipeline.config["generate"]["separator"].join(texts), texts)


def generate_text(
    checkpoint_path: str | Path, num_chars: int | None = 1000, seed_text: str | None = "The ", **options: Any
) -> str:
    """The classic `generate.py`: text from a checkpoint (see `generate_samples` for the options)."""
    return generate_samples(checkpoint_path, num_chars, seed_text, **options).text or ""
