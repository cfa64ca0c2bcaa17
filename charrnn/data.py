"""The corpus of a pipeline: loaded once by its loader, split into training and validation ids.

Nothing here depends on training settings: whether the text is long enough for a batch is the
training stage's question.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from charrnn import checkpoint as ckpt_io
from charrnn.assembly import Assembly
from charrnn.errors import CorpusError, PluginFailure
from charrnn.types import Corpus


@dataclass
class Data:
    """A loaded corpus and its split: `train_ids`, and `val_ids` (None without a split)."""

    corpus: Corpus
    train_ids: np.ndarray
    val_ids: np.ndarray | None
    name: str
    _digest: str | None = field(default=None, repr=False)

    @property
    def digest(self) -> str:
        """SHA-256 of the training ids, read in slices so a memory-mapped corpus is never copied."""
        if self._digest is None:
            h = hashlib.sha256(str(self.train_ids.dtype).encode())
            for i in range(0, len(self.train_ids), 1 << 24):
                h.update(np.ascontiguousarray(self.train_ids[i : i + (1 << 24)]))
            self._digest = h.hexdigest()
        return self._digest

    def meta(self) -> dict[str, Any]:
        """What checkpoints record of the corpus (resume checks the digest)."""
        return {
            "source": self.corpus.source,
            "chars": int(len(self.corpus.ids)),
            "train_chars": int(len(self.train_ids)),
            "val_chars": int(0 if self.val_ids is None else len(self.val_ids)),
            "train_sha256": self.digest,
        }


def load_corpus(assembly: Assembly, vocab_of: str | None = None) -> Data:
    """Run the pipeline's corpus loader and split off `corpus.val_fraction` at the end.

    `vocab_of`: a checkpoint whose vocabulary encodes the text (fine-tuning on a text that
    uses a subset of it).
    """
    section = assembly.config["corpus"]
    corpus = assembly.build("corpus")
    if not isinstance(corpus, Corpus):
        raise PluginFailure(
            assembly.label("corpus"), f"returned {type(corpus).__name__}, not a charrnn.Corpus"
        )
    if vocab_of is not None:
        corpus = ckpt_io.vocabulary_for_init(corpus, vocab_of)
    n = len(corpus.ids)
    name = corpus.source or section["type"]
    if n == 0:
        raise CorpusError(f"corpus {name} is empty")
    if len(corpus.vocab) < 2:
        raise CorpusError(
            f"corpus {name} has {len(corpus.vocab)} distinct character(s); at least 2 are needed"
        )
    ids, V = corpus.ids, len(corpus.vocab)
    if ids.dtype.kind not in "iu" or ids.min() < 0 or ids.max() >= V:  # once per corpus, not per batch
        raise PluginFailure(
            assembly.label("corpus"),
            f"returned a Corpus whose ids are not integers in [0, {V}) (its vocabulary's size)",
        )
    n_val = int(n * section["val_fraction"])
    train_ids, val_ids = corpus.ids[: n - n_val], (corpus.ids[n - n_val :] if n_val else None)
    return Data(corpus, train_ids, val_ids, name)
