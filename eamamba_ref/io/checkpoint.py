"""EAMamba weights in and out: official ``.pth`` checkpoints (read without torch) and a converted ``.npz``.

Official checkpoints (the official ``train.py``) hold::

    {'model': {'name': 'eamamba' | 'eamambasr', 'args': {...}, 'sd': state_dict, 'sd_e': ema_state_dict},
     'optimizer': {...}, 'current_iter': int, 'state': uint8 tensor}

`load_state` returns ``(name, args, state_dict)`` from such a file, from a bare ``torch.save``d state
dict, or from a converted file. The converted format is a plain NumPy ``.npz`` (readable with
``np.load(path, allow_pickle=False)``, so no pickle is involved at all): one array per state-dict
entry under its official name, plus a JSON header under ``__eamamba_ref__``::

    {"format_version": 1, "name": ..., "args": {...}, "meta": {...}}
"""

from __future__ import annotations

import json
import math
import os
import zipfile
import zlib
from typing import NamedTuple

import numpy as np

from eamamba_ref.io.atomic import atomic_output
from eamamba_ref.io.pth_reader import (_MAX_READ_BYTES, CheckpointError, LazyTensor,
                                       check_read_budget, read_pth)
from eamamba_ref.io.untrusted import brief, clip

__all__ = [
    "CheckpointError",
    "CheckpointExistsError",
    "ConvertedCheckpoint",
    "StateFile",
    "open_state",
    "read_tensors",
    "load_state",
    "save_converted",
    "load_converted",
    "FORMAT_VERSION",
    "HEADER_KEY",
]

FORMAT_VERSION = 1
HEADER_KEY = "__eamamba_ref__"
_WEIGHTS = {"ema": "sd_e", "raw": "sd"}


class CheckpointExistsError(CheckpointError, FileExistsError):
    """`save_converted` would overwrite an existing file (pass ``overwrite=True`` to allow it)."""


class ConvertedCheckpoint(NamedTuple):
    name: str | None
    args: dict | None
    state_dict: dict  # str -> np.ndarray
    meta: dict | None


class StateFile(NamedTuple):
    """What `open_state` found in a weights file; ``tensors`` are not read yet."""
    name: str | None
    args: dict | None
    tensors: dict       # str -> LazyTensor / converted entry: .shape, .dtype, .nbytes known; np.asarray() reads
    meta: dict | None   # converted files: what convert recorded ('source', 'weights', 'task', ...)
    kind: str           # 'official', 'bare state dict' or 'converted'


def open_state(path, weights: str = "ema") -> StateFile:
    """The name, args and (unread) state dict of an official checkpoint, a bare state dict or a converted
    file; see `load_state`. Only the file's structure and the tensors' declared shapes/dtypes are read,
    so a caller can check them against an architecture before any tensor's bytes are (`read_tensors`).
    """
    if weights not in _WEIGHTS:
        raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}")
    where = os.fspath(path)
    try:
        if _is_converted(path):
            header, entries = _open_converted(where)
            return StateFile(header["name"], header["args"], _clean_state_dict(entries, where), header["meta"],
                             "converted")
        obj = read_pth(path, lazy=True)
    except IsADirectoryError:
        raise CheckpointError(f"{where}: a folder, not a weights file") from None
    except FileNotFoundError:
        raise
    except OSError as e:            # permission denied, I/O error...: one line, like every other problem
        raise CheckpointError(f"{where}: cannot read it ({e.strerror or e})") from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict) and ({"sd", "sd_e"} & obj["model"].keys()):
        model = obj["model"]
        key = _WEIGHTS[weights]
        if key not in model:
            other = "raw" if weights == "ema" else "ema"
            raise CheckpointError(f"{where}: checkpoint has no '{key}' ({weights} weights); use weights={other!r}")
        name, args = model.get("name"), model.get("args")
        if not (name is None or isinstance(name, str)) or not (args is None or isinstance(args, dict)):
            raise CheckpointError(f"{where}: checkpoint['model'] has a malformed 'name' or 'args'")
        return StateFile(name, args, _clean_state_dict(model[key], where), None, "official")
    if isinstance(obj, dict) and obj and all(isinstance(v, LazyTensor) for v in obj.values()):
        return StateFile(None, None, _clean_state_dict(obj, where), None, "bare state dict")
    keys = brief(sorted(map(brief, obj))[:8]) if isinstance(obj, dict) else type(obj).__name__
    raise CheckpointError(f"{where}: neither an official EAMamba checkpoint nor a bare state dict (top level: {keys})")


