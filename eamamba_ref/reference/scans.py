"""All-around scan orderings of EAMamba (paper Sec. 3.3; official `models/module/scan.py`).

An image feature map `(B, C, H, W)` is flattened row-major into a sequence `(B, C, L)`, L = H*W,
index = row*W + col. A *scan ordering* is a permutation `order` of `range(L)`: the scanned sequence
is `x[..., order]`, i.e. step t of the scan visits pixel `order[t]`.

The *all-around* transform turns the sequence into K directional sequences `(B, K, C', L)`:

- merge 'concate' (the MHSSM case): the C channels are split into K heads of C' = C/K channels and
  head k is scanned in direction k, so K directions cost the same as one scan;
- merge 'add': every direction gets all C' = C channels (K times the work) and `restore` sums them.

Direction k of the official code, for an ordering `order` on an (H, W) grid:

    k % 4 in {2, 3}: the grid is first flipped left-right (orderings) or transposed (raster, and
                     heads 4..7 of the 8-direction case);
    k odd:           the sequence is then reversed;
    finally:         the ordering's index is applied -- on every head for K <= 4, on heads 0..3 only
                     for K = 8 (heads 4..7 are plain raster / column-major sweeps).

Because the reversal happens *before* the ordering's index, head 1 of the diagonal scan is the
diagonal ordering of the 180-degree rotated grid, not the diagonal ordering read backwards (for a
diagonal scan these differ: see tests/test_scans.py::test_reversed_head_is_rotated_grid_ordering).

Every transform here is a gather through a `(K, L)` index table computed once per
(ordering, count, H, W) and cached. Every ordering is the official one exactly, the z-order
included: its codes tie, and the order of the tied pixels is reproduced from the sort the
official code uses (see `_zorder` and `std_sort`).

Where this module deliberately goes beyond the official code (which raises on these inputs):
- scan_count 1 is a single direction `(B, 1, C, L)` -- plain Mamba over the chosen ordering;
- the Hilbert ordering of a 1x1 grid is [0].
The raster ordering with 8 directions is refused: the official code crashes on it and its heads
4..7 would repeat heads 0..3.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from eamamba_ref.reference import std_sort

__all__ = [
    "SCAN_TYPES", "EXTRA_SCAN_TYPES", "SCAN_COUNTS", "MERGE_METHODS",
    "canonical_scan_type", "scan_order", "direction_indices", "all_around", "restore",
]

# Official config spellings; None is the raster (row-major) scan.
SCAN_TYPES = (None, "diagonal", "zigzag", "zorder", "hilbert")
# Orderings this project adds (not in the official code): the true Morton curve.
EXTRA_SCAN_TYPES = ("morton",)
SCAN_COUNTS = (1, 2, 4, 8)
MERGE_METHODS = ("add", "concate")
_RASTER_ALIASES = ("none", "raster", "null", "")


def canonical_scan_type(scan_type):
    """Map a config spelling to one of SCAN_TYPES (case-insensitive; 'raster'/'none' -> None)."""
    if scan_type is None:
        return None
    if not isinstance(scan_type, str):
        raise ValueError(f"scan_type must be a string or None, got {scan_type!r}")
    name = scan_type.strip().lower()
    if name in _RASTER_ALIASES:
        return None
    if name not in SCAN_TYPES + EXTRA_SCAN_TYPES:
        raise ValueError(f"unknown scan_type {scan_type!r}; expected one of None (raster), "
                         f"'diagonal', 'zigzag', 'zorder', 'hilbert' (or this project's 'morton')")
    return name


def _check_size(height, width):
    h, w = int(height), int(width)
    if h != height or w != width or h < 1 or w < 1:
        raise ValueError(f"grid size must be two positive integers, got ({height!r}, {width!r})")
    return h, w


def _check_size_pair(size):
    """`size` must be the map's `(H, W)`: one clear error for a scalar, a 1-tuple, a triple..."""
    try:
        height, width = size
    except (TypeError, ValueError):
        raise ValueError(f"size must be the map's (H, W), a pair of positive integers, got {size!r}") from None
    return _check_size(height, width)


# --------------------------------------------------------------------------------------------
# The five orderings. Each returns the permutation `order` (int64, (H*W,)) of row-major indices.
# --------------------------------------------------------------------------------------------

def _grid(h, w):
    rows, cols = np.divmod(np.arange(h * w, dtype=np.int64), w)
    return rows, cols


def _raster(h, w):
    return np.arange(h * w, dtype=np.int64)


def _diagonal(h, w):
    # Anti-diagonals s = row + col in increasing order; inside one, rows increase (the path runs
    # down-left from the top edge / right column).
    rows, cols = _grid(h, w)
    return np.lexsort((rows, rows + cols)).astype(np.int64)


