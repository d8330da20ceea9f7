"""The library's exception types; each maps onto an exit code in the command-line tools (2: bad input)."""


class ConfigError(ValueError):
    """A config.json, a config field or an override that cannot describe a supported model."""


class CheckpointFormatError(ValueError):
    """A checkpoint file that is missing, corrupt, or does not fit the model its config describes."""


class InputError(ValueError):
    """An argument the model cannot take: an id outside the vocabulary, a wrong shape, a sequence longer than the
    learned positions, or a decode larger than the machine's memory (glm_jax.inputs checks them on the host)."""