def load_state(path, weights: str = "ema") -> tuple[str | None, dict | None, dict[str, np.ndarray]]:
    """Read ``(name, args, state_dict)`` from an official checkpoint, a bare state dict or a converted file.

    path:    an official ``.pth`` (``name``/``args`` from ``ckpt['model']``), a ``torch.save``d state
             dict (name and args are None), or a `save_converted` ``.npz`` (what it holds).
    weights: 'ema' -> ``ckpt['model']['sd_e']`` (what the official ``test.py`` evaluates) or
             'raw' -> ``ckpt['model']['sd']``. Ignored for bare and converted files. An official
             checkpoint always has both; a file without the requested one is an error (no silent
             fallback, since EMA and raw weights give different results): ask for the other one.

    Only the chosen state dict is read from disk (the other one and the optimizer state are not).
    Values are NumPy arrays: floating point ones as float32 (float16/bfloat16/float64 converted),
    integer and bool buffers unchanged; complex, datetime, structured or string arrays and NaN/Inf
    values are refused (`read_tensors`). If *every* key starts with ``'module.'`` (a model saved
    wrapped in DataParallel/DistributedDataParallel/accelerate) the prefix is stripped.
    """
    state = open_state(path, weights)
    return state.name, state.args, read_tensors(state.tensors, os.fspath(path))


def _clean_state_dict(sd, where: str) -> dict:
    """Check ``sd`` is {str: tensor} and drop a global 'module.' prefix; nothing is read."""
    if not isinstance(sd, dict):
        raise CheckpointError(f"{where}: state dict is a {type(sd).__name__}, not a dict")
    strip = bool(sd) and all(isinstance(k, str) and k.startswith("module.") for k in sd)
    out = {}
    for key, value in sd.items():
        if not isinstance(key, str) or not isinstance(value, (LazyTensor, _NpyEntry, np.ndarray)):
            raise CheckpointError(f"{where}: state dict entry {brief(key)} is a {type(value).__name__}, not a tensor")
        out[key[len("module."):] if strip else key] = value
    return out


# dtype kinds a weight may have: float, signed/unsigned int and bool buffers. Not complex ('c'),
# datetime/timedelta ('M', 'm'), structured/void ('V'), strings ('U', 'S') or objects ('O').
_REAL_KINDS = "fiub"


def read_tensors(tensors: dict, where: str = "", max_bytes: int | None = None) -> dict[str, np.ndarray]:
    """Read {name: lazy tensor} (from `open_state`) as {name: array}, floats as float32.

    Before reading: every dtype must be real (float, int or bool) and what reading costs must be
    bounded (`check_read_budget`: ``max_bytes`` at most, default 4 GiB; storages not much larger than
    the tensors). After reading each tensor: floating point values must be finite. Tensors are read
    one at a time; arrays given (not lazy) are checked the same way.
    """
    for key, t in tensors.items():
        if t.dtype.kind not in _REAL_KINDS or t.dtype.fields is not None:
            raise CheckpointError(f"{where}: weight {brief(key)} has dtype {brief(str(t.dtype))[1:-1]}; "
                                  "weights must be real numbers (float, int or bool)")
    lazy = [t for t in tensors.values() if not isinstance(t, np.ndarray)]
    check_read_budget(lazy, where, _MAX_READ_BYTES if max_bytes is None else max_bytes)
    out = {}
    for key, t in tensors.items():
        try:
            arr = np.asarray(t)     # a lazy tensor is read from disk here
        except MemoryError:
            raise CheckpointError(f"{where}: not enough memory to read weight {brief(key)} "
                                  f"({t.nbytes:,} bytes)") from None
        except OSError as e:
            raise CheckpointError(f"{where}: cannot read weight {brief(key)} ({e.strerror or e})") from None
        if arr.dtype.kind == "f":
            for stage in ("", " beyond float32's range"):   # as stored, then as float32
                finite = np.isfinite(arr)
                if not finite.all():
                    bad = int(arr.size - np.count_nonzero(finite))
                    raise CheckpointError(f"{where}: weight {brief(key)} holds {bad:,} NaN/Inf values{stage} "
                                          "(diverged training or a corrupt file)")
                if arr.dtype == np.float32:
                    break
                with np.errstate(over="ignore"):
                    arr = arr.astype(np.float32)
        out[key] = arr
    return out


