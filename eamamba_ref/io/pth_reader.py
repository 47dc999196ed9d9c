"""Read ``torch.save`` checkpoints without torch, and without running code from the file.

A ``torch.save`` file (PyTorch >= 1.6) is a zip archive with one top-level folder ``<prefix>/``:

    <prefix>/data.pkl       the saved object, pickled (protocol 2) with every tensor storage
                            replaced by a persistent id ('storage', StorageType, key, location, numel)
    <prefix>/data/<key>     the raw bytes of storage <key> (uncompressed, row-major element order)
    <prefix>/byteorder      'little' or 'big' (absent in files of older torch: little-endian)
    <prefix>/.format_version, version, .data/serialization_id, ...   bookkeeping

Tensors are pickled as calls ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride,
requires_grad, hooks)`` (``_rebuild_tensor_v3`` with an explicit dtype for dtypes without a legacy
``<Type>Storage`` class, e.g. uint16). Unpickling runs whatever callables the pickle names, so this
module never uses a plain unpickler on the file: `_RestrictedUnpickler.find_class` resolves only a
fixed table of names (rebuild functions, storage types, dtypes, ``collections.OrderedDict`` and a few
builtins) to stand-ins defined here, and refuses every other global with `CheckpointError`.

A crafted pickle can also hurt without naming any global: a dict key nested 2,000,000 tuples deep
crashes CPython's (recursive, unguarded) tuple hash; a key that is a DAG of shared tuples takes
exponential time to hash; a few bytes of opcodes can build millions of containers. So the pickle is
run by Python's own (iterative) unpickler with every opcode metered (`_MAX_WORK` steps in all, calls
charged by the size of their arguments) and every dict key / set member checked before it is hashed
(str, bytes, bool, None, float, a not-huge int, or a tuple/frozenset of at most `_MAX_KEY_PARTS` such).
Storage bytes are never read before the caller has checked what they will cost (`check_read_budget`).

Tensors come back as `LazyTensor` (shape and dtype known, bytes not read yet) so a caller that wants
only the model weights never reads the optimizer state; `materialize` turns them into NumPy arrays.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import struct
import zipfile
import zlib

import numpy as np

from eamamba_ref.io.untrusted import brief, clip

__all__ = ["CheckpointError", "LazyTensor", "read_pth", "materialize", "check_read_budget"]


class CheckpointError(ValueError):
    """A file that cannot be read as a checkpoint: wrong format, corrupt, or unsafe content."""


# torch dtype name -> NumPy dtype of the stored elements. bfloat16 has no NumPy dtype: its raw 16-bit
# patterns are read as uint16 and widened to float32 (exactly: bfloat16 is the top half of a float32).
_DTYPES = {
    "float64": np.dtype(np.float64),
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(np.uint16),
    "int64": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "int16": np.dtype(np.int16),
    "int8": np.dtype(np.int8),
    "uint64": np.dtype(np.uint64),
    "uint32": np.dtype(np.uint32),
    "uint16": np.dtype(np.uint16),
    "uint8": np.dtype(np.uint8),
    "bool": np.dtype(np.bool_),
    "complex64": np.dtype(np.complex64),
    "complex128": np.dtype(np.complex128),
}

# Legacy typed storage classes (what torch 2.x still writes for the classic dtypes) -> dtype name.
_STORAGE_CLASSES = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
}

# First bytes of a file written with torch.save(..., _use_new_zipfile_serialization=False): a pickled
# magic number (protocol 2, LONG1 0x1950a86a20f9469cfc6c).
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
# Bounds on what a checkpoint's pickle may ask for. The official denoising checkpoint (25 M parameters,
# EMA + raw weights + Adam state: ~3,500 tensors) has a 0.3 MB data.pkl: 107,000 opcodes, 220,000 steps.
_MAX_PICKLE_BYTES = 64 * 2**20
_MAX_WORK = 4_000_000           # unpickling steps (opcodes, plus the size of every call's arguments)
_MAX_KEY_PARTS = 64             # parts of one dict key / set member (a tuple of tuples...)
_MAX_NDIM = 32                  # NumPy 1.x's limit; every EAMamba tensor has at most 4
_MAX_TENSOR_BYTES = 2**48       # a shape whose element count overflows anything is refused up front


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# --------------------------------------------------------------------------------------------------
# The zip archive: entries are located once, storages are read on demand.


class _Archive:
    """One ``torch.save`` zip file: its pickle, byte order and the location of every storage."""

    def __init__(self, path):
        self.path = os.fspath(path)
        st = os.stat(self.path)  # FileNotFoundError for a missing file, as open() would
        # Lazily read storages must come from the same file the pickle came from.
        self._stamp = (st.st_size, st.st_mtime_ns)
        _refuse_non_zip(self.path)
        try:
            with zipfile.ZipFile(self.path) as zf:
                self._index(zf)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, OSError, NotImplementedError,
                RuntimeError) as e:
            raise CheckpointError(f"{self.path}: corrupt or truncated zip archive ({e})") from None

    def _index(self, zf: zipfile.ZipFile) -> None:
        names = zf.namelist()
        if "__eamamba_ref__.npy" in names:
            raise CheckpointError(f"{self.path}: an eamamba_ref converted .npz file, read it with load_converted")
        pickles = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(pickles) != 1:
            what = "a NumPy .npz archive" if any(n.endswith(".npy") for n in names) else "a zip archive"
            raise CheckpointError(
                f"{self.path}: {what} without a single <prefix>/data.pkl, not a torch.save checkpoint"
            )
        prefix = pickles[0][: -len("data.pkl")]
        if prefix + "constants.pkl" in names or any(n.startswith(prefix + "code/") for n in names):
            raise CheckpointError(f"{self.path}: a TorchScript archive (torch.jit.save), not a torch.save checkpoint")

        version = self._small(zf, prefix + ".format_version", b"1")
        if version != b"1":
            raise CheckpointError(f"{self.path}: unsupported torch.save .format_version {brief(version)}")
        order = self._small(zf, prefix + "byteorder", b"little")
        if order not in (b"little", b"big"):
            raise CheckpointError(f"{self.path}: unknown byteorder record {brief(order)}")
        self.byteorder = "<" if order == b"little" else ">"

        info = zf.getinfo(pickles[0])
        if info.file_size > _MAX_PICKLE_BYTES:
            raise CheckpointError(f"{self.path}: data.pkl is {info.file_size} bytes, too large for a checkpoint")
        self.pickle = zf.read(pickles[0])  # zipfile checks its CRC
        data = prefix + "data/"
        self._entries = {i.filename[len(data):]: i for i in zf.infolist() if i.filename.startswith(data)}

    def _small(self, zf: zipfile.ZipFile, name: str, default: bytes) -> bytes:
        """A bookkeeping record of a few bytes; its declared size is checked before it is inflated."""
        try:
            info = zf.getinfo(name)
        except KeyError:
            return default
        if info.file_size > 64:
            raise CheckpointError(f"{self.path}: {brief(name)} claims {info.file_size} bytes, not a few")
        return zf.read(info).strip()

    def nbytes(self, key: str) -> int:
        if key not in self._entries:
            raise CheckpointError(f"{self.path}: storage {brief(key)} named by the pickle is missing from the archive")
        return self._entries[key].file_size

    def read(self, key: str) -> np.ndarray:
        """The bytes of storage ``key`` as a fresh writable uint8 array (one copy, CRC-checked)."""
        info = self._entries[key]
        st = os.stat(self.path)
        if (st.st_size, st.st_mtime_ns) != self._stamp:
            raise CheckpointError(f"{self.path}: file changed since it was opened")
        # Check the sizes the zip directory claims before allocating that much memory.
        stored = info.compress_type == zipfile.ZIP_STORED
        if info.header_offset + info.compress_size > st.st_size or (stored and info.compress_size != info.file_size):
            raise CheckpointError(f"{self.path}: zip entry of storage {key!r} claims more bytes than the file has")
        out = np.empty(info.file_size, np.uint8)
        with open(self.path, "rb") as f:
            # The local header repeats name and 'extra' lengths; torch pads 'extra' to align the data,
            # so the data offset must be read from it, not from the central directory.
            f.seek(info.header_offset)
            head = f.read(30)
            if len(head) != 30 or head[:4] != b"PK\x03\x04":
                raise CheckpointError(f"{self.path}: corrupt zip entry for storage {key!r}")
            name_len, extra_len = struct.unpack("<HH", head[26:30])
            f.seek(name_len + extra_len, io.SEEK_CUR)
            if stored:
                got = f.readinto(memoryview(out))
            elif info.compress_type == zipfile.ZIP_DEFLATED:  # never written by torch, but legal zip
                try:
                    raw = zlib.decompressobj(-zlib.MAX_WBITS).decompress(f.read(info.compress_size), info.file_size)
                except zlib.error:
                    raise CheckpointError(f"{self.path}: storage {key!r} is corrupt (bad deflate data)") from None
                got = len(raw)
                out[:got] = np.frombuffer(raw, np.uint8)
            else:
                raise CheckpointError(f"{self.path}: storage {key!r} uses unsupported zip compression")
        if got != info.file_size:
            raise CheckpointError(f"{self.path}: storage {key!r} is truncated")
        if zlib.crc32(out) != info.CRC:
            raise CheckpointError(f"{self.path}: storage {key!r} is corrupt (CRC mismatch)")
        return out


def _refuse_non_zip(path: str) -> None:
    """Name the format of a file that is not a zip archive, without unpickling anything."""
    if zipfile.is_zipfile(path):
        return
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        raise CheckpointError(f"{path}: empty file, not a checkpoint")
    if head.startswith(_LEGACY_MAGIC):
        raise CheckpointError(
            f"{path}: legacy torch.save format (_use_new_zipfile_serialization=False) is not supported; "
            "re-save it with torch.save in PyTorch >= 1.6"
        )
    if head[257:262] == b"ustar":
        raise CheckpointError(f"{path}: legacy tar torch.save format (PyTorch < 0.4) is not supported")
    if head.startswith(b"PK\x03\x04"):
        raise CheckpointError(f"{path}: corrupt or truncated zip archive (no central directory)")
    if head[:1] == b"\x80":
        raise CheckpointError(f"{path}: a bare pickle stream, not a torch.save zip archive; refusing to unpickle it")
    raise CheckpointError(f"{path}: not a PyTorch checkpoint (not a zip archive)")


# --------------------------------------------------------------------------------------------------
# Stand-ins for the globals a checkpoint may name. They are instances, not the module-level functions,
# and refuse pickle's BUILD opcode, so a crafted pickle cannot modify them (e.g. their __defaults__).


class _Sealed:
    __slots__ = ()

    def __setstate__(self, state):
        raise CheckpointError(f"pickle tries to set the state of {self!r}")

    def __setattr__(self, name, value):
        raise CheckpointError(f"pickle tries to set attribute {brief(name)} of {self!r}")


class _Callable(_Sealed):
    """An allowed callable (REDUCE calls it with arguments from the pickle)."""

    __slots__ = ("_fn", "_name")

    def __init__(self, name, fn):
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_fn", fn)

    def __call__(self, *args):
        return self._fn(*args)

    def __repr__(self):
        return f"<allowed global {self._name}>"


class _StorageType(_Sealed):
    """``torch.FloatStorage`` & co. (dtype name) or ``torch.storage.UntypedStorage`` (dtype None)."""

    __slots__ = ("dtype",)

    def __init__(self, dtype):
        object.__setattr__(self, "dtype", dtype)

    def __repr__(self):
        return f"<storage type {self.dtype or 'untyped'}>"


class _Marker(_Sealed):
    """A class that only appears as an argument (``torch.Tensor`` in ``_rebuild_from_type_v2``)."""

    __slots__ = ("name",)

    def __init__(self, name):
        object.__setattr__(self, "name", name)

    def __repr__(self):
        return f"<{self.name}>"


class _Storage(_Sealed):
    """Storage ``key`` of an archive; its bytes are read once, on first use, then cached."""

    __slots__ = ("archive", "key", "nbytes", "_raw")

    def __init__(self, archive: _Archive, key: str):
        for name, value in (("archive", archive), ("key", key), ("nbytes", archive.nbytes(key)), ("_raw", None)):
            object.__setattr__(self, name, value)

    def raw(self) -> np.ndarray:
        if self._raw is None:
            object.__setattr__(self, "_raw", self.archive.read(self.key))
        return self._raw

    def __repr__(self):
        return f"<storage {self.key!r} of {self.archive.path}>"


class LazyTensor(_Sealed):
    """A tensor of a ``.pth`` archive whose bytes have not been read yet.

    ``shape`` (tuple), ``dtype`` (the NumPy dtype `numpy` returns; float32 for bfloat16) and
    ``torch_dtype`` (e.g. ``'bfloat16'``) are known without reading; ``numpy()`` or
    ``np.asarray(t)`` reads the storage and returns a native-byte-order array. A storage is read
    once and its bytes stay cached while tensors referring to it are alive.
    """

    __slots__ = ("shape", "torch_dtype", "_storage", "_offset", "_stride")

    def __init__(self, storage: _Storage, dtype: str, offset: int, shape: tuple, stride: tuple):
        itemsize = _DTYPES[dtype].itemsize
        if storage.nbytes % itemsize:
            raise CheckpointError(f"storage {brief(storage.key)} of {storage.nbytes} bytes does not hold whole {dtype}")
        _check_geometry(offset, shape, stride, storage.nbytes // itemsize, storage.key, itemsize)
        for name, value in zip(self.__slots__, (tuple(shape), dtype, storage, offset, tuple(stride))):
            object.__setattr__(self, name, value)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float32) if self.torch_dtype == "bfloat16" else _DTYPES[self.torch_dtype]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor's elements as stored (2 per bfloat16 element)."""
        return self.size * _DTYPES[self.torch_dtype].itemsize

    @property
    def storage_id(self):
        """Identifies the storage: tensors with the same id share one read of its bytes."""
        return (self._storage.archive.path, self._storage.key)

    @property
    def storage_nbytes(self) -> int:
        """Bytes that reading this tensor reads (and, for a deflated entry, inflates): its whole storage."""
        return self._storage.nbytes

    def numpy(self) -> np.ndarray:
        """Read the tensor. A tensor that is its whole storage, row-major, is a view of the storage's
        bytes (tensors sharing a storage that way share memory, as in torch); any other view
        (slice, transpose, expand, offset) is copied into a fresh C-contiguous array."""
        stored = _DTYPES[self.torch_dtype].newbyteorder(self._storage.archive.byteorder)
        flat = self._storage.raw().view(stored)
        if self.size == 0:
            arr = np.empty(self.shape, stored)
        elif self._offset == 0 and self.size == flat.size and self._stride == _c_strides(self.shape):
            arr = flat.reshape(self.shape)
        else:
            byte_strides = tuple(s * stored.itemsize for s in self._stride)
            arr = np.lib.stride_tricks.as_strided(flat[self._offset :], self.shape, byte_strides).copy()
        if not arr.dtype.isnative:
            arr = arr.astype(arr.dtype.newbyteorder("="))
        if self.torch_dtype == "bfloat16":
            wide = arr.astype(np.uint32)
            wide <<= 16  # in place: `wide << 16` would turn a 0-d array into a NumPy scalar
            arr = wide.view(np.float32)
        return arr

    def __array__(self, dtype=None, copy=None):
        arr = self.numpy()
        return arr if dtype is None else arr.astype(dtype, copy=False)

    def __repr__(self):
        return f"LazyTensor(shape={self.shape}, dtype={self.torch_dtype}, storage={self._storage.key!r})"


