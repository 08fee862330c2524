"""Exceptions the agent raises for bad input, settings and data."""


class TdnError(Exception):
    """Base class: an error the CLI reports as one line and exit code 1."""


class DataError(TdnError):
    """A dataset folder, image or annotation is missing, unreadable or malformed."""


class ModelError(TdnError):
    """The model file or its card is missing, unreadable or inconsistent."""


class ConfigError(TdnError):
    """A setting is invalid."""


class BackendError(TdnError):
    """An inference backend cannot be loaded or does not fit the settings."""