def _zigzag(h, w):
    # JPEG-like zigzag over anti-diagonals. The official code walks the diagonals k = 1-H .. W-1 of
    # the row-flipped grid (anti-diagonal s = row + col = H-1+k of the original) and reverses the
    # even-k ones, so the direction of diagonal s depends on the parity of s - H + 1, i.e. on H:
    # odd k -> rows decreasing (up-right), even k -> rows increasing (down-left).
    rows, cols = _grid(h, w)
    s = rows + cols
    up_right = (s - h + 1) % 2 == 1
    return np.lexsort((np.where(up_right, -rows, rows), s)).astype(np.int64)


def _official_spread_bits(v):
    """The bit spreading of the official z-order code, reproduced as written there.

    A true Morton code spreads bit i of a coordinate to bit 2i (masks 0x00FF00FF, 0x0F0F0F0F,
    0x33333333, 0x55555555 after the shifts by 8, 4, 2, 1). The official code applies the masks
    shifted by one place (0x0000FFFF after the shift by 8, ..., 0x33333333 after the shift by 1),
    so its 'z-order' is not the Morton curve and different pixels can share a code (a 4x4 grid
    has 13 distinct codes). We reproduce it because trained checkpoints depend on it; the true
    curve is the 'morton' ordering below.
    """
    v = (v | (v << 8)) & 0x0000FFFF
    v = (v | (v << 4)) & 0x00FF00FF
    v = (v | (v << 2)) & 0x0F0F0F0F
    v = (v | (v << 1)) & 0x33333333
    return v


def _zorder(h, w):
    # Sort pixels by the official code (column bits | row bits << 1). The codes collide, so the
    # order among equal codes is part of the ordering: the official code takes it from torch's
    # default (unstable) argsort, always on the CPU (the codes are built from CPU tensors) and
    # deterministic there. `std_sort.torch_cpu_argsort` reproduces that sort move for move
    # (libstdc++'s introsort below 32768 pixels, a stable radix sort from there on), so this is
    # the official order on every grid, without torch. A stable sort alone would differ on most
    # grids (4 of 64 positions on 8x8, 15,262 of 16,384 on 128x128), i.e. a checkpoint trained
    # with the official code would read its z-order heads in a different pixel order.
    rows, cols = _grid(h, w)
    code = _official_spread_bits(cols) | (_official_spread_bits(rows) << 1)
    return std_sort.torch_cpu_argsort(code)


def _interleave_bits(v):
    """Spread the bits of non-negative int64 `v` to the even bit positions (bit i -> bit 2i)."""
    out = np.zeros_like(v)
    for bit in range(31):
        out |= ((v >> bit) & 1) << (2 * bit)
    return out


def _morton(h, w):
    # The true Z-order (Morton) curve: interleave column bits (even positions) with row bits
    # (odd positions); every aligned 2^j x 2^j block is visited contiguously. Not in the official
    # code (see _official_spread_bits); offered for teaching and ablations.
    rows, cols = _grid(h, w)
    code = _interleave_bits(cols) | (_interleave_bits(rows) << 1)
    return np.argsort(code, kind="stable").astype(np.int64)


def _hilbert_index(x0, x1, bits):
    """Hilbert-curve distance of points (x0, x1) on a 2^bits square, Skilling's algorithm.

    Same convention as the `numpy-hilbert-curve` package the official code uses with
    coordinates (row, col): undo the curve's rotations/reflections from the top bit down,
    interleave the bits (x0 first), then decode the Gray code.
    """
    x = [x0.copy(), x1.copy()]
    for b in range(bits - 1, -1, -1):
        q = np.int64(1) << b
        lower = q - 1
        for i in range(2):
            on = (x[i] & q) != 0
            x[0] = np.where(on, x[0] ^ lower, x[0])             # reflect x0's lower bits
            swap = np.where(on, 0, (x[0] ^ x[i]) & lower)        # or exchange them with xi's
            x[0] ^= swap
            x[i] ^= swap
    gray = np.zeros_like(x0)
    for b in range(bits):
        gray |= ((x[0] >> b) & 1) << (2 * b + 1)
        gray |= ((x[1] >> b) & 1) << (2 * b)
    binary = gray.copy()                                         # Gray -> binary: prefix xor
    shift = 1
    while shift < 64:
        binary ^= binary >> shift
        shift *= 2
    return binary


def _hilbert(h, w):
    # The curve is drawn on the smallest power-of-two square that covers the grid; cells outside
    # the grid are skipped, so the order restricted to the grid is a sort by curve distance.
    bits = (max(h, w) - 1).bit_length()
    if bits == 0:
        return _raster(h, w)
    rows, cols = _grid(h, w)
    return np.argsort(_hilbert_index(rows, cols, bits), kind="stable").astype(np.int64)


_ORDERINGS = {None: _raster, "diagonal": _diagonal, "zigzag": _zigzag,
              "zorder": _zorder, "hilbert": _hilbert, "morton": _morton}


@lru_cache(maxsize=256)
def _scan_order_cached(scan_type, h, w):
    order = _ORDERINGS[scan_type](h, w)
    order.setflags(write=False)      # shared by every caller through the cache
    return order