def _c_strides(shape) -> tuple:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


def _check_geometry(offset, shape, stride, numel, key, itemsize) -> None:
    """Refuse a view that would reach outside its storage: NumPy's as_strided does not check, so a
    crafted size/stride would otherwise read arbitrary process memory. Also refuse more dimensions
    than NumPy handles and element counts no array can hold."""
    if isinstance(shape, tuple) and len(shape) > _MAX_NDIM:
        raise CheckpointError(f"tensor on storage {brief(key)} has {len(shape)} dimensions (at most {_MAX_NDIM})")
    shape_ok = isinstance(shape, tuple) and all(_is_int(n) and n >= 0 for n in shape)
    stride_ok = isinstance(stride, tuple) and all(_is_int(s) and s >= 0 for s in stride)
    if not (shape_ok and stride_ok and len(shape) == len(stride) and _is_int(offset) and offset >= 0):
        raise CheckpointError(
            f"invalid tensor geometry on storage {brief(key)}: size {brief(shape)}, stride {brief(stride)}, "
            f"offset {brief(offset)}"
        )
    if math.prod(shape) * itemsize >= _MAX_TENSOR_BYTES:
        raise CheckpointError(f"tensor of size {brief(shape)} on storage {brief(key)} is larger than any array")
    if all(n > 0 for n in shape) and offset + sum((n - 1) * s for n, s in zip(shape, stride)) >= numel:
        raise CheckpointError(
            f"tensor of size {brief(shape)} (stride {brief(stride)}, offset {brief(offset)}) overruns storage "
            f"{brief(key)} of {numel} elements"
        )


