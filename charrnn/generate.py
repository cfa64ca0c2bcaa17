"""`generate`: text from a model and a sampler, one request run to its end by the engine.

k samples are generated at once as k parallel rows of one batched model step (`charrnn.engine`,
which also serves the server's concurrent requests, so both give the same text for a seed). The
engine calls the sampler's optional methods when it has them: `reset(k)` at the start,
`observe(ids)` with every id fed to the model (so a repetition penalty sees the history),
`perturb(...)` to be sampled in bulk, and `search(...)`, to which a sampler that needs the model
itself (beam search) hands the whole generation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from charrnn.engine import Request, run
from charrnn.types import Corpus, Model, Sampler

OnText = Callable[[str], None]


def generate(
    model: Model,
    sampler: Sampler | Callable[[np.ndarray, np.random.Generator], np.ndarray],
    vocab: Corpus,
    rng: np.random.Generator,
    seed_text: str,
    num_chars: int,
    num_samples: int = 1,
    stop: Sequence[str] = (),
    on_text: OnText | None = None,
    chunk_chars: int = 256,
    labels: Mapping[str, str] | None = None,
) -> list[str]:
    """`num_samples` texts, each `seed_text` followed by `num_chars` generated characters.

    A text ends early, just before the first occurrence of any `stop` string in its generated
    part. With `on_text`, the first text is also handed over as it is produced (seed text
    first), in chunks of about `chunk_chars` characters, so streaming costs no speed.

    An exception raised by the model or the sampler, or ids outside [0, V) from the sampler,
    become a `PluginFailure` named by `labels["model"]` / `labels["sampler"]` (the pipeline
    passes `plugin 'p' (sampler 'top_k')`; by default the class or function name is used).
    """
    request = Request(
        seed_text,
        sampler,
        rng,
        num_chars,
        n=num_samples,
        stop=stop,
        labels=dict(labels or {}),
        on_text=(lambda row, text: on_text(text) if row == 0 else None) if on_text is not None else None,
    )
    if on_text is not None:
        on_text(seed_text)
    run([request], model, vocab, chunk=chunk_chars, model_label=(labels or {}).get("model"))
    if request.error is not None:
        raise request.error
    return request.texts