def scan_order(scan_type, height, width):
    """The ordering's permutation: int64 `(H*W,)`, step t of the scan visits pixel `order[t]`.

    `scan_type`: None (raster), 'diagonal', 'zigzag', 'zorder' or 'hilbert' (any case).
    The returned array is cached and read-only.
    """
    scan_type = canonical_scan_type(scan_type)
    h, w = _check_size(height, width)
    return _scan_order_cached(scan_type, h, w)


# --------------------------------------------------------------------------------------------
# The K directions
# --------------------------------------------------------------------------------------------

def _check_config(scan_type, scan_count, merge):
    scan_type = canonical_scan_type(scan_type)
    if scan_count not in SCAN_COUNTS or isinstance(scan_count, bool):
        raise ValueError(f"scan_count must be one of {SCAN_COUNTS}, got {scan_count!r}")
    scan_count = int(scan_count)
    if scan_count == 8 and scan_type is None:
        raise ValueError("scan_count 8 needs a scan_type (the raster scan has only 4 distinct "
                         "directions and the official code cannot run it); use scan_count 4")
    if scan_count == 1:
        merge = merge if merge in MERGE_METHODS else "concate"   # one head: both merges agree
    elif merge not in MERGE_METHODS:
        raise ValueError(f"scan_merge_method must be 'add' or 'concate', got {merge!r}")
    return scan_type, scan_count, merge


@lru_cache(maxsize=256)
def _direction_indices_cached(scan_type, scan_count, h, w):
    L = h * w
    order = _scan_order_cached(scan_type, h, w)
    rows, cols = _grid(h, w)
    t = np.arange(L, dtype=np.int64)
    transposed = (t % h) * w + t // h          # row-major flattening of the (W, H) transpose
    flipped_lr = rows * w + (w - 1 - cols)     # left-right mirror
    table = np.empty((scan_count, L), dtype=np.int64)
    for k in range(scan_count):
        gather = t
        if k % 4 in (2, 3):
            gather = transposed if (scan_type is None or k >= 4) else flipped_lr
        if k % 2 == 1:
            gather = gather[::-1]
        if scan_type is not None and (scan_count < 8 or k < 4):
            gather = gather[order]
        table[k] = gather
    inverse = np.empty_like(table)
    np.put_along_axis(inverse, table, np.broadcast_to(t, table.shape), axis=1)
    table.setflags(write=False)
    inverse.setflags(write=False)
    return table, inverse


def direction_indices(scan_type, scan_count, size, inverse=False):
    """Gather table `(K, L)`: direction k's step t reads pixel `table[k, t]` of the row-major map.

    With `inverse=True`, the table `inv` with `inv[k, table[k, t]] == t` (pixel -> step), which
    `restore` uses to put every direction back in row-major order. Cached, read-only.
    """
    scan_type, scan_count, _ = _check_config(scan_type, scan_count, "concate")
    h, w = _check_size_pair(size)
    table, inv = _direction_indices_cached(scan_type, scan_count, h, w)
    return inv if inverse else table


def _check_sequence(x, size, ndim, name):
    x = np.asarray(x)
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {x.shape}")
    h, w = _check_size_pair(size)
    if x.shape[-1] != h * w:
        raise ValueError(f"sequence length {x.shape[-1]} != H*W = {h}*{w} = {h * w}")
    return x, h, w


def all_around(x, size, scan_type, scan_count, merge):
    """All-around transform: `(B, C, L)` -> `(B, K, C', L)`.

    x: `(B, C, L)` row-major sequence of an (H, W) map, size = (H, W), L = H*W.
    merge 'concate': channel block k (C' = C/K channels) goes to direction k;
    merge 'add':     all C' = C channels go to every direction.
    """
    scan_type, K, merge = _check_config(scan_type, scan_count, merge)
    x, h, w = _check_sequence(x, size, 3, "x")
    B, C, L = x.shape
    table, _ = _direction_indices_cached(scan_type, K, h, w)
    if merge == "concate":
        if C % K:
            raise ValueError(f"{C} channels cannot be split into {K} directions ('concate' "
                             f"merge needs channels divisible by scan_count)")
        heads = x.reshape(B, K, C // K, L)                                   # (B, K, C', L)
        return np.take_along_axis(heads, table[None, :, None, :], axis=3)
    return np.stack([x[..., table[k]] for k in range(K)], axis=1)           # (B, K, C, L)


def restore(y, size, scan_type, scan_count, merge):
    """Inverse of `all_around`: `(B, K, C', L)` -> `(B, C, L)` in row-major order.

    'concate' concatenates the heads along channels (C = K*C'); 'add' sums the directions (C = C').
    """
    scan_type, K, merge = _check_config(scan_type, scan_count, merge)
    y, h, w = _check_sequence(y, size, 4, "y")
    B, Ky, Cp, L = y.shape
    if Ky != K:
        raise ValueError(f"y has {Ky} directions but scan_count is {K}")
    _, inverse = _direction_indices_cached(scan_type, K, h, w)
    back = np.take_along_axis(y, inverse[None, :, None, :], axis=3)        # (B, K, C', L)
    if merge == "concate":
        return back.reshape(B, K * Cp, L)
    return back.sum(axis=1)