# --------------------------------------------------------------------------------------------------
# The callables a checkpoint may invoke, and what they build here.


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    pair = storage if isinstance(storage, tuple) else None
    if pair is None or len(pair) != 2 or not isinstance(pair[0], _Storage) or not isinstance(pair[1], str):
        raise CheckpointError(f"_rebuild_tensor_v2 called on {type(storage).__name__}, not a typed storage")
    return LazyTensor(pair[0], pair[1], offset, size, stride)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None):
    if not isinstance(storage, tuple) or len(storage) != 2 or storage[1] is not None:
        raise CheckpointError("_rebuild_tensor_v3 called on a typed storage, expected an UntypedStorage")
    if not (isinstance(dtype, str) and dtype.startswith("torch.") and dtype[6:] in _DTYPES):
        raise CheckpointError(f"_rebuild_tensor_v3 called with dtype {brief(dtype)}")
    return LazyTensor(storage[0], dtype[6:], offset, size, stride)


def _rebuild_parameter(data, requires_grad, hooks, state=None):
    # An nn.Parameter is its tensor here; requires_grad, hooks and Python attributes are dropped.
    if not isinstance(data, LazyTensor):
        raise CheckpointError(f"_rebuild_parameter called on {type(data).__name__}, not a tensor")
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    # torch.save uses this for a Tensor/Parameter carrying Python attributes; keep the tensor only.
    if not (isinstance(func, _Callable) and isinstance(new_type, _Marker) and isinstance(args, tuple)):
        raise CheckpointError("malformed _rebuild_from_type_v2 call")
    return func(*args)


