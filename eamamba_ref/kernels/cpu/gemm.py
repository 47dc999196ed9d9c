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

from eamamba_ref.kernels.cpu.norms import normalised_tile, tile_arguments
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


def pixel_blocks(n):
    """[0, n) as the slices of `block_pixels(n)` pixels of a map of n pixels (the last shorter)."""
    return _cuts(n, block_pixels(n))


def pixels_suffice(n):
    """Whether a map of n pixels gives every thread work cut along its pixels alone (at least
    MIN_BLOCKS blocks of MIN_BLOCK_PIXELS). Smaller products are also cut along their channels
    (`_blocks`), which a block fused with steps before or after its GEMM cannot be: those run
    their steps one after the other there (a choice made from the shapes alone)."""
    return n >= MIN_BLOCKS * MIN_BLOCK_PIXELS


def serial_for(fn, n_tasks):
    """fn(0), ..., fn(n_tasks - 1) on the calling thread: `parallel_for` where none is given."""
    for i in range(n_tasks):
        fn(i)


def _blocks(n, other):
    """The (pixels, other) slices of the blocks of a product with n output pixels and `other`
    outputs per pixel: `block_pixels(n)` pixels each, and a product with too few pixels for
    MIN_BLOCKS blocks also cut along `other` (in slices of at least MIN_BLOCK_PIXELS)."""
    pixel_cuts = pixel_blocks(n)
    parts = max(1, min(-(-MIN_BLOCKS // len(pixel_cuts)), other // MIN_BLOCK_PIXELS))
    other_cuts = _cuts(other, -(-other // parts))
    return [(p, o) for p in pixel_cuts for o in other_cuts]


def matmul(a, b, pixels="columns", *, parallel_for):
    """`reference.layers.matmul` in the blocks of `_blocks` on `parallel_for`.

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
    tasks = _blocks(n, other)

    def block(i):
        p, o = tasks[i]
        if columns:     # W[o] @ X[:, p]
            np.matmul(a[..., o, :], b[..., p], out=out[..., o, p])
        else:           # X[p] @ W[:, o]
            np.matmul(a[..., p, :], b[..., o], out=out[..., p, o])

    parallel_for(block, len(tasks))
    return out


def project(weight, x, *, norm=None, bias=None, residual=None, pixel_major_in=False,
            pixel_major_out=False, prepare=None, parallel_for=serial_for):
    """A 1x1 projection of every pixel with what comes before and after it done per block, while
    the block is in cache: ``out[b, :, p] = weight @ LN(x[b, :, p]) + bias + residual[b, :, p]``.

    x: `(B, K, L)` channel-first, or `(B, L, K)` pixel-major (pixel_major_in); weight `(M, K)`;
    norm: None, or (weight, bias or None, eps) of the blocks' LayerNorm over x's K channels
    (`norms.normalised_tile`; channel-first x only); bias `(M,)` or None; residual `(B, M, L)`
    or None (channel-first output only); prepare: None, or a function `(b, l0, l1)` run on each
    block of pixels right before its GEMM, e.g. to rewrite that block of x in place (the blocks
    are then cut along the pixels only, so that it runs once per pixel).
    Returns `(B, M, L)`, or `(B, L, M)` (pixel_major_out).

    The blocks are those of `matmul`, per image; each is the same BLAS call on the same values as
    in `matmul` and the LayerNorm of a pixel does not depend on its tile, so this gives the bits
    of `layer_norm_channels`, then `matmul`, then the adds, without their passes over memory.
    """
    B = x.shape[0]
    L, K = (x.shape[1], x.shape[2]) if pixel_major_in else (x.shape[2], x.shape[1])
    M = weight.shape[0]
    if residual is not None and pixel_major_out:
        raise ValueError("project: a residual needs a channel-first output")
    if norm is not None:
        if pixel_major_in:
            raise ValueError("project: a LayerNorm needs a channel-first x")
        x = np.ascontiguousarray(x, dtype=np.float32)      # normalised_tile reads x[b] as (K, L)
        norm = tile_arguments(*norm)
    out = np.empty((B, L, M) if pixel_major_out else (B, M, L), np.float32)
    cuts = _blocks(L, M) if prepare is None else [(p, slice(None)) for p in pixel_blocks(L)]
    tasks = [(b, p, o) for b in range(B) for p, o in cuts]

    def block(i):
        b, p, o = tasks[i]
        if prepare is not None:
            prepare(b, p.start, p.stop)
        if pixel_major_in:
            src = x[b, p].T                                   # (K, n) view
        elif norm is None:
            src = x[b, :, p]
        else:
            src = normalised_tile(x[b], p.start, p.stop, norm)
        if pixel_major_out:
            dst = out[b, p, o]
            np.matmul(src.T, weight[o].T, out=dst)
            if bias is not None:
                dst += bias[o]
        else:
            dst = out[b, o, p]
            np.matmul(weight[o], src, out=dst)
            if bias is not None:
                dst += bias[o, None]
            if residual is not None:
                dst += residual[b, o, p]

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
