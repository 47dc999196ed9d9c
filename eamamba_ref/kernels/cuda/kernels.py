"""numba.cuda kernels for the whole-model GPU path (everything except the selective scan, which
lives in ``ssm/gpu.py``).

Every kernel but the GEMM walks its output with a *grid-stride loop* over one flat index: thread i
does items i, i + gridsize, ... This is the usual CUDA idiom, and it lets `launch` pick the grid
freely: up to 4096 blocks of 256 threads on a GPU, at most 4 blocks of 32 under numba's CUDA
simulator, which runs every simulated thread as a Python thread (~0.25 ms each to start). Several
blocks there, and arrays larger than the grid, so that the block index and the stride's wrap-around
are exercised by the tests as they are on a GPU (tests/test_gpu_kernels.py also runs every kernel at
the GPU's own 256-thread blocks). `launch` reads THREADS and MAX_BLOCKS when called, so a test can
switch between the two. Arrays arrive with fixed ranks; callers reshape (contiguous) arrays to fit.

The GEMM is tiled in shared memory with TILE x TILE blocks, TILE = 16 on the GPU and in the
simulator alike: the kernel the model runs is the kernel the tests run.

All arithmetic is float32; ``fastmath`` is off so that exp/erfc keep their full float32 accuracy
(the whole model is compared with the CPU path at 1e-4). The simulator evaluates the kernels as
Python code (libm exp/erfc in double precision, no fused multiply-add), so it checks the indexing
and the algorithm, not the GPU's float32 rounding: that is benchmarks/gpu_check.py's job.
"""
from __future__ import annotations

import math

from numba import config, cuda, float32

SIMULATOR = bool(config.ENABLE_CUDASIM)
THREADS = 32 if SIMULATOR else 256      # threads per block of the grid-stride kernels
MAX_BLOCKS = 4 if SIMULATOR else 4096   # blocks at most; larger arrays wrap around the grid
TILE = 16                               # GEMM tile edge: TILE x TILE threads per block