def _complex(real=0.0, imag=0.0):
    # complex() also parses strings; a pickle of a complex number passes two floats.
    if not all(isinstance(v, (int, float)) for v in (real, imag)):
        raise CheckpointError("builtins.complex called with arguments other than numbers")
    return complex(real, imag)


def _encode(text, encoding="latin1"):
    # Protocol 2 pickles a bytes object as _codecs.encode(str, 'latin1'); nothing else is allowed.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise CheckpointError("_codecs.encode allowed only as protocol 2's bytes encoding (str, 'latin1')")
    return text.encode("latin1")


def _device(kind, index=None):
    if not isinstance(kind, str) or not (index is None or _is_int(index)):
        raise CheckpointError(f"torch.device called with {brief(kind)}, {brief(index)}")
    return kind if index is None else f"{kind}:{index}"


def _size(dims=()):
    if not isinstance(dims, (tuple, list)) or len(dims) > _MAX_NDIM or not all(_is_int(d) for d in dims):
        raise CheckpointError(f"torch.Size called with {brief(dims)}")
    return tuple(dims)


def _ordered_dict(*args):
    # What pickle writes for an OrderedDict: a call without arguments, then SETITEMS (checked keys).
    if args:
        raise CheckpointError("collections.OrderedDict called with arguments (pickle never writes that)")
    return collections.OrderedDict()


