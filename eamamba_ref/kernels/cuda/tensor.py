"""`DeviceTensor` and the GPU versions of the layer functions the forward pass calls.

A DeviceTensor wraps a C-contiguous float32 numba.cuda device array and supports just what
`model.py` and `mhssm.py` write in NumPy style: `.shape`, `.reshape`, `+`, `*`, unary `-`, and
`[...]` with at most one partial slice (``h[:, :half]``, ``x_dbl[:, :, R:R + N]``) plus `None`
axes (``bias[:, None]``). A slice is copied into a new contiguous tensor, so every kernel sees
contiguous data and every reshape is free. Arithmetic broadcasts like NumPy (ranks up to 4).

The functions below mirror `reference.layers` / `scans` / `ssm` with the same signatures
(``(B, C, H, W)`` activations, PyTorch parameter layouts); they are the 'cuda' backend's table
(`runtime.backends.table`), so the one forward pass of `reference/model.py` runs on the GPU.
"""
from __future__ import annotations

import math

import numpy as np
from numba import cuda

from eamamba_ref.reference import scans
from eamamba_ref.kernels.cuda.scan import device_empty, selective_scan_cuda
from eamamba_ref.kernels.cuda import kernels as K


class DeviceTensor:
    """A float32 array on the GPU. `DeviceTensor.from_host(ndarray)`, `.to_host()`."""

    __slots__ = ("data",)

    def __init__(self, data):
        self.data = data                              # numba DeviceNDArray, C-contiguous, float32

    @classmethod
    def from_host(cls, array):
        # Canonical C strides: NumPy may give length-1 axes any stride (g[:, None, None] has
        # strides (4, 0, 0) even after ascontiguousarray), and a real device array with such
        # strides refuses reshape ("operation requires copying"); the simulator never does.
        array = np.ascontiguousarray(array, dtype=np.float32)
        return cls(cuda.to_device(array.reshape(-1).reshape(array.shape)))

    @classmethod
    def empty(cls, shape):
        return cls(device_empty(shape))             # NaN-filled under ssm.gpu.POISON_OUTPUTS

    def to_host(self):
        return self.data.copy_to_host()

    @property
    def shape(self):
        return tuple(self.data.shape)

    @property
    def ndim(self):
        return len(self.data.shape)

    @property
    def size(self):
        return int(self.data.size)

    dtype = np.dtype(np.float32)

    def reshape(self, *shape):
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        return DeviceTensor(self.data.reshape(tuple(int(s) for s in shape)))

    def flat(self):
        return self.data.reshape(self.size)

    def as_3d(self, axis):
        """The data viewed as (outer, shape[axis], inner)."""
        outer = math.prod(self.shape[:axis])
        return self.data.reshape(outer, self.shape[axis], math.prod(self.shape[axis + 1:]))

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        if any(k is Ellipsis for k in key):
            raise IndexError("DeviceTensor indexing takes explicit slices, not '...'")
        axes = [k for k in key if k is not None]
        if len(axes) > self.ndim or not all(isinstance(k, slice) for k in axes):
            raise IndexError(f"DeviceTensor supports slices and None only, got {key!r}")
        out, partial = self, [(i, k) for i, k in enumerate(axes) if k != slice(None)]
        if len(partial) > 1:
            raise IndexError(f"DeviceTensor slices one axis at a time, got {key!r}")
        if partial:
            axis, k = partial[0]
            start, stop, step = k.indices(self.shape[axis])
            if step != 1:
                raise IndexError("DeviceTensor slices need step 1")
            n = max(0, stop - start)
            shape = list(self.shape)
            shape[axis] = n
            out = DeviceTensor.empty(shape)
            if out.size:
                K.copy_range[K.launch(out.size)](self.as_3d(axis), out.as_3d(axis), start, 0, n)
        new_shape, it = [], iter(out.shape)
        for k in key:
            new_shape.append(1 if k is None else next(it))
        new_shape.extend(it)
        return out.reshape(new_shape)

    def __add__(self, other):
        return _binary(self, other, K.ADD)

    __radd__ = __add__

    def __mul__(self, other):
        return _binary(self, other, K.MUL)

    __rmul__ = __mul__

    def __neg__(self):
        return _unary(self, K.NEG)

    def __repr__(self):
        return f"DeviceTensor(shape={self.shape})"


