"""The library's exception types; each maps onto an exit code in the command-line tools (2: bad input)."""


class ConfigError(ValueError):
    """A config.json, a config field or an override that cannot describe a supported model."""


class CheckpointFormatError(ValueError):
    """A checkpoint file that is missing, corrupt, or does not fit the model its config describes."""