def _set(items=()):
    # Protocol 2 writes set/frozenset as a call on a list of the members.
    if not isinstance(items, (list, tuple)):
        raise CheckpointError(f"set/frozenset called on a {type(items).__name__}, not a list")
    kinds = set(map(type, items))       # the usual sets (of str, or of ints) are checked at C speed
    if kinds == {int}:
        if not -(2**60) < min(items) <= max(items) < 2**60:
            _check_key(max(items, key=abs))     # raises, naming the problem
    elif not kinds <= {str, bytes, bool, float, type(None)}:
        for item in items:
            _check_key(item)
    return set(items)


def _frozenset(items=()):
    return frozenset(_set(items))


def _check_key(key) -> int:
    """Refuse a dict key or set member that could be slow or unsafe to hash; returns the parts checked.

    CPython hashes a tuple recursively without a depth check (a key nested 2,000,000 deep crashes it)
    and without caching (a DAG of shared tuples takes exponential time), and int/float/complex hashes
    are not randomised (a few hundred thousand crafted ints make one dict quadratic). Allowed: str,
    bytes, bool, None, float, ints below 2**60 in magnitude, and tuples/frozensets of at most
    `_MAX_KEY_PARTS` parts in all.
    """
    if type(key) is str:            # the common case, first
        return 1
    todo, parts = [key], 1          # parts: every node seen, counted when first reached
    while todo:
        x = todo.pop()
        t = type(x)
        if t is tuple or t is frozenset:
            parts += len(x)
            if parts > _MAX_KEY_PARTS:
                raise CheckpointError(f"a dict key or set member with more than {_MAX_KEY_PARTS} parts "
                                      "(nested tuples); refusing to hash it")
            todo.extend(x)
        elif t is int:
            if not -(2**60) < x < 2**60:
                raise CheckpointError(f"a dict key or set member that is a {x.bit_length()}-bit integer; "
                                      "refusing to hash it")
        elif t not in (str, bytes, bool, float, type(None)):
            raise CheckpointError(f"a dict key or set member of type {t.__name__}; refusing to hash it")
    return parts


