"""charrnn: plugin-based character-level text generation in pure NumPy.

The names below are the API: `load` a checkpoint and `generate` from it, `run_pipeline` a YAML
pipeline, `hookimpl` to write a plugin, and the contracts plugins fulfil (`Model`, `Sampler`,
`Optimizer`, `Corpus`, ...). Besides these, plugin authors may import these modules, which keep
their names stable: `charrnn.options` (describing and checking options), `charrnn.hookspecs`
(the hooks), `charrnn.types` (the contracts), `charrnn.errors`, `charrnn.optim` (the common
optimizer options and packed updates), `charrnn.memory` (refusing what cannot fit),
`charrnn.engine` (the generation engine: `Request`, `Batch`, `stepper`), `charrnn.files`
(`atomic_write`, `RunFiles`), `charrnn.metrics`, `charrnn.commands` (`add_set`, `add_plugin`)
and `charrnn.world`. Everything else is charrnn's own and may change.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from charrnn.errors import (
    CharrnnError,
    CheckpointError,
    ConfigError,
    CorpusError,
    PluginError,
    PluginFailure,
    TrainingError,
)

__version__ = "0.1.0"

if TYPE_CHECKING:
    from charrnn.hookspecs import hookimpl
    from charrnn.loaded import Generation, LoadedModel, load
    from charrnn.pipeline import Pipeline, RunResult, generate_samples, generate_text, run_pipeline
    from charrnn.plugins import get_plugin_manager
    from charrnn.types import (
        Corpus,
        ExportLayer,
        ExportNetwork,
        Model,
        Optimizer,
        Sampler,
        StepResult,
        ids_dtype,
    )

#: public name -> its module, imported on first use: `import charrnn.cli` stays free of numpy,
#: so the CLI is already catching Ctrl+C while the heavy modules load
_LAZY = {
    **dict.fromkeys(["hookimpl"], "charrnn.hookspecs"),
    **dict.fromkeys(["Generation", "LoadedModel", "load"], "charrnn.loaded"),
    **dict.fromkeys(
        ["Pipeline", "RunResult", "generate_samples", "generate_text", "run_pipeline"], "charrnn.pipeline"
    ),
    **dict.fromkeys(["get_plugin_manager"], "charrnn.plugins"),
    **dict.fromkeys(
        [
            "Corpus",
            "ExportLayer",
            "ExportNetwork",
            "Model",
            "Optimizer",
            "Sampler",
            "StepResult",
            "ids_dtype",
        ],
        "charrnn.types",
    ),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'charrnn' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


__all__ = [
    "CharrnnError",
    "CheckpointError",
    "ConfigError",
    "Corpus",
    "CorpusError",
    "ExportLayer",
    "ExportNetwork",
    "Generation",
    "LoadedModel",
    "Model",
    "Optimizer",
    "Pipeline",
    "PluginError",
    "PluginFailure",
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
    "load",
    "run_pipeline",
]
