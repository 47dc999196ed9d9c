"""`brief(x)`: a short, bounded repr of a value read from a file, for one-line error messages.

``repr`` of data from a crafted checkpoint can be arbitrarily long (a 10 MB string), take
exponential time (a tuple nested 100 deep whose halves are the same object) or fail (an int of
5000 digits exceeds Python's int-to-str limit). `brief` shows at most 2 levels, 4 items per
container and 40 characters per string, so it costs O(1) whatever it is given.
"""
from __future__ import annotations

import builtins
import reprlib

__all__ = ["brief", "clip"]


class _Brief(reprlib.Repr):
    def __init__(self):
        super().__init__()
        self.maxlevel = 2
        self.maxtuple = self.maxlist = self.maxarray = self.maxdict = 4
        self.maxset = self.maxfrozenset = self.maxdeque = 4
        self.maxstring = self.maxother = 40

    def repr_int(self, x, level):
        # repr of an int beyond 4300 digits raises; beyond ~30 digits it is noise in a message.
        return builtins.repr(x) if x.bit_length() <= 96 else f"<int of {x.bit_length()} bits>"

    def repr_bytes(self, x, level):
        return builtins.repr(x[:20]) + ("..." if len(x) > 20 else "")

    def repr_instance(self, x, level):
        # Subclasses (OrderedDict) as their base; anything else by type name (its own repr is
        # not bounded), except the few small types whose repr is.
        for base in (dict, list, tuple, set, frozenset, str, bytes, int):
            if isinstance(x, base):
                return getattr(self, "repr_" + base.__name__)(x, level)
        if isinstance(x, (float, complex, bool)) or x is None:
            return builtins.repr(x)
        return f"<{type(x).__name__}>"


_REPR = _Brief()


def brief(x) -> str:
    """A repr of `x` of at most a few hundred characters, computed in bounded time."""
    try:
        return _REPR.repr(x)
    except Exception:  # a hostile __len__/__iter__ or similar: the type is all we say
        return f"<{type(x).__name__}>"


def clip(text, limit: int = 160) -> str:
    """`text` (e.g. an exception's message, which may quote the file) on one line, at most ~`limit` chars."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit // 2] + " ... " + text[-limit // 2:]