def _allowed_globals() -> dict:
    """(module, name) -> stand-in. Dtypes become strings like 'torch.float32', devices strings like
    'cuda:0', torch.Size a tuple, so everything a caller sees is plain Python or NumPy."""
    table = {
        ("collections", "OrderedDict"): _ordered_dict,
        ("builtins", "set"): _set,
        ("builtins", "frozenset"): _frozenset,
        ("builtins", "complex"): _complex,
        ("_codecs", "encode"): _encode,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
        ("torch", "device"): _device,
        ("torch", "Size"): _size,
        ("torch", "Tensor"): _Marker("torch.Tensor"),
        ("torch.nn.parameter", "Parameter"): _Marker("torch.nn.parameter.Parameter"),
        ("torch.storage", "UntypedStorage"): _StorageType(None),
    }
    for cls, dtype in _STORAGE_CLASSES.items():
        table["torch", cls] = _StorageType(dtype)
    for dtype in _DTYPES:
        table["torch", dtype] = "torch." + dtype
    for key, value in table.items():
        if callable(value):
            table[key] = _Callable(".".join(key), value)
    return table


_ALLOWED = _allowed_globals()


def _size_of(x) -> int:
    """What a call pays for an argument: the length of a container or string, else 1."""
    return len(x) if isinstance(x, (str, bytes, bytearray, list, tuple, dict, set, frozenset)) else 1


def _call_cost(args) -> int:
    """Work a call with these (positional) arguments may do: each argument walked once."""
    n = _size_of(args)
    if isinstance(args, (list, tuple)):
        n += sum(_size_of(a) for a in args)
    return n


