"""Function boundaries an observer can watch: how a trace of the forward pass is taken.

The forward-pass functions carry the `traced` decorator, which names what they compute after
the official module (`conv(p, "project_in", x)` is `project_in`) and, for a sub-module, the scope
of what is computed inside (`named_block(p, "encoder_level1.0", ...)` makes its MHSSM's
`out_proj` `encoder_level1.0.mamba.out_proj`). While nothing watches, a boundary costs one
context-variable lookup and changes nothing. Inside `watching(observer)` (the runtime's
`trace.recording()` brings the observer that stores copies), each boundary reports its results
by name: the same functions and kernels run on the same data.

A fused kernel that never materialises a stage (the depthwise conv before its SiLU, dt_proj,
the LayerNorm before its gate) reports it through the decorator's `before` / `after` functions,
which compute it from the inputs or outputs only while watched. Stages computed in another layout
(pixel-major, scan order) are reported through `view`, and stages computed in pieces (row strips,
the two halves of in_proj) as `Part`s of one array.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
from typing import NamedTuple

_recorder = contextvars.ContextVar("eamamba_trace", default=None)


class Part(NamedTuple):
    """A piece of a named activation computed in pieces: `value` goes to `where` in an array of
    `shape` (the parts not yet recorded read NaN, so a missing piece shows in a comparison)."""
    value: object
    where: tuple
    shape: tuple


def is_recording():
    """True while an observer watches (inside `watching`)."""
    return _recorder.get() is not None


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
def watching(observer):
    """Inside: the boundaries report to `observer` (runtime.trace's Recorder: `add(name, value)`,
    and the `prefix` list and `rows` it keeps for `scope` and `row_strip`). Yields the observer."""
    token = _recorder.set(observer)
    try:
        yield observer
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
