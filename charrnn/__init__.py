"""charrnn: plugin-based character-level text generation in pure NumPy."""

from __future__ import annotations

from charrnn.errors import (
    CharrnnError,
    CheckpointError,
    ConfigError,
    CorpusError,
    PluginError,
    TrainingError,
)
from charrnn.hookspecs import hookimpl
from charrnn.types import Corpus, Model, Optimizer, Sampler, StepResult, ids_dtype

__version__ = "0.1.0"

from charrnn.pipeline import Pipeline, RunResult, generate_samples, generate_text, run_pipeline  # noqa: E402
from charrnn.plugins import get_plugin_manager  # noqa: E402

__all__ = [
    "CharrnnError",
    "CheckpointError",
    "ConfigError",
    "Corpus",
    "CorpusError",
    "Model",
    "Optimizer",
    "Pipeline",
    "PluginError",
    "RunResult",
    "Sampler",
    "StepResult",
    "TrainingError",
    "__version__",
    "generate_samples",
    "generate_text",
    "get_plugin_manager",
    "hookimpl",
    "ids_dtype",
    "run_pipeline",
]
