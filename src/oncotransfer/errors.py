"""User-facing errors: each carries one line that says what was wrong, where, and how to fix it."""


class OncoError(Exception):
    """Base for errors the CLI prints as one line (no traceback)."""


class ConfigError(OncoError):
    """A config key or value is wrong."""


class DataError(OncoError):
    """Input images, folders or manifests are unusable."""


class LeakageError(OncoError):
    """A patient or identical image would sit on both sides of a split."""


class WeightsError(OncoError):
    """Pretrained or checkpoint weights cannot be had or do not fit."""


class CheckpointError(OncoError):
    """A run directory or checkpoint is missing or does not match."""


class MissingExtraError(OncoError):
    """An optional dependency is not installed."""
