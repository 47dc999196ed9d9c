"""Parallel Numba versions of NumPy layers that the 'numba' backend runs instead (same results to
float32 rounding; `layers` stays the readable specification).

layer_norm_channels: the blocks' LayerNorm over the channels of `(B, C, H, W)`. In NumPy it is six
whole-map passes (mean, centre, square, mean, scale, shift), each single-threaded and each streaming
the map through memory; here one task takes a strip of pixels of one image and makes its three
passes (mean, centred variance, write) over a `(C, strip)` tile that stays in cache. Profiled at
1.4 s of an 11 s forward of the official denoiser at 256x256 (2 threads) before this kernel.
"""
import numpy as np
from numba import njit, prange

from eamamba_ref.kernels.cpu.fastexp import FASTMATH

f32 = np.float32
STRIP = 256          # pixels per task: a (C, STRIP) float32 tile is <= 512 KiB for C <= 512


# Loops inside a prange body are not vectorised by LLVM here; in small functions of their own they
# are (see ssm/fused.py). Hence the helpers.
@njit(fastmath=FASTMATH, error_model="numpy", cache=True)
def _add(acc, row):
    for i in range(acc.size):
        acc[i] += row[i]


@njit(fastmath=FASTMATH, error_model="numpy", cache=True)
def _add_sq_dev(acc, row, mean):
    for i in range(acc.size):
        e = row[i] - mean[i]
        acc[i] += e * e


@njit(fastmath=FASTMATH, error_model="numpy", cache=True)
def _normalise(out, row, mean, rstd, w, b):
    for i in range(out.size):
        out[i] = (row[i] - mean[i]) * rstd[i] * w + b


@njit(fastmath=FASTMATH, error_model="numpy", cache=True)
def _scale(out, row, rstd, w):
    for i in range(out.size):
        out[i] = row[i] * rstd[i] * w


@njit(fastmath=FASTMATH, error_model="numpy", nogil=True, cache=True)
def layer_norm_tile(x, p0, p1, weight, bias, eps, with_bias, out, o0):
    """LayerNorm over the channels of pixels p0..p1 of one image: x `(C, P)` -> columns
    o0..o0 + p1 - p0 of out `(C, P')`, both C-contiguous (their rows then stay contiguous in
    Numba's types, and the loops vectorise: 2x slower with strided tiles). Two-pass statistics per
    pixel, like `layers.layer_norm`. The parallel kernel below runs it per strip, the fused block
    halves (`kernels.cpu.halves`, `gemm.project`) per block of pixels of a GEMM: a pixel's result
    does not depend on the tile it is in. Releases the GIL (it also runs on the runtime's pool)."""
    C = x.shape[0]
    n = p1 - p0
    o1 = o0 + n
    mean = np.zeros(n, f32)
    var = np.zeros(n, f32)
    for c in range(C):
        _add(mean, x[c, p0:p1])
    for i in range(n):
        mean[i] /= C
    for c in range(C):
        _add_sq_dev(var, x[c, p0:p1], mean)
    for i in range(n):
        var[i] = f32(1.0) / np.sqrt(var[i] / C + eps)               # now 1 / std
    for c in range(C):
        if with_bias:
            _normalise(out[c, o0:o1], x[c, p0:p1], mean, var, weight[c], bias[c])
        else:                                                       # BiasFree: x itself is scaled
            _scale(out[c, o0:o1], x[c, p0:p1], var, weight[c])


@njit(parallel=True, fastmath=FASTMATH, error_model="numpy", cache=True)
def _layer_norm_channels_kernel(x, weight, bias, eps, with_bias, out):
    """x, out: (B, C, P) float32; one task per strip of STRIP pixels of one image."""
    B, C, P = x.shape
    strips = (P + STRIP - 1) // STRIP
    for task in prange(B * strips):
        b = task // strips
        p0 = (task % strips) * STRIP
        layer_norm_tile(x[b], p0, min(P, p0 + STRIP), weight, bias, eps, with_bias, out[b], p0)


def tile_arguments(weight, bias=None, eps=1e-5):
    """A LayerNorm's parameters as `layer_norm_tile` takes them: (weight, bias, eps, with_bias),
    contiguous float32, the weight standing in for a missing bias (BiasFree)."""
    w = np.ascontiguousarray(weight, dtype=f32)
    return w, (w if bias is None else np.ascontiguousarray(bias, dtype=f32)), f32(eps), bias is not None


def normalised_tile(x, p0, p1, args):
    """The LayerNorm of pixels p0..p1 of one image `x (C, P)` (C-contiguous), as a new `(C, p1 - p0)`
    array; args: `tile_arguments`. (A block of a GEMM that reads the normalised map.)"""
    tile = np.empty((x.shape[0], p1 - p0), f32)
    layer_norm_tile(x, p0, p1, *args, tile, 0)
    return tile


def layer_norm_channels(x, weight, bias=None, eps=1e-5):
    """`layers.layer_norm_channels` (x `(B, C, H, W)`, weight / bias `(C,)`) on all cores."""
    x = np.ascontiguousarray(x, dtype=f32)
    B, C, H, W = x.shape
    out = np.empty_like(x)
    _layer_norm_channels_kernel(x.reshape(B, C, H * W), *tile_arguments(weight, bias, eps),
                                out.reshape(B, C, H * W))
    return out
