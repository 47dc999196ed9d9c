"""Weights files written without torch, for tests: torch.save-style archives (hand-assembled protocol-2
pickles in a hand-built zip, so an entry can carry any bytes and declare any size) and converted
`.npz` files whose entries can be swapped for crafted ones. Used by the hostile-checkpoint tests and
the loading tests that must run where torch is not installed."""
import math
import struct
import zipfile
import zlib

import numpy as np

from eamamba_ref.io.checkpoint import save_converted
from eamamba_ref.io.config import ModelConfig
from eamamba_ref.reference.parameters import init_params

ARGS = dict(inp_channels=3, out_channels=3, dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1,
            ffn_expansion_factor=2, bias=False, LayerNorm_type="WithBias", channel_mixer_type="Simple",
            mamba_cfg=dict(scan_type="Diagonal", scan_count=8, scan_merge_method="concate", d_state=4,
                           d_conv=3, expand=1, conv_2d=True))


def tiny_params():
    return init_params(ModelConfig.from_args("eamamba", ARGS), seed=0)


# ----------------------------------------------------------------------------------------------------
# A torch.save-style archive without torch: protocol 2 opcodes written by hand, zip written by hand
# (so an entry can carry any compressed bytes and declare any size).


class T:
    """A tensor to pickle: `data` is its storage (or `storage_numel`/`payload` for crafted ones)."""

    def __init__(self, data, shape=None, stride=None, offset=0, storage_numel=None, payload=None,
                 method=0, declared=None):
        self.data = np.ascontiguousarray(data, dtype="<f4").ravel()
        self.shape = tuple(np.shape(data)) if shape is None else tuple(shape)
        c_strides = [math.prod(self.shape[i + 1:]) for i in range(len(self.shape))]
        self.stride = tuple(c_strides) if stride is None else tuple(stride)
        self.offset = offset
        self.numel = self.data.size if storage_numel is None else storage_numel
        self.payload = self.data.tobytes() if payload is None else payload   # bytes in the zip entry
        self.method, self.declared = method, (self.numel * 4 if declared is None else declared)


def p_str(s):
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def p_int(i):
    if -(2**31) <= i < 2**31:
        return b"J" + struct.pack("<i", i)
    b = i.to_bytes((i.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(b)]) + b                                 # LONG1


def emit(x, storages):
    """Protocol-2 opcodes for x (dict, list, tuple, str, int, float, bool, None, T)."""
    if isinstance(x, T):
        known = [key for key, t in storages if t is x]      # sd and sd_e share their tensors, as in torch
        key = known[0] if known else str(len(storages))
        if not known:
            storages.append((key, x))
        pid = b"(" + p_str("storage") + b"ctorch\nFloatStorage\n" + p_str(key) + p_str("cpu") + p_int(x.numel) + b"tQ"
        hooks = b"ccollections\nOrderedDict\n)R"                         # OrderedDict()
        return (b"ctorch._utils\n_rebuild_tensor_v2\n(" + pid + p_int(x.offset)    # _rebuild_tensor_v2(storage,
                + emit(x.shape, storages) + emit(x.stride, storages)                # offset, size, stride,
                + b"\x89" + hooks + b"tR")                                       # False, hooks)
    if isinstance(x, dict):
        return b"}(" + b"".join(emit(k, storages) + emit(v, storages) for k, v in x.items()) + b"u"
    if isinstance(x, list):
        return b"](" + b"".join(emit(v, storages) for v in x) + b"e"
    if isinstance(x, tuple):
        return b"(" + b"".join(emit(v, storages) for v in x) + b"t"
    if isinstance(x, bool):
        return b"\x88" if x else b"\x89"
    if isinstance(x, int):
        return p_int(x)
    if isinstance(x, float):
        return b"G" + struct.pack(">d", x)
    if isinstance(x, str):
        return p_str(x)
    if x is None:
        return b"N"
    raise TypeError(type(x))


def write_zip(path, entries):
    """entries: (name, payload, method 0|8, declared uncompressed size, crc). Sizes < 4 GiB."""
    local, central = b"", b""
    for name, payload, method, size, crc in entries:
        n = name.encode()
        head = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0, crc, len(payload), size, len(n), 0)
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, method, 0, 0, crc, len(payload), size,
                               len(n), 0, 0, 0, 0, 0, len(local)) + n
        local += head + n + payload
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(entries), len(entries), len(central), len(local), 0)
    with open(path, "wb") as f:
        f.write(local + central + end)
    return str(path)


def write_pth(path, obj=None, body=None):
    """An archive holding `obj` (pickled with emit) or the raw opcodes `body`."""
    storages = []
    pickle_bytes = b"\x80\x02" + (emit(obj, storages) if body is None else body) + b"."
    entries = [("archive/data.pkl", pickle_bytes, 0, len(pickle_bytes), zlib.crc32(pickle_bytes)),
               ("archive/byteorder", b"little", 0, 6, zlib.crc32(b"little"))]
    for key, t in storages:
        crc = zlib.crc32(t.payload) if t.method == 0 else 0   # a bomb's CRC is never reached
        entries.append((f"archive/data/{key}", t.payload, t.method, t.declared, crc))
    return write_zip(path, entries)


def official(args=ARGS, sd=None):
    sd = {k: T(v) for k, v in tiny_params().items()} if sd is None else sd
    return {"model": {"name": "eamamba", "args": args, "sd": sd, "sd_e": sd}, "current_iter": 10}


def deflated_zeros(nbytes, prefix=b""):
    """A raw deflate stream of `prefix` + `nbytes` zero bytes (a multiple of 1 MiB), ~1 kB per MiB."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = c.compress(prefix + bytes(2**20)) + c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(bytes(2**20)) + c.flush(zlib.Z_FULL_FLUSH)   # the same for every MiB after a full flush
    return first + block * (nbytes // 2**20 - 1) + c.flush()


def npy_header(shape, descr="<f4"):
    head = repr({"descr": descr, "fortran_order": False, "shape": tuple(shape)}).encode()
    head += b" " * (63 - (len(head) + 10) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(head)) + head


def write_npz(path, args=ARGS, arrays=None, meta=None, raw=()):
    """A converted file via save_converted, then `raw` entries (name, payload, method, size) swapped in."""
    save_converted(path, "eamamba", args, tiny_params() if arrays is None else arrays, meta, overwrite=True)
    if not raw:
        return str(path)
    with zipfile.ZipFile(path) as zf:
        entries = {i.filename: (zf.read(i), 0, i.file_size, i.CRC) for i in zf.infolist()}
    for name, payload, method, size in raw:
        entries[name] = (payload, method, size, zlib.crc32(payload) if method == 0 else 0)
    return write_zip(path, [(n, *e) for n, e in entries.items()])