def _binary(a, b, op):
    if not isinstance(b, DeviceTensor):
        b = DeviceTensor.from_host(np.asarray(b, np.float32))
    shape = np.broadcast_shapes(a.shape, b.shape)
    if len(shape) > 4:
        raise ValueError(f"DeviceTensor arithmetic supports rank <= 4, got {shape}")
    pad = (1,) * (4 - len(shape))
    out = DeviceTensor.empty(shape)

    def rank4(t):
        return t.data.reshape(pad + (1,) * (len(shape) - t.ndim) + t.shape)

    K.binary[K.launch(out.size)](rank4(a), rank4(b), out.data.reshape(pad + shape), op)
    return out


def _unary(x, op, alpha=0.0):
    out = DeviceTensor.empty(x.shape)
    K.unary[K.launch(x.size)](x.flat(), out.flat(), op, np.float32(alpha))
    return out


# --------------------------------------------------------------------------- layers
def silu(x):
    return _unary(x, K.SILU)


def gelu(x):
    return _unary(x, K.GELU)


def sigmoid(x):
    return _unary(x, K.SIGMOID)


def relu(x):
    return _unary(x, K.RELU)


def leaky_relu(x, negative_slope=0.01):
    return _unary(x, K.LEAKY_RELU, negative_slope)


def exp(x):
    return _unary(x, K.EXP)


def matmul(a, b):
    """``a @ b`` for a `(..., M, K)`, b `(..., K, N)`, where a's leading axes are a suffix of b's
    (a weight shared over the batch, or one weight per scan direction)."""
    lead_a, lead_b = a.shape[:-2], b.shape[:-2]
    if lead_a != lead_b[len(lead_b) - len(lead_a):]:
        raise ValueError(f"matmul: leading axes {lead_a} must end {lead_b}")
    M, Kd = a.shape[-2:]
    N = b.shape[-1]
    if b.shape[-2] != Kd:
        raise ValueError(f"matmul: shapes {a.shape} and {b.shape} do not chain")
    za, z = math.prod(lead_a), math.prod(lead_b)
    out = DeviceTensor.empty(lead_b + (M, N))
    K.matmul_kernel(z, M, N)(a.data.reshape(za, M, Kd), b.data.reshape(z, Kd, N),
                                    out.data.reshape(z, M, N))
    return out


def conv2d(x, weight, bias=None, padding=0, groups=1):
    """Stride-1 zero-padded conv of x `(B, C_in, H, W)`: dense (im2col + GEMM) or depthwise."""
    B, c_in, H, W = x.shape
    c_out, cg, kh, kw = weight.shape
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    h_out, w_out = H + 2 * ph - kh + 1, W + 2 * pw - kw + 1
    if groups == c_in == c_out and cg == 1:
        out = DeviceTensor.empty((B, c_out, h_out, w_out))
        K.depthwise[K.launch(out.size)](x.data, weight.data.reshape(c_out, kh, kw), out.data, ph, pw)
    elif groups == 1:
        w_mat = weight.reshape(c_out, c_in * kh * kw)
        if kh == kw == 1 and not ph and not pw:
            cols = x.reshape(B, c_in, H * W)          # a 1x1 conv is a plain product
        else:
            cols = DeviceTensor.empty((B, c_in * kh * kw, h_out * w_out))
            K.im2col[K.launch(cols.size)](x.data, cols.data, kh, kw, ph, pw, w_out)
        out = matmul(w_mat, cols).reshape(B, c_out, h_out, w_out)
    else:
        raise NotImplementedError("the GPU path has dense and depthwise convs only "
                                  f"(got groups={groups}, C_in={c_in}, C_out={c_out})")
    return out if bias is None else out + bias.reshape(1, c_out, 1, 1)


