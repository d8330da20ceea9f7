"""The library's exception types; each maps onto an exit code in the command-line tools (2: bad input)."""


class ConfigError(ValueError):
    """A config.json, a config field or an override that cannot describe a supported model."""


class CheckpointFormatError(ValueError):
    """A checkpoint file that is missing, corrupt, or does not fit the model its config describes."""


class InputError(ValueError):
    """An argument the model cannot take: an id outside the vocabulary, a wrong shape, a sequence longer than the
    learned positions, or a decode larger than the machine's memory (glm_jax.inputs checks them on the host)."""


class StorageError(OSError):
    """A path that cannot be read or written: a missing bucket or object, a permission error, or a store that kept
    failing after its retries (glm_jax/storage.py). str() is `PATH: problem`, one line."""

    def __init__(self, problem: str, path: str):
        import errno

        super().__init__(errno.EIO, problem, path)

    def __str__(self):
        return f"{self.filename}: {self.strerror}"