# --------------------------------------------------------------------------------------------------
# Converted format


def save_converted(path, name, args, state_dict, meta=None, *, overwrite: bool = False) -> None:
    """Write ``state_dict`` (str -> array) and ``name``/``args``/``meta`` as a converted ``.npz``.

    Arrays are stored as given (dtype and shape) under their state-dict names; ``name`` (str or None),
    ``args`` and ``meta`` (JSON-serialisable; tuples come back as lists) go in the JSON header. The file
    is written next to ``path`` under a temporary name and moved into place, so ``path`` is either
    absent, the old file, or the complete new file -- never half written. An existing ``path`` is
    refused (`CheckpointExistsError`) unless ``overwrite=True``. The name is used as given (no '.npz'
    is appended).
    """
    path = os.fspath(path)
    if not (name is None or isinstance(name, str)):
        raise CheckpointError(f"name must be a str or None, got {type(name).__name__}")
    try:
        header = json.dumps({"format_version": FORMAT_VERSION, "name": name, "args": args, "meta": meta})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"args and meta must be JSON-serialisable: {e}") from None
    arrays = {}
    for key, value in state_dict.items():
        if not isinstance(key, str) or not key or key == HEADER_KEY:
            raise CheckpointError(f"invalid state dict key {key!r}")
        arr = np.asarray(value)
        if arr.dtype.hasobject:
            raise CheckpointError(f"state dict entry {key!r} is not a numeric array")
        arrays[key] = arr
    if not overwrite and os.path.lexists(path):
        raise CheckpointExistsError(f"{path} exists; pass overwrite=True to replace it")

    with atomic_output(path, overwrite, suffix=".tmp", error=CheckpointExistsError) as tmp:
        with open(tmp, "wb") as f:
            with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
                _write_npy(zf, HEADER_KEY, np.array(header))
                for key, arr in arrays.items():
                    _write_npy(zf, key, arr)
            f.flush()
            os.fsync(f.fileno())


def _write_npy(zf: zipfile.ZipFile, key: str, arr: np.ndarray) -> None:
    # What np.savez does, minus its keyword-argument API (a key named 'file' would clash with it).
    with zf.open(key + ".npy", "w", force_zip64=True) as f:
        np.lib.format.write_array(f, arr, allow_pickle=False)


def load_converted(path) -> ConvertedCheckpoint:
    """Read a `save_converted` file: arrays exactly as stored (no pickle is involved: no code can run).

    Every entry's .npy header is checked against the size its zip entry declares before any array
    is read or inflated (`_open_converted`)."""
    where = os.fspath(path)
    header, entries = _open_converted(where)
    check_read_budget(entries.values(), where)
    state_dict = {key: entry.numpy() for key, entry in entries.items()}
    return ConvertedCheckpoint(header["name"], header["args"], state_dict, header["meta"])


_MAX_HEADER_BYTES = 2**20      # the JSON header of a converted file (a few kB in practice)
_MAX_ENTRIES = 65536           # arrays in a converted file (the official denoising model has 707)


class _NpyEntry:
    """One array of a converted .npz whose .npy header has been read and checked, its data not.

    ``shape``, ``dtype`` (as stored), ``nbytes``; ``numpy()`` / ``np.asarray()`` read the array
    (native byte order, C order) and check it is the one the header described.
    """

    __slots__ = ("path", "member", "shape", "dtype", "fortran", "stamp")

    def __init__(self, path, member, shape, dtype, fortran, stamp):
        self.path, self.member, self.shape, self.dtype, self.fortran, self.stamp = \
            path, member, shape, dtype, fortran, stamp

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def storage_id(self):
        return (self.path, self.member)

    @property
    def storage_nbytes(self) -> int:
        return self.nbytes     # _open_converted checked the entry holds exactly the array

    def numpy(self) -> np.ndarray:
        try:
            return self._read()
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:   # e.g. a CRC mismatch
            raise CheckpointError(f"{self.path}: entry {brief(self.member)} is corrupt or unreadable "
                                  f"({type(e).__name__}: {clip(e)})") from None

    def _read(self) -> np.ndarray:
        st = os.stat(self.path)
        if (st.st_size, st.st_mtime_ns) != self.stamp:
            raise CheckpointError(f"{self.path}: file changed since it was opened")
        with zipfile.ZipFile(self.path) as zf, zf.open(self.member) as f:
            if _read_npy_header(f, self.path, self.member) != (self.shape, self.dtype, self.fortran):
                raise CheckpointError(f"{self.path}: entry {brief(self.member)} changed since it was opened")
            out = np.empty(math.prod(self.shape), self.dtype)
            view = memoryview(out.view(np.uint8)) if out.nbytes else memoryview(b"")
            got = 0
            while got < len(view):
                n = f.readinto(view[got:got + 2**24])  # chunks: zipfile reads via a temporary bytes
                if not n:
                    raise CheckpointError(f"{self.path}: entry {brief(self.member)} is truncated")
                got += n
            f.read(1)  # reach the end of the entry: zipfile checks its CRC there
        arr = out.reshape(self.shape, order="F" if self.fortran else "C")
        if self.fortran:
            arr = np.ascontiguousarray(arr)
        return arr if arr.dtype.isnative else arr.astype(arr.dtype.newbyteorder("="))

    def __array__(self, dtype=None, copy=None):
        arr = self.numpy()
        return arr if dtype is None else arr.astype(dtype, copy=False)

    def __repr__(self):
        return f"<array {self.shape} {self.dtype} in {self.path}>"


