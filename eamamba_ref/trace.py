"""Recording named intermediate activations of a forward pass (the oracle's probe).

The model code calls `record(name, value)` at every named stage and wraps sub-modules in
`scope(name)`, so a value recorded as 'out_proj' inside scope 'encoder_level1.0' and scope
'mamba' is stored as 'encoder_level1.0.mamba.out_proj' -- the official module names, extended
with the MHSSM's internal stages. Outside `recording()`, `record` is a no-op costing one context
variable lookup.
"""
from __future__ import annotations

import contextlib
import contextvars

import numpy as np

_recorder = contextvars.ContextVar("eamamba_trace", default=None)


class Recorder:
    """Activations in recording order: name -> float32 copy."""

    def __init__(self):
        self.values = {}
        self.prefix = []

    def add(self, name, value):
        full = ".".join(self.prefix + [name]) if name else ".".join(self.prefix)
        self.values[full] = np.array(value, dtype=np.float32, copy=True)


def is_recording():
    """True inside `recording()`."""
    return _recorder.get() is not None


def record(name, value):
    """Store `value` under the current scope + `name` if a recording is active. Returns `value`."""
    rec = _recorder.get()
    if rec is not None:
        rec.add(name, value)
    return value


@contextlib.contextmanager
def scope(name):
    """Prefix the names recorded inside with `name.`."""
    rec = _recorder.get()
    if rec is None:
        yield
        return
    rec.prefix.append(name)
    try:
        yield
    finally:
        rec.prefix.pop()


@contextlib.contextmanager
def recording():
    """Record every named activation inside; yields the Recorder."""
    rec = Recorder()
    token = _recorder.set(rec)
    try:
        yield rec
    finally:
        _recorder.reset(token)
