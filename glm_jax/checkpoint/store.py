"""Reading params one tensor at a time: the `ParamStore` protocol, and `StoreView`, the base of stores that change
what another store reads (a LoRA run read merged, a quantized base read as floats).

A store's `leaves` are its stored paths (per layer, or stacked: glm_jax/checkpoint/layout.py); `read("layers_3/...")`
also works on a stacked store, where it reads index 3 of the stack that holds layer 3 (`locate` says which).
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from glm_jax.checkpoint import layout


class ParamStore(Protocol):
    leaves: dict[str, Any]  # stored path -> metadata with .shape and .dtype
    stacks: tuple[layout.Stack, ...]

    def paths(self) -> list[str]: ...

    def locate(self, path: str) -> tuple[str, int | None]: ...

    def shape(self, path: str) -> tuple: ...

    def dtype(self, path: str) -> np.dtype: ...

    def read(self, path: str) -> np.ndarray: ...

    def read_async(self, path: str): ...  # an object whose .result() is the array (a tensorstore future)

    def read_rows(self, path: str, start: int, stop: int) -> np.ndarray: ...


class Done:
    """A finished read: what a tensorstore future gives back, for values computed here."""

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


class StoreView:
    """A ParamStore over `base` that reads every leaf as `base` does; subclasses override `changes` and
    `transform` (and `leaves`, `shape`, `dtype` where they hide or reshape leaves)."""

    def __init__(self, base: ParamStore):
        self.base = base
        self.leaves = dict(base.leaves)
        self.stacks = base.stacks

    def paths(self) -> list[str]:
        return list(self.leaves)

    def locate(self, path: str) -> tuple[str, int | None]:
        return self.base.locate(path)

    def shape(self, path: str) -> tuple:
        return tuple(self.base.shape(path))

    def dtype(self, path: str) -> np.dtype:
        return self.base.dtype(path)

    def changes(self, path: str) -> bool:
        """Whether this view reads `path` differently from its base."""
        return False

    def transform(self, path: str, a: np.ndarray) -> np.ndarray:
        """The value of `path` given its base value `a` (called only where `changes(path)`)."""
        return a

    def read(self, path: str) -> np.ndarray:
        a = np.asarray(self.base.read(path))
        return self.transform(path, a) if self.changes(path) else a

    def read_async(self, path: str):
        return Done(self.read(path)) if self.changes(path) else self.base.read_async(path)

    def read_rows(self, path: str, start: int, stop: int) -> np.ndarray:
        if self.changes(path):
            return self.read(path)[start:stop]
        return self.base.read_rows(path, start, stop)
