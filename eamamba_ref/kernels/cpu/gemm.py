"""Convolutions and matrix products in cache-sized blocks, run in parallel: the 'numba' backend's
`conv2d` and `matmul` (same signatures and arithmetic as `reference.layers`).

One giant GEMM over all pixels, or one ufunc pass over the whole feature map, streams everything
through main memory once per kernel tap; blocks that fit in L2 keep the data hot. Every product is
cut into blocks of output pixels (`block_pixels`), which `parallel_for(fn, n_tasks)` (the
runtime's pool, bound to these functions by `runtime.backends`) runs, each block a one-thread
BLAS call. The cut depends on the shapes only, never on the thread count, so the result is the
same bits for any number of threads. Small maps are cut finer, so that the low-resolution levels
of the U-Net (as many GEMM FLOPs as the full-resolution one, on 1/16 or 1/64 of its pixels) still
give every thread work. Block sizes were tuned on a 2-core machine; the optima are broad, so
round numbers.
"""
from __future__ import annotations

import numpy as np

from eamamba_ref.reference.layers import conv_arguments, im2col_patches, matmul as reference_matmul

GEMM_BLOCK_PIXELS = 1024      # output pixels per GEMM block (and per im2col block) of a large map
MIN_BLOCKS = 8                # a smaller product is cut into this many blocks ...
MIN_BLOCK_PIXELS = 64         # ... of at least this many pixels
DEPTHWISE_BLOCK = 1 << 16     # elements of one (B, channels, H_out, W_out) block of a depthwise conv


def block_pixels(n):
    """Output pixels per block for a product with n output pixels (a function of n alone)."""
    return min(GEMM_BLOCK_PIXELS, max(MIN_BLOCK_PIXELS, -(-n // MIN_BLOCKS)))


def _cuts(n, size):
    """[0, n) as consecutive slices of `size` (the last one shorter)."""
    return [slice(i, min(n, i + size)) for i in range(0, n, size)]


def matmul(a, b, pixels="columns", *, parallel_for):
    """`reference.layers.matmul` in blocks of `block_pixels` output pixels on `parallel_for`; a
    product with too few pixels for MIN_BLOCKS blocks is also cut along the weight's other axis
    (in slices of at least MIN_BLOCK_PIXELS rows or columns).

    pixels: 'columns' when the pixels are the last axis of b and of the result (``W @ X``, X
    ``(..., K, P)`` -> ``(..., M, P)``); 'rows' when they are the second-last axis of a and of the
    result (``X @ W``, X ``(..., P, K)`` -> ``(..., P, N)``). Any strides: every block is a view.
    """
    if pixels not in ("columns", "rows"):
        raise ValueError(f"pixels must be 'columns' or 'rows', got {pixels!r}")
    a = np.asarray(a, dtype=np.float32)
    b = np.asarray(b, dtype=np.float32)
    if a.ndim < 2 or b.ndim < 2 or a.shape[-1] != b.shape[-2]:
        return reference_matmul(a, b)                  # raises the reference's error
    batch = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    out = np.empty(batch + (a.shape[-2], b.shape[-1]), np.float32)
    columns = pixels == "columns"
    n, other = (out.shape[-1], out.shape[-2]) if columns else (out.shape[-2], out.shape[-1])
    pixel_cuts = _cuts(n, block_pixels(n))
    parts = max(1, min(-(-MIN_BLOCKS // len(pixel_cuts)), other // MIN_BLOCK_PIXELS))
    other_cuts = _cuts(other, -(-other // parts))
    tasks = [(p, o) for p in pixel_cuts for o in other_cuts]

    def block(i):
        p, o = tasks[i]
        if columns:     # W[o] @ X[:, p]
            np.matmul(a[..., o, :], b[..., p], out=out[..., o, p])
        else:           # X[p] @ W[:, o]
            np.matmul(a[..., p, :], b[..., o], out=out[..., p, o])

    parallel_for(block, len(tasks))
    return out


def conv2d(x, weight, bias=None, padding=0, groups=1, *, parallel_for):
    """`reference.layers.conv2d` with blocked strategies: the 1x1 conv through the blocked
    `matmul`, the depthwise conv over channel blocks that stay in cache across the taps, im2col in
    row blocks (each block's patch copy stays in cache and caps the extra memory)."""
    xp, weight, bias, groups, (h_out, w_out) = conv_arguments(x, weight, bias, padding, groups)
    B, c_in = xp.shape[:2]
    c_out, _, kh, kw = weight.shape
    if kh == kw == 1 and groups == 1:
        out = matmul(weight.reshape(c_out, c_in), xp.reshape(B, c_in, h_out * w_out),
                     parallel_for=parallel_for).reshape(B, c_out, h_out, w_out)
    elif groups == c_in == c_out:
        out = _depthwise(xp, weight[:, 0], h_out, w_out)
    else:
        out = _im2col_conv(xp, weight, groups, h_out, w_out, parallel_for)
    if bias is not None:
        out += bias[:, None, None]
    return out


def _depthwise(xp, w, h_out, w_out):
    """`reference.layers.depthwise` (same operations in the same order) over blocks of channels:
    a block and its accumulator stay in cache across the kh*kw taps (measured ~2x faster than
    whole-map passes at (1, 128, 256, 256))."""
    B, C = xp.shape[:2]
    kh, kw = w.shape[1:]
    out = np.empty((B, C, h_out, w_out), np.float32)
    cb = max(1, DEPTHWISE_BLOCK // max(1, B * h_out * w_out))
    tmp = np.empty((B, min(cb, C), h_out, w_out), np.float32)
    taps = w[:, :, :, None, None]
    for c0 in range(0, C, cb):
        c1 = min(c0 + cb, C)
        acc, t = out[:, c0:c1], tmp[:, : c1 - c0]
        np.multiply(xp[:, c0:c1, :h_out, :w_out], taps[c0:c1, 0, 0], out=acc)
        for i in range(kh):
            for j in range(kw):
                if i or j:
                    np.multiply(xp[:, c0:c1, i : i + h_out, j : j + w_out], taps[c0:c1, i, j], out=t)
                    acc += t
    return out


def _im2col_conv(xp, weight, groups, h_out, w_out, parallel_for):
    """`reference.layers.im2col_conv`, the patch matrix copied a block of output rows (about
    `block_pixels` pixels) at a time, one block per task of `parallel_for`."""
    B = xp.shape[0]
    c_out, cg, kh, kw = weight.shape
    k = cg * kh * kw
    w_mat = weight.reshape(groups, c_out // groups, k)
    win = im2col_patches(xp, kh, kw, groups, h_out, w_out)
    rows = max(1, min(h_out, block_pixels(h_out * w_out) // w_out))
    per_image = -(-h_out // rows)
    out = np.empty((B, groups, c_out // groups, h_out * w_out), np.float32)

    def block(task):
        b, r0 = divmod(task, per_image)
        r0 *= rows
        n = min(rows, h_out - r0)
        patches = np.empty((groups, cg, kh, kw, n, w_out), np.float32)
        np.copyto(patches, win[b, ..., r0 : r0 + n, :])
        np.matmul(w_mat, patches.reshape(groups, k, n * w_out), out=out[b, :, :, r0 * w_out : (r0 + n) * w_out])

    parallel_for(block, B * per_image)
    return out.reshape(B, c_out, h_out, w_out)
