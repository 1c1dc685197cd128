"""Typed errors a user can act on; each message names the offending key and value."""


class FedemError(Exception):
    """Base class of every error fedem-flwr raises on purpose."""


class ConfigError(FedemError, ValueError):
    """A configuration value is missing, unknown or out of range."""


class ModelNotFound(FedemError):
    """A model name, folder or repo id does not resolve to a model."""


class UnsafeLoraTarget(ConfigError):
    """A LoRA target would be bypassed or refused on some execution path."""


class InvalidAdapter(FedemError, ValueError):
    """A received or stored adapter fails validation (keys, shapes, dtypes, values, size)."""


class DataError(FedemError):
    """A corpus or data file is missing, malformed or too small."""