class _RestrictedUnpickler(pickle._Unpickler):
    """Unpickles ``data.pkl`` with only the globals of `_ALLOWED`; storages become `_Storage`.

    Python's own unpickler (``pickle._Unpickler``, the one the C accelerator mirrors) runs the opcodes,
    so deep nesting costs no C stack; every opcode goes through a meter that charges `_MAX_WORK` and,
    where the opcode hashes (SETITEM(S), DICT, ADDITEMS, FROZENSET), checks each key first.
    """

    def __init__(self, archive: _Archive):
        super().__init__(io.BytesIO(archive.pickle), encoding="utf-8")
        self._archive = archive
        self._storages: dict[str, _Storage] = {}
        self._work = _MAX_WORK

    def _charge(self, units: int) -> None:
        self._work -= units
        if self._work < 0:
            raise CheckpointError(
                f"{self._archive.path}: data.pkl needs more than {_MAX_WORK:,} unpickling steps "
                "(a pickle bomb, or far larger than any model checkpoint); refusing it"
            )

    def _check_keys(self, keys) -> None:
        for key in keys:
            self._charge(_check_key(key))

    def find_class(self, module, name):
        if module == "__builtin__":  # protocol 2 spells builtins the Python 2 way
            module = "builtins"
        try:
            return _ALLOWED[module, name]
        except (KeyError, TypeError):
            raise CheckpointError(
                f"{self._archive.path}: refusing to load global {brief(module)[1:-1]}.{brief(name)[1:-1]} "
                "(only tensors, storages and plain containers are allowed)"
            ) from None

    def persistent_load(self, pid):
        ok = (
            isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)
            and isinstance(pid[2], str) and isinstance(pid[3], str) and _is_int(pid[4]) and pid[4] >= 0
        )
        if not ok:
            raise CheckpointError(f"{self._archive.path}: unsupported persistent id {brief(pid)}")
        storage_type, key, numel = pid[1], pid[2], pid[4]
        if key not in self._storages:
            self._storages[key] = _Storage(self._archive, key)
        storage = self._storages[key]
        itemsize = 1 if storage_type.dtype is None else _DTYPES[storage_type.dtype].itemsize
        if numel * itemsize != storage.nbytes:
            raise CheckpointError(
                f"{self._archive.path}: storage {brief(key)} holds {storage.nbytes} bytes, "
                f"pickle says {brief(numel)} x {itemsize}"
            )
        # The location ('cpu', 'cuda:0', ...) is ignored: everything is read to host memory.
        return (storage, storage_type.dtype)


# What each opcode is charged before it runs, beyond 1 step: containers and memo entries cost
# more memory than a step's byte; calls and BUILD walk their arguments; hashing opcodes check keys.
# `self.stack` below is the stack as the opcode sees it (after MARK: the marked items).
_PRE_STEP = {
    pickle.EMPTY_DICT: lambda u: u._charge(2),
    pickle.EMPTY_LIST: lambda u: u._charge(2),
    pickle.MARK: lambda u: u._charge(2),
    pickle.BINPUT: lambda u: u._charge(2),
    pickle.LONG_BINPUT: lambda u: u._charge(2),
    pickle.PUT: lambda u: u._charge(2),
    pickle.MEMOIZE: lambda u: u._charge(2),
    pickle.EMPTY_SET: lambda u: u._charge(8),
    pickle.SETITEM: lambda u: u._check_keys(u.stack[-2:-1]),
    pickle.SETITEMS: lambda u: u._check_keys(u.stack[0::2]),
    pickle.DICT: lambda u: u._check_keys(u.stack[0::2]),
    pickle.ADDITEMS: lambda u: u._check_keys(u.stack),
    pickle.FROZENSET: lambda u: (u._charge(8), u._check_keys(u.stack)),
    pickle.REDUCE: lambda u: u._charge(_call_cost(u.stack[-1])),              # func(*args)
    pickle.NEWOBJ: lambda u: u._charge(_call_cost(u.stack[-1])),              # cls.__new__(cls, *args)
    pickle.NEWOBJ_EX: lambda u: u._charge(_call_cost(u.stack[-2]) + _size_of(u.stack[-1])),
    pickle.OBJ: lambda u: u._charge(_call_cost(u.stack)),                     # cls(*args)
    pickle.INST: lambda u: u._charge(_call_cost(u.stack)),
    pickle.BUILD: lambda u: u._charge(_call_cost(u.stack[-1])),               # state or (state, slots)
}


def _metered(handler, pre):
    def step(self):
        self._work -= 1
        if self._work < 0:
            self._charge(0)
        if pre is not None:
            pre(self)
        handler(self)
    return step


_RestrictedUnpickler.dispatch = {code: _metered(handler, _PRE_STEP.get(bytes([code])))
                                 for code, handler in pickle._Unpickler.dispatch.items()}


# --------------------------------------------------------------------------------------------------


