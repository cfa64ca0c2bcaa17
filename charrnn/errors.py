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