def layer_norm(x, weight, bias=None, eps=1e-5, axis=-1):
    """Layer norm over `axis` (see `layers.layer_norm`)."""
    axis %= x.ndim
    out = DeviceTensor.empty(x.shape)
    x3 = x.as_3d(axis)
    # The kernel normalises the middle axis of (outer, C, inner) at each (outer, inner) position.
    b = weight if bias is None else bias
    K.layer_norm[K.launch(x3.shape[0] * x3.shape[2])](x3, weight.data, b.data, out.as_3d(axis),
                                                      np.float32(eps), bias is not None)
    return out


def layer_norm_channels(x, weight, bias=None, eps=1e-5):
    return layer_norm(x, weight, bias, eps, axis=1)


def adaptive_avg_pool_1(x):
    B, C = x.shape[:2]
    out = DeviceTensor.empty((B, C, 1, 1))
    K.mean_last[K.launch(B * C)](x.data.reshape(B * C, x.size // (B * C)), out.flat())
    return out


def pixel_shuffle(x, r):
    B, C, H, W = x.shape
    out = DeviceTensor.empty((B, C // (r * r), H * r, W * r))
    K.pixel_shuffle[K.launch(out.size)](x.data, out.data, r)
    return out


def pixel_unshuffle(x, r):
    B, C, H, W = x.shape
    out = DeviceTensor.empty((B, C * r * r, H // r, W // r))
    K.pixel_unshuffle[K.launch(out.size)](x.data, out.data, r)
    return out


def concatenate(tensors, axis=0):
    axis %= tensors[0].ndim
    shape = list(tensors[0].shape)
    shape[axis] = sum(t.shape[axis] for t in tensors)
    out = DeviceTensor.empty(shape)
    start = 0
    for t in tensors:
        n = t.shape[axis]
        K.copy_range[K.launch(t.size)](t.as_3d(axis), out.as_3d(axis), 0, start, n)
        start += n
    return out


# ------------------------------------------------------------ all-around scan and SSM
_tables = {}


def _device_table(scan_type, scan_count, size, inverse):
    """The gather table of `scans.direction_indices`, uploaded once per (ordering, size)."""
    key = (scan_type, scan_count, tuple(size), inverse)
    if key not in _tables:
        table = scans.direction_indices(scan_type, scan_count, size, inverse=inverse)
        _tables[key] = cuda.to_device(np.ascontiguousarray(table, dtype=np.int32))
    return _tables[key]


def all_around(x, size, scan_type, scan_count, merge):
    """`(B, C, L)` -> `(B, K, C', L)`, see `scans.all_around`."""
    B, C, L = x.shape
    Cp = C // scan_count if merge == "concate" else C
    out = DeviceTensor.empty((B, scan_count, Cp, L))
    table = _device_table(scan_type, scan_count, size, False)
    K.all_around[K.launch(out.size)](x.data, table, out.data, merge == "concate")
    return out


def restore(y, size, scan_type, scan_count, merge):
    """`(B, K, C', L)` -> `(B, C, L)`, see `scans.restore`."""
    B, Kd, Cp, L = y.shape
    out = DeviceTensor.empty((B, Kd * Cp if merge == "concate" else Cp, L))
    inverse = _device_table(scan_type, scan_count, size, True)
    K.restore[K.launch(out.size)](y.data, inverse, out.data, merge == "concate")
    return out


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False):
    """The CUDA selective scan (`kernels.cuda.scan`) on device tensors; y only (the model never
    asks for the last state)."""
    if return_last_state:
        raise ValueError("the device-tensor selective scan returns y only")
    def raw(t):
        return None if t is None else t.data
    y, _ = selective_scan_cuda(u.data, delta.data, A.data, raw(B), raw(C), raw(D), raw(z),
                               raw(delta_bias), bool(delta_softplus))
    return DeviceTensor(y)


def contiguous(x):
    return x                                          # a DeviceTensor is always contiguous
