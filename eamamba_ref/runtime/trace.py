"""Recording named intermediate activations of a forward pass (the oracle's probe).

`recording()` watches the boundaries of `reference.hooks` with a `Recorder`, which keeps a float32
host copy of every value reported, under its full name (scope prefixes joined by dots). Nothing
in the computation changes while recording: recording only copies values.
"""
from __future__ import annotations

import contextlib

import numpy as np

from eamamba_ref.reference.hooks import Part, watching

__all__ = ["Recorder", "recording"]


def _host(value):
    """A float32 NumPy copy of an array or of a GPU DeviceTensor."""
    if hasattr(value, "to_host"):
        value = value.to_host()
    return np.array(value, dtype=np.float32, copy=True)


class Recorder:
    """Activations in recording order: name -> float32 copy."""

    def __init__(self):
        self.values = {}
        self.prefix = []
        self.rows = None            # (first row, full height) inside `row_strip`

    def full_name(self, name):
        return ".".join(self.prefix + [name]) if name else ".".join(self.prefix)

    def add(self, name, value):
        """Store `value` (an array or a `Part`) under the current scope + `name`."""
        full = self.full_name(name)
        if not isinstance(value, Part) and self.rows is not None and np.ndim(value) == 4:
            r0, height = self.rows      # a row strip (B, C, h, W) of a (B, C, height, W) map
            shape = tuple(value.shape)
            value = Part(value, (slice(None), slice(None), slice(r0, r0 + shape[2])),
                         shape[:2] + (height,) + shape[3:])
        if isinstance(value, Part):
            whole = self.values.get(full)
            if whole is None or whole.shape != tuple(value.shape):
                whole = self.values[full] = np.full(value.shape, np.nan, np.float32)
            whole[value.where] = _host(value.value)
        else:
            self.values[full] = _host(value)


@contextlib.contextmanager
def recording():
    """Record every named activation inside; yields the Recorder."""
    with watching(Recorder()) as rec:
        yield rec
