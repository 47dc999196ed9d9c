"""Recording named intermediate activations of a forward pass (the oracle's probe).

Tracing sits at function boundaries: the forward-pass functions carry the `traced` decorator,
which, while a `recording()` is active, stores what the function returned under a name (the
official module name: `conv(p, "project_in", x)` records `project_in`) and prefixes what is
recorded inside the call with a scope (`named_block(p, "encoder_level1.0", ...)` makes its MHSSM's
`out_proj` `encoder_level1.0.mamba.out_proj`). Nothing in the computation changes while
recording: the same functions and kernels run on the same data; recording only copies values.

Where a fused kernel never materialises a stage (the depthwise conv before its SiLU, dt_proj,
the LayerNorm before its gate), the decorator's `before` / `after` hooks compute that stage from
the function's inputs or outputs, only while recording. Stages that a function computes in a
different layout (pixel-major, row-major instead of scan order) are stored in the trace layout
through `view`, and stages computed in pieces (row strips, the two halves of in_proj) as `Part`s
of one array. Outside `recording()`, a traced function costs one context-variable lookup.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
from typing import NamedTuple

import numpy as np

_recorder = contextvars.ContextVar("eamamba_trace", default=None)


class Part(NamedTuple):
    """A piece of a named activation computed in pieces: `value` goes to `where` in an array of
    `shape` (the parts not yet recorded read NaN, so a missing piece shows in a comparison)."""
    value: object
    where: tuple
    shape: tuple


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
def row_strip(first_row, height):
    """Inside: 4-D values recorded are rows `first_row...` of a map `height` rows high (a function
    computed strip by strip records the whole map, assembled from the strips it really computed)."""
    rec = _recorder.get()
    if rec is None:
        yield
        return
    saved, rec.rows = rec.rows, (first_row, height)
    try:
        yield
    finally:
        rec.rows = saved


@contextlib.contextmanager
def recording():
    """Record every named activation inside; yields the Recorder."""
    rec = Recorder()
    token = _recorder.set(rec)
    try:
        yield rec
    finally:
        _recorder.reset(token)


def traced(name=None, *, scope=None, view=None, before=None, after=None):
    """Decorator: while recording, store what the decorated function computes.

    name    the name of its result: a string, a tuple of strings (aliases: the same value under
            several official names), or a function of the call's arguments (a dict, parameter
            name -> value) giving either -- e.g. `lambda a: a["name"]` for conv's module name;
    scope   a prefix for the names recorded inside the call (a string or a function of the
            arguments, as for name): the sub-module the function is;
    view    result -> what to store under `name` when the trace layout differs from the
            function's (a transpose, a `Part`); run only while recording;
    before  arguments -> {name: value}: stages computed from the inputs before the call (for an
            input the function overwrites, or a stage a fused kernel never materialises);
    after   (arguments, result) -> {name: value}: stages read back from the inputs and the result.

    Recording order: `before`, what the call records inside, `after`, then `name`.
    """
    def decorate(fn):
        signature = inspect.signature(fn)

        def resolve(spec, arguments):
            spec = spec(arguments) if callable(spec) else spec
            return (spec,) if isinstance(spec, str) else tuple(spec or ())

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            rec = _recorder.get()
            if rec is None:
                return fn(*args, **kwargs)
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            arguments = bound.arguments
            for stage, value in (before(arguments) if before else {}).items():
                rec.add(stage, value)
            prefix = resolve(scope, arguments)
            rec.prefix.extend(prefix)
            try:
                result = fn(*args, **kwargs)
            finally:
                del rec.prefix[len(rec.prefix) - len(prefix):]
            for stage, value in (after(arguments, result) if after else {}).items():
                rec.add(stage, value)
            names = resolve(name, arguments)
            if names:
                stored = view(result) if view else result
                for n in names:
                    rec.add(n, stored)
            return result
        return wrapper
    return decorate