def launch(n):
    """(blocks, threads) for a grid-stride kernel over n items."""
    return max(1, min(MAX_BLOCKS, (n + THREADS - 1) // THREADS)), THREADS


@cuda.jit(device=True)
def unravel4(i, shape):
    """The index (i0, i1, i2, i3) of flat position i in a C-ordered array of `shape` (4 ints)."""
    n1, n2, n3 = shape[1], shape[2], shape[3]
    return i // (n3 * n2 * n1), (i // (n3 * n2)) % n1, (i // n3) % n2, i % n3


# ----------------------------------------------------------------------- element-wise
SILU, GELU, SIGMOID, RELU, LEAKY_RELU, NEG, EXP = range(7)
ADD, MUL = range(2)
_INV_SQRT2 = 0.7071067811865476


@cuda.jit
def unary(x, out, op, alpha):
    """out = f(x) over flat float32 arrays; op picks f, alpha is the leaky-ReLU slope."""
    for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        v = x[i]
        if op == SILU:
            r = v / (float32(1.0) + math.exp(-v))
        elif op == GELU:                  # x/2 erfc(-x/sqrt2): exact GELU without 1 + erf cancelling
            r = float32(0.5) * v * math.erfc(-v * float32(_INV_SQRT2))
        elif op == SIGMOID:
            r = float32(1.0) / (float32(1.0) + math.exp(-v))
        elif op == RELU:
            r = max(v, float32(0.0))
        elif op == LEAKY_RELU:
            r = v if v > 0 else v * alpha
        elif op == NEG:
            r = -v
        else:
            r = math.exp(v)
        out[i] = r


@cuda.jit
def binary(a, b, out, op):
    """out = a (op) b on rank-4 arrays; a size-1 axis of a or b is broadcast (NumPy rules)."""
    for i in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        i0, i1, i2, i3 = unravel4(i, out.shape)
        va = a[i0 % a.shape[0], i1 % a.shape[1], i2 % a.shape[2], i3 % a.shape[3]]
        vb = b[i0 % b.shape[0], i1 % b.shape[1], i2 % b.shape[2], i3 % b.shape[3]]
        out[i0, i1, i2, i3] = va + vb if op == ADD else va * vb


@cuda.jit
def copy_range(src, dst, src_start, dst_start, n):
    """dst[o, dst_start + j, i] = src[o, src_start + j, i] for j < n: slicing and concatenating
    along one axis of arrays viewed as (outer, axis, inner)."""
    outer, inner = dst.shape[0], dst.shape[2]
    for t in range(cuda.grid(1), outer * n * inner, cuda.gridsize(1)):
        i = t % inner
        j = (t // inner) % n
        o = t // (inner * n)
        dst[o, dst_start + j, i] = src[o, src_start + j, i]


# ------------------------------------------------------------------------------ GEMM
@cuda.jit
def gemm(a, b, c):
    """c[z] = a[z % len(a)] @ b[z]: a (Za, M, K), b (Z, K, N), c (Z, M, N), Za divides Z.

    The textbook shared-memory tiling: a block of TILE x TILE threads computes one TILE x TILE tile
    of c, staging TILE-wide slabs of a and b in shared memory so each global value is read once per
    tile, not once per product. Blocks stride over the tiles (like the grid-stride loops above), so
    any 1-D grid size works; `gemm_launch` picks it.
    """
    sa = cuda.shared.array((TILE, TILE), float32)
    sb = cuda.shared.array((TILE, TILE), float32)
    tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
    M, K, N = a.shape[1], a.shape[2], b.shape[2]
    tiles_n = (N + TILE - 1) // TILE
    tiles_m = (M + TILE - 1) // TILE
    for tile in range(cuda.blockIdx.x, c.shape[0] * tiles_m * tiles_n, cuda.gridDim.x):
        col = (tile % tiles_n) * TILE + tx
        row = ((tile // tiles_n) % tiles_m) * TILE + ty
        z = tile // (tiles_n * tiles_m)
        za = z % a.shape[0]
        acc = float32(0.0)
        for k0 in range(0, K, TILE):
            sa[ty, tx] = a[za, row, k0 + tx] if row < M and k0 + tx < K else float32(0.0)
            sb[ty, tx] = b[z, k0 + ty, col] if col < N and k0 + ty < K else float32(0.0)
            cuda.syncthreads()
            for k in range(TILE):
                acc += sa[ty, k] * sb[k, tx]
            cuda.syncthreads()
        if row < M and col < N:
            c[z, row, col] = acc


@cuda.jit
def gemm_simple(a, b, c):
    """`gemm` without shared memory: each thread computes whole dot products (grid-stride).
    Not used by the model: kept as the plain kernel that benchmarks/gpu_check.py times against
    the tiled one on the GPU (the reason the model uses `gemm`), and tested like it."""
    Z, M, N = c.shape
    K = a.shape[2]
    for t in range(cuda.grid(1), Z * M * N, cuda.gridsize(1)):
        col = t % N
        row = (t // N) % M
        z = t // (N * M)
        za = z % a.shape[0]
        acc = float32(0.0)
        for k in range(K):
            acc += a[za, row, k] * b[z, k, col]
        c[z, row, col] = acc


def matmul_kernel(z, m, n, tiled=True):
    """The GEMM kernel configured for a (z, m, n) output: the tiled one (what the model runs),
    or `gemm_simple` for comparison."""
    if not tiled:
        return gemm_simple[launch(z * m * n)]
    return gemm[gemm_launch(z, m, n)]


def gemm_launch(z, m, n):
    """(blocks, threads) for `gemm`: one block per output tile (its tile loop then runs once; a
    smaller grid, as the tests also launch, makes the blocks stride over the tiles)."""
    tiles = z * ((m + TILE - 1) // TILE) * ((n + TILE - 1) // TILE)
    return max(1, tiles), (TILE, TILE)


# ---------------------------------------------------------------------- convolutions
@cuda.jit
def im2col(x, cols, kh, kw, ph, pw, w_out):
    """cols[b, (c kh + i) kw + j, y w_out + v] = x[b, c, y + i - ph, v + j - pw] (0 outside):
    the patch matrix of a stride-1 conv, whose product with the (C_out, C_in kh kw) weight is the conv."""
    B, C, H, W = x.shape
    rows, L = cols.shape[1], cols.shape[2]
    for t in range(cuda.grid(1), B * rows * L, cuda.gridsize(1)):
        p = t % L
        r = (t // L) % rows
        b = t // (L * rows)
        j = r % kw
        i = (r // kw) % kh
        c = r // (kw * kh)
        yy = p // w_out + i - ph
        xx = p % w_out + j - pw
        cols[b, r, p] = x[b, c, yy, xx] if 0 <= yy < H and 0 <= xx < W else float32(0.0)


@cuda.jit
def depthwise(x, w, out, ph, pw):
    """out[b, c] = x[b, c] (cross-correlated with) w[c], zero padding (ph, pw); w (C, kh, kw)."""
    H, W = x.shape[2], x.shape[3]
    kh, kw = w.shape[1], w.shape[2]
    for t in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        b, c, y, v = unravel4(t, out.shape)
        acc = float32(0.0)
        for i in range(kh):
            yy = y + i - ph
            if 0 <= yy < H:
                for j in range(kw):
                    xx = v + j - pw
                    if 0 <= xx < W:
                        acc += x[b, c, yy, xx] * w[c, i, j]
        out[b, c, y, v] = acc


# ------------------------------------------------------------------------ reductions
@cuda.jit
def layer_norm(x, weight, bias, out, eps, with_bias):
    """Normalise x (B, C, L) over C at every (b, l): two passes (mean, then the centred variance),
    like the CPU path. BiasFree (with_bias False) scales x itself, not x - mean."""
    B, C, L = x.shape
    for t in range(cuda.grid(1), B * L, cuda.gridsize(1)):
        b = t // L
        p = t % L
        mean = float32(0.0)
        for c in range(C):
            mean += x[b, c, p]
        mean /= C
        var = float32(0.0)
        for c in range(C):
            d = x[b, c, p] - mean
            var += d * d
        inv = float32(1.0) / math.sqrt(var / C + eps)
        for c in range(C):
            if with_bias:
                out[b, c, p] = (x[b, c, p] - mean) * inv * weight[c] + bias[c]
            else:
                out[b, c, p] = x[b, c, p] * inv * weight[c]


@cuda.jit
def mean_last(x, out):
    """out[r] = mean of x[r, :]: x (R, L)."""
    R, L = x.shape
    for r in range(cuda.grid(1), R, cuda.gridsize(1)):
        acc = float32(0.0)
        for p in range(L):
            acc += x[r, p]
        out[r] = acc / L


# --------------------------------------------------------------------- rearrangements
@cuda.jit
def pixel_shuffle(x, out, r):
    """out[b, c, h r + i, w r + j] = x[b, c r r + i r + j, h, w]."""
    for t in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        b, c, yy, xx = unravel4(t, out.shape)
        out[b, c, yy, xx] = x[b, (c * r + yy % r) * r + xx % r, yy // r, xx // r]


@cuda.jit
def pixel_unshuffle(x, out, r):
    """The inverse: out[b, c r r + i r + j, h, w] = x[b, c, h r + i, w r + j]."""
    for t in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        b, k, h, w = unravel4(t, out.shape)
        j = k % r
        i = (k // r) % r
        out[b, k, h, w] = x[b, k // (r * r), h * r + i, w * r + j]


@cuda.jit
def all_around(x, table, out, concate):
    """out[b, k, c, t] = x[b, channel, table[k, t]], channel = k C' + c ('concate') or c ('add')."""
    Cp = out.shape[2]
    for s in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        b, k, c, t = unravel4(s, out.shape)
        out[b, k, c, t] = x[b, k * Cp + c if concate else c, table[k, t]]


@cuda.jit
def restore(y, inverse, out, concate):
    """Back to row-major: direction k's value of pixel l is y[b, k, c, inverse[k, l]]; 'concate'
    puts direction k at channels k C' .. (k+1) C', 'add' sums the K directions."""
    B, K, Cp, L = y.shape
    for s in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        p = s % L
        ch = (s // L) % out.shape[1]
        b = s // (L * out.shape[1])
        if concate:
            k = ch // Cp
            out[b, ch, p] = y[b, k, ch % Cp, inverse[k, p]]
        else:
            acc = float32(0.0)
            for k in range(K):
                acc += y[b, k, ch, inverse[k, p]]
            out[b, ch, p] = acc
