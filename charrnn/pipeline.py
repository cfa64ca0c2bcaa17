"""A pipeline: an assembly whose stages (`train`, `evaluate`, `generate`) run in order.

`run_pipeline` is the API beneath `charrnn run`; `generate_text` and `generate_samples`
beneath `charrnn generate`. Each stage is a thin caller: `charrnn.training` (prepare, start, run),
`charrnn.evaluation`, `charrnn.loaded.LoadedModel.generate`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from charrnn import training
from charrnn.assembly import Assembly
from charrnn.data import Data, load_corpus
from charrnn.engine import held_text_bytes
from charrnn.errors import ConfigError, CorpusError
from charrnn.evaluation import EVAL_STREAMS, evaluate, format_evaluation, ngram_baselines
from charrnn.interrupts import Interrupts
from charrnn.loaded import Generation, LoadedModel
from charrnn.loop import TrainResult
from charrnn.memory import check as check_memory
from charrnn.textfile import encode_file
from charrnn.world import LocalWorld, World, together


@dataclass
class RunResult:
    """What `run_pipeline` hands back."""

    config: dict[str, Any]
    text: str | None = None  # the samples joined by generate.separator
    texts: list[str] = field(default_factory=list)
    evaluation: dict[str, Any] | None = None
    checkpoint: str | None = None
    train: TrainResult | None = None


class Pipeline(Assembly):
    """An assembly (validated configuration, plugins, components) and the stages it runs."""

    _data: tuple[str, Data] | None = None

    def data(self) -> Data:
        """The corpus, loaded once per corpus section (`train` then `evaluate` read it once)."""
        key = repr(sorted(self.config["corpus"].items()))
        if self._data is None or self._data[0] != key:
            t = self.config["train"]
            fine_tune = "train" in self.config["stages"] and t["init_from"] and not t["resume"]
            self._data = (key, load_corpus(self, vocab_of=t["init_from"] if fine_tune else None))
        return self._data[1]

    def train(
        self,
        stderr: TextIO | None = None,
        *,
        world: World | None = None,
        interrupts: Interrupts | None = None,
        choose_threads: bool = True,
    ) -> tuple[LoadedModel, TrainResult]:
        """The train stage: the trained model (ready to generate) and what training reported.

        `choose_threads=False` keeps BLAS on its thread count (no `ThreadChooser`): a benchmark
        measures the machine at a fixed count.
        """
        world = world or LocalWorld()
        with together(world):  # a failure on any rank ends every rank here, with its message
            if world.rank == 0:  # before the slow parts: the file rank 0 will write
                training.check_output(self.config["train"]["checkpoint"], "train.checkpoint")
            data = self.data()
            g, t = self.config["generate"], self.config["train"]
            if (
                "generate" in self.config["stages"]
            ):  # what the later stage would refuse, refused before training
                data.corpus.encode(g["seed_text"])
                check_memory(
                    held_text_bytes(data.corpus, g["num_chars"], g["num_samples"]),
                    f"generate.num_chars={g['num_chars']}"
                    + (f" with num_samples={g['num_samples']}" if g["num_samples"] > 1 else ""),
                    "the generated text",
                    "; ask for fewer characters",
                )
            if t["sample_every"] and t["sample_length"]:
                check_memory(
                    held_text_bytes(data.corpus, t["sample_length"], 1),
                    f"train.sample_length={t['sample_length']}",
                    "each training-time sample",
                )
            loop, saved = training.prepare(
                self, data, world=world, interrupts=interrupts, stderr=stderr, choose_threads=choose_threads
            )
        result = training.run(loop, training.start(loop, self, data, saved))
        return LoadedModel(loop.model, data.corpus, self, self.config["train"]["checkpoint"]), result

    def load(self, path: str) -> LoadedModel:
        """A checkpoint's model rebuilt with this pipeline's plugins, generating with its settings."""
        return LoadedModel.from_path(path, self)

    def run(
        self,
        stdout: TextIO | None = None,
        stderr: TextIO | None = None,
        *,
        world: World | None = None,
        interrupts: Interrupts | None = None,
    ) -> RunResult:
        """Run the stages in order; generated text is written to `stdout` when given (rank 0 only)."""
        stderr = stderr if stderr is not None else sys.stderr
        lead = world is None or world.rank == 0
        stdout = stdout if lead else None
        result = RunResult(self.config)
        loaded: LoadedModel | None = None
        for stage in self.config["stages"]:
            if stage == "train":
                loaded, result.train = self.train(stderr, world=world, interrupts=interrupts)
                result.checkpoint = self.config["train"]["checkpoint"]
                if not lead:
                    return result  # evaluation and generation are rank 0's
            elif stage == "evaluate":
                if not lead:
                    continue
                loaded = loaded or self.load(
                    self.config["evaluate"]["checkpoint"] or self.config["train"]["checkpoint"]
                )
                result.evaluation = self.evaluate(loaded)
                if stdout is not None:
                    write_text(stdout, format_evaluation(result.evaluation) + "\n")
            elif stage == "generate":
                if not lead:
                    continue
                loaded = loaded or self.load(
                    self.config["generate"]["checkpoint"] or self.config["train"]["checkpoint"]
                )
                streamed = stdout is not None and self.config["generate"]["stream"]
                on_text = (lambda t: write_text(stdout, t)) if streamed else None
                generation = loaded.generate(on_text=on_text)
                result.texts, result.text = list(generation), generation.text
                if stdout is not None:
                    rest = result.text[len(result.texts[0]) :] if streamed else result.text
                    write_text(stdout, rest + "\n")
        return result

    def evaluate(self, loaded: LoadedModel) -> dict[str, Any]:
        """Loss on `evaluate.path` (default: the validation split) beside n-gram baselines.

        The unigram and bigram baselines are add-one smoothed counts over the training text,
        so a model's loss can be read against what counting characters alone achieves.
        """
        data = self.data()
        vocab = loaded.vocab
        if data.corpus.vocab != vocab.vocab or data.corpus.encoding != vocab.encoding:
            raise CorpusError(
                "evaluate: the corpus vocabulary differs from the model's; use the corpus it was trained on"
            )
        path = self.config["evaluate"]["path"]
        if path is not None:
            # read as the loaders read: BOM dropped, bytes kept as bytes, a FIFO refused unopened
            ids, source = encode_file(path, vocab.vocab, vocab.encoding, what="evaluate.path"), path
        elif data.val_ids is not None:
            ids, source = data.val_ids, "validation split"
        else:
            raise ConfigError(
                "evaluate: set evaluate.path or corpus.val_fraction > 0 (there is no validation split)"
            )
        T = self.config["train"]["seq_length"]
        if len(ids) < T + 1:
            raise CorpusError(
                f"evaluate: {source} has {len(ids)} characters; seq_length + 1 = {T + 1} are needed"
            )
        B = max(self.config["train"]["batch_size"], EVAL_STREAMS)
        loss = evaluate(loaded.model, np.asarray(ids), B, T)
        unigram, bigram = ngram_baselines(data.train_ids, np.asarray(ids), len(vocab.vocab))
        return {"source": source, "chars": int(len(ids)), "loss": loss, "unigram": unigram, "bigram": bigram}


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


def run_pipeline(
    config: str | Path | Mapping[str, Any],
    *,
    plugins: Iterable[object] = (),
    overrides: Iterable[str] | Mapping[str, Any] | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    interrupts: Interrupts | None = None,
) -> RunResult:
    """Run a pipeline from a YAML path or a dict; `overrides` are `KEY.PATH=VALUE` items.

    Generated text is returned in `RunResult.text` (and written to `stdout` if given);
    progress and reports go to `stderr` (default: `sys.stderr`). `interrupts` decides what
    Ctrl+C means during training (default: stop after the step, save, go on; see
    `charrnn.interrupts`).
    """
    pipeline = Pipeline(config, plugins=plugins, overrides=overrides)
    return pipeline.run(stdout=stdout, stderr=stderr, interrupts=interrupts)


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
    labels: Mapping[str, str] | None = None,
) -> Generation:
    """Generate from a checkpoint. `None` for an argument means the value saved in the checkpoint.

    `sampler` is a name or a `{type: ..., option: ...}` mapping; a name other than the saved
    one starts from that sampler's defaults; `temperature` and `sampler_options` then set
    options. `on_text` receives the first sample as it is produced (streaming). The result is
    the sequence of samples; its `text` joins them with `generate.separator`. `labels` name the
    arguments in the caller's words (`charrnn generate` passes its flags).
    """
    options = dict(sampler_options or {})
    if temperature is not None:
        options["temperature"] = temperature
    loaded = LoadedModel.load(checkpoint_path, plugins=plugins, labels={"plugins": "--plugin"})
    return loaded.generate(  # type: ignore[return-value]
        seed_text,
        num_chars,
        sampler=sampler,
        seed=seed,
        num_samples=num_samples,
        stop=stop,
        on_text=on_text,
        labels=labels,
        **options,
    )


def generate_text(
    checkpoint_path: str | Path, num_chars: int | None = 1000, seed_text: str | None = "The ", **options: Any
) -> str:
    """The classic `generate.py`: text from a checkpoint (see `generate_samples` for the options)."""
    return generate_samples(checkpoint_path, num_chars, seed_text, **options).text