def read_pth(path, *, lazy: bool = False):
    """Read a ``torch.save`` zip checkpoint without torch and without running code from it.

    Returns the saved object with dicts, OrderedDicts, lists, tuples, numbers and strings as they were,
    and every tensor (or nn.Parameter) as a NumPy array -- or, with ``lazy=True``, as a `LazyTensor`
    read only when asked (``np.asarray(t)`` or `materialize`), so unused parts such as an optimizer
    state cost no memory. torch dtypes come back as strings ('torch.float32'), devices as strings,
    torch.Size as tuples. bfloat16 tensors become float32 (exact); float16 stays float16.

    Raises `CheckpointError` (a ValueError) for anything else: a global outside the allow-list (the
    message names it), the legacy non-zip format, a TorchScript archive, a corrupt/truncated file.
    """
    archive = _Archive(path)
    try:
        obj = _RestrictedUnpickler(archive).load()
    except CheckpointError:
        raise
    except Exception as e:  # malformed pickles raise all sorts: keep it one clear error type
        detail = clip(e)  # one line, clipped: the message may quote the file
        raise CheckpointError(f"{archive.path}: malformed data.pkl ({type(e).__name__}: {detail})") from None
    return obj if lazy else materialize(obj)


_MAX_READ_BYTES = 4 * 2**30     # what reading may allocate when no architecture says what it needs


def check_read_budget(tensors, where: str = "", max_bytes: int = _MAX_READ_BYTES) -> int:
    """Refuse to read ``tensors`` when that would cost far more than its result; returns their bytes.

    Checked before a byte is read, from what the file declares: the tensors' bytes (shape x itemsize)
    must not exceed ``max_bytes``; the storages they read (a storage is read whole, and a deflated one
    inflated whole) must not exceed twice those bytes + 1 MiB (a zip bomb: 3 MB of file declaring a
    3 GB storage for a small tensor); and the tensors must not exceed 16x their storages + 16 MiB
    (a stride-0 view turning 500 bytes into 3.6 GB). Real checkpoints store each tensor whole, 1:1.

    ``tensors``: objects with ``nbytes``, ``storage_id`` and ``storage_nbytes`` (`LazyTensor`, or the
    converted-file entries of `eamamba_ref.io.checkpoint`); each distinct object counts once.
    """
    where = f"{where}: " if where else ""
    unique = {id(t): t for t in tensors}.values()
    need = sum(t.nbytes for t in unique)
    stored = sum({t.storage_id: t.storage_nbytes for t in unique}.values())
    if need > max_bytes:
        raise CheckpointError(f"{where}tensors of {need:,} bytes exceed the {max_bytes:,} bytes allowed")
    if stored > 2 * need + 2**20:
        raise CheckpointError(f"{where}storages declare {stored:,} bytes for {need:,} bytes of tensors "
                              "(a zip bomb, or views of far larger tensors); refusing to inflate them")
    if need > 16 * stored + 2**24:
        raise CheckpointError(f"{where}tensors of {need:,} bytes are views repeating {stored:,} stored bytes "
                              "(stride 0); refusing to expand them")
    return need


def materialize(obj):
    """Replace every `LazyTensor` in ``obj`` (nested dicts, lists, tuples) by its NumPy array.

    Dicts and lists are updated in place (sharing and cycles, as unpickled, are preserved: a tensor
    referenced twice becomes one array); tuples holding tensors are rebuilt. Returns the result.
    What reading will cost is checked first (`check_read_budget`).
    """
    found: dict[int, LazyTensor] = {}
    visited: set[int] = set()

    def collect(x):
        if id(x) in visited:
            return
        visited.add(id(x))
        if isinstance(x, LazyTensor):
            found[id(x)] = x
        elif isinstance(x, dict):
            for v in x.values():
                collect(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                collect(v)

    try:
        collect(obj)
    except RecursionError:
        raise CheckpointError("checkpoint object is nested too deeply") from None
    check_read_budget(found.values())
    seen: dict[int, tuple] = {}  # id(original) -> (original, result); holding it keeps the id unique

    def walk(x):
        if id(x) in seen:
            return seen[id(x)][1]
        if isinstance(x, LazyTensor):
            seen[id(x)] = (x, x.numpy())
            return seen[id(x)][1]
        if isinstance(x, dict):
            seen[id(x)] = (x, x)
            for k, v in x.items():
                x[k] = walk(v)
        elif isinstance(x, list):
            seen[id(x)] = (x, x)
            x[:] = [walk(v) for v in x]
        elif type(x) is tuple:
            seen[id(x)] = (x, x)  # a cycle back into this tuple sees the tuple itself
            result = tuple(walk(v) for v in x)
            seen[id(x)] = (x, result)
            return result
        return x

    try:
        return walk(obj)
    except RecursionError:
        raise CheckpointError("checkpoint object is nested too deeply") from None
