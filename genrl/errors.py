"""Errors the CLI turns into one line on stderr and a non-zero exit."""


class GenrlError(Exception):
    """Base class of genrl's own errors."""


class ConfigError(GenrlError, ValueError):
    """An invalid or unknown configuration value."""


class CheckpointError(GenrlError):
    """A missing, incomplete, corrupt or foreign checkpoint."""


class NonFiniteLossError(GenrlError):
    """A loss or gradient became NaN/inf; training stopped, earlier checkpoints are intact."""
