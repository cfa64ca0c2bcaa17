"""User-facing errors: the CLI prints their message on one line and exits with status 2."""

from __future__ import annotations


class CharrnnError(Exception):
    """A problem with the user's input (config, data, checkpoint, plugin), not a bug."""


class ConfigError(CharrnnError):
    """The pipeline configuration is malformed, misspelled or out of range."""


class PluginError(CharrnnError):
    """A plugin failed to load, or a component name is unknown or registered twice."""


class CorpusError(CharrnnError):
    """The corpus is missing, unreadable, empty or too short for the configuration."""


class CheckpointError(CharrnnError):
    """A checkpoint is missing, corrupt, unsafe or does not match the run."""


class TrainingError(CharrnnError):
    """Training cannot go on (e.g. the loss became NaN); the last good checkpoint is kept."""


class PluginFailure(Exception):
    """Code inside a plugin raised, or returned something unusable: a bug in that plugin.

    Deliberately not a `CharrnnError`: the user's input is fine, so the CLI exits with
    status 1, naming the plugin (`label`) and its exception (`error`, also the `__cause__`).
    """

    def __init__(self, label: str, error: BaseException | str) -> None:
        self.label, self.error = label, error
        detail = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else error
        super().__init__(f"{label} failed: {detail}")