def _read_npy_header(f, where, member):
    """(shape, dtype, fortran_order) of the .npy stream ``f``, positioned after the header."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise CheckpointError(f"{where}: entry {brief(member)} is .npy format {version}, not 1.0 or 2.0")
    if dtype.hasobject:
        raise CheckpointError(f"{where}: entry {brief(member)} holds Python objects (a pickle); refusing it")
    if len(shape) > 32:
        raise CheckpointError(f"{where}: entry {brief(member)} has {len(shape)} dimensions (at most 32)")
    return shape, dtype, fortran


def _open_converted(where: str):
    """The checked JSON header and {state-dict name: `_NpyEntry`} of a converted file; no array is read
    except the header's. Each entry's zip-declared size must equal its .npy header plus the bytes its
    shape and dtype need, so nothing is inflated beyond what the header announces."""
    if not _is_converted(where):
        raise CheckpointError(f"{where}: not an eamamba_ref converted .npz file (no {HEADER_KEY} entry)")
    st = os.stat(where)
    stamp = (st.st_size, st.st_mtime_ns)
    entries = {}
    try:
        with zipfile.ZipFile(where) as zf:
            infos = zf.infolist()
            if len(infos) > _MAX_ENTRIES:
                raise CheckpointError(f"{where}: {len(infos):,} entries, more than any model has")
            for info in infos:
                if not info.filename.endswith(".npy"):
                    raise CheckpointError(f"{where}: unexpected entry {brief(info.filename)} (not a .npy array)")
                with zf.open(info) as f:
                    shape, dtype, fortran = _read_npy_header(f, where, info.filename)
                    data = f.tell()
                size = math.prod(shape) * dtype.itemsize
                if info.file_size != data + size:
                    raise CheckpointError(
                        f"{where}: entry {brief(info.filename)} declares {info.file_size:,} bytes, but its header "
                        f"describes {data + size:,} (shape {brief(shape)}, {dtype}); corrupt or crafted")
                key = info.filename[: -len(".npy")]
                entries[key] = _NpyEntry(where, info.filename, shape, dtype, fortran, stamp)
        text = entries.pop(HEADER_KEY)
        if text.dtype.kind != "U" or text.shape != () or text.nbytes > _MAX_HEADER_BYTES:
            raise CheckpointError(f"{where}: malformed {HEADER_KEY} header entry")
        header = json.loads(str(text.numpy()[()]))
    except CheckpointError:
        raise
    except RecursionError:
        raise CheckpointError(f"{where}: corrupt converted file (JSON header nested too deeply)") from None
    except Exception as e:  # bad zip, bad .npy header, bad JSON...
        detail = clip(e)
        raise CheckpointError(f"{where}: corrupt converted file ({type(e).__name__}: {detail})") from None
    if not isinstance(header, dict) or header.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{where}: unsupported converted format header {brief(header)}")
    name, args, meta = header.get("name"), header.get("args"), header.get("meta")
    if not (name is None or isinstance(name, str)) or not all(v is None or isinstance(v, dict) for v in (args, meta)):
        raise CheckpointError(f"{where}: converted header has a malformed 'name', 'args' or 'meta'")
    return {"name": name, "args": args, "meta": meta}, entries


def _is_converted(path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            return HEADER_KEY + ".npy" in zf.namelist()
    except zipfile.BadZipFile:
        return False
