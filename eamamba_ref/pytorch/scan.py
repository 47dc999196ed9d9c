"""Scan orderings and the all-around scan transform (the official ``ScanTransform``).

An *ordering* of an H x W grid is a permutation ``order`` of ``range(H * W)``: the scanned sequence
is ``seq[j] = x[order[j]]`` where pixels are numbered row-major (``i * W + j``).

The all-around transform turns a feature map ``(B, C, L = H*W)`` into K direction sequences
``(B, K, C', L)``: with merge 'concate' direction k gets channels ``[k C/K, (k+1) C/K)`` (C' = C/K),
with merge 'add' every direction gets all C channels (C' = C). Direction k is made, as in the
official code, in three steps applied to the row-major sequence:

1. heads with ``k % 4 in (2, 3)``: transpose the grid (read column-major) when the ordering is
   raster (``scan_type=None``) or ``k >= 4``; otherwise mirror it left-right;
2. odd heads: reverse the sequence;
3. apply the ordering's permutation: on every head, except that with K = 8 only heads 0-3 get it
   (heads 4-7 are the plain raster / column sweeps).

So with the diagonal ordering and K = 8: heads 0-3 are anti-diagonal sweeps starting from the
top-left, bottom-right, top-right and bottom-left corner; heads 4-7 row-major, reversed row-major,
column-major, reversed column-major. Note that step 2 comes before step 3: an odd head is the
ordering of the 180-degree-rotated grid, not the ordering read backwards.

Everything composes into one permutation per head, so applying is a single gather and restoring
a single gather with the inverse permutation (followed by the merge: sum or concatenation).

Cases the official code cannot run, and what this module does instead (documented extensions):
``scan_count=1`` (one head, the ordering alone), ``scan_type=None`` with 8 heads (raster order for
heads 0-3) and Hilbert on a 1 x 1 grid (the single pixel).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "SCAN_TYPES",
    "SCAN_COUNTS",
    "MERGE_METHODS",
    "raster_order",
    "diagonal_order",
    "zigzag_order",
    "zorder_order",
    "morton_order",
    "hilbert_order",
    "hilbert_index",
    "scan_order",
    "direction_orders",
    "ScanTransform",
]

SCAN_TYPES = (None, "diagonal", "zigzag", "zorder", "hilbert")
SCAN_COUNTS = (1, 2, 4, 8)
MERGE_METHODS = ("add", "concate")


def _check_size(h: int, w: int) -> None:
    if int(h) != h or int(w) != w or h < 1 or w < 1:
        raise ValueError(f"grid size must be two positive integers, got ({h}, {w})")


def raster_order(h: int, w: int) -> np.ndarray:
    """Row-major order: the identity permutation, ``(h*w,)`` int64."""
    _check_size(h, w)
    return np.arange(h * w, dtype=np.int64)


def diagonal_order(h: int, w: int) -> np.ndarray:
    """Anti-diagonals ``i + j = s`` for s = 0, 1, ...; within one, top to bottom (row ascending)."""
    _check_size(h, w)
    i, j = np.divmod(np.arange(h * w, dtype=np.int64), w)
    # Stable sort by s, ties by row: a lexicographic key s * h + i does exactly that.
    return np.argsort((i + j) * h + i, kind="stable")


def zigzag_order(h: int, w: int) -> np.ndarray:
    """Anti-diagonals like :func:`diagonal_order`, alternating direction (boustrophedon).

    Anti-diagonal ``s = i + j`` runs bottom-to-top (row descending) when ``s - h`` is even and
    top-to-bottom otherwise; the first one (s = 0) is the corner pixel (0, 0). (The parity rule
    depends on h, as in the official code, which walks diagonals of the row-flipped grid.)
    """
    _check_size(h, w)
    i, j = np.divmod(np.arange(h * w, dtype=np.int64), w)
    s = i + j
    row_key = np.where((s - h) % 2 == 0, h - 1 - i, i)
    return np.argsort(s * h + row_key, kind="stable")


def _spread_bits(v: np.ndarray) -> np.ndarray:
    """Put bit b of v at bit 2b (zeros between): the Morton 'part1by1'."""
    v = v.astype(np.int64)
    out = np.zeros_like(v)
    for bit in range(31):
        out |= ((v >> bit) & 1) << (2 * bit)
    return out


def morton_order(h: int, w: int) -> np.ndarray:
    """True Morton (Z) order: sort by the bit interleave of (row, column), column bits lowest.

    Not what the official 'zorder' computes (see :func:`zorder_order`); kept for comparison.
    """
    _check_size(h, w)
    i, j = np.divmod(np.arange(h * w, dtype=np.int64), w)
    return np.argsort(_spread_bits(j) | (_spread_bits(i) << 1), kind="stable")


# The official bit spreading applies its masks one level too early: shift 8 is masked with
# 0x0000FFFF, 4 with 0x00FF00FF, 2 with 0x0F0F0F0F and 1 with 0x33333333 (a Morton spread pairs
# them 8/0x00FF00FF, 4/0x0F0F0F0F, 2/0x33333333, 1/0x55555555). Bits get duplicated rather than
# spread, so different pixels share a code (e.g. 52 distinct codes on an 8 x 8 grid).
_OFFICIAL_SPREAD_STEPS = ((8, 0x0000FFFF), (4, 0x00FF00FF), (2, 0x0F0F0F0F), (1, 0x33333333))


def _official_zorder_code(v: np.ndarray) -> np.ndarray:
    v = v.astype(np.int64)
    for shift, mask in _OFFICIAL_SPREAD_STEPS:
        v = (v | (v << shift)) & mask
    return v


def zorder_order(h: int, w: int) -> np.ndarray:
    """The official 'zorder' ordering, reproduced exactly (it is not a Morton curve).

    Pixels are sorted by ``code(col) | code(row) << 1`` with the official (mis-masked) bit spread
    above. Codes collide, so the order of tied pixels matters, and it is decided as in the official
    code: by PyTorch's default (unstable) ``argsort`` of the int64 codes, which the official code
    always runs on the CPU (its codes are built from ``torch.arange`` CPU tensors). That sort is
    deterministic; ``eamamba_ref.reference.scans`` reproduces it without PyTorch. For a real Z curve see
    :func:`morton_order`.
    """
    _check_size(h, w)
    i, j = np.divmod(np.arange(h * w, dtype=np.int64), w)
    code = _official_zorder_code(j) | (_official_zorder_code(i) << 1)   # int64, as officially
    return torch.argsort(torch.from_numpy(code)).numpy().astype(np.int64)


def hilbert_index(rows: np.ndarray, cols: np.ndarray, bits: int) -> np.ndarray:
    """Position of points on the 2-D Hilbert curve of a ``2**bits`` square (Skilling, 2004).

    Follows J. Skilling, "Programming the Hilbert curve" (AIP Conf. Proc. 707, 2004): undo the
    excess work of the axes (per bit from the top: invert or exchange low bits), Gray-encode, then
    interleave the bits with the row (axis 0) as the most significant of each pair. This is the
    convention of the ``numpy-hilbert-curve`` package's ``encode(coords, 2, bits)`` that the
    official code uses with ``coords = [row, col]``.
    """
    x = [np.asarray(rows, dtype=np.int64).copy(), np.asarray(cols, dtype=np.int64).copy()]
    if bits < 1:
        raise ValueError(f"bits must be >= 1, got {bits}")
    q = 1 << (bits - 1)
    while q > 1:
        low = q - 1
        for a in range(2):
            on = (x[a] & q) != 0
            # Where the bit is set: invert the low bits of axis 0. Otherwise: swap the low bits of
            # axis 0 and axis a (a no-op for a = 0).
            t = (x[0] ^ x[a]) & low
            x[0] = np.where(on, x[0] ^ low, x[0] ^ t)
            if a:
                x[a] = np.where(on, x[a], x[a] ^ t)
        q >>= 1
    # Gray encode.
    x[1] ^= x[0]
    t = np.zeros_like(x[0])
    q = 1 << (bits - 1)
    while q > 1:
        t = np.where((x[1] & q) != 0, t ^ (q - 1), t)
        q >>= 1
    x[0] ^= t
    x[1] ^= t
    # Interleave: for each bit from the top, axis 0 then axis 1.
    index = np.zeros_like(x[0])
    for bit in range(bits - 1, -1, -1):
        index = (index << 2) | (((x[0] >> bit) & 1) << 1) | ((x[1] >> bit) & 1)
    return index


def hilbert_order(h: int, w: int) -> np.ndarray:
    """Hilbert order: the Hilbert curve of the enclosing power-of-two square, pixels outside skipped.

    A 1 x 1 grid gives ``[0]`` (the official code crashes there).
    """
    _check_size(h, w)
    side = 1
    while side < max(h, w):
        side *= 2
    if side == 1:
        return np.zeros(1, dtype=np.int64)
    i, j = np.divmod(np.arange(h * w, dtype=np.int64), w)
    return np.argsort(hilbert_index(i, j, side.bit_length() - 1), kind="stable")


_ORDERINGS = {
    None: raster_order,
    "diagonal": diagonal_order,
    "zigzag": zigzag_order,
    "zorder": zorder_order,
    "hilbert": hilbert_order,
}


def _normalise_scan_type(scan_type):
    if isinstance(scan_type, str):
        scan_type = scan_type.lower()
    if scan_type not in SCAN_TYPES:
        raise ValueError(f"scan_type must be one of {SCAN_TYPES}, got {scan_type!r}")
    return scan_type


def scan_order(scan_type, h: int, w: int) -> np.ndarray:
    """The ordering named ``scan_type`` (None = raster) of an h x w grid, ``(h*w,)`` int64."""
    return _ORDERINGS[_normalise_scan_type(scan_type)](h, w)


def direction_orders(scan_type, scan_count: int, h: int, w: int) -> np.ndarray:
    """Per-head source indices ``(K, h*w)``: head k reads ``seq_k[j] = x[orders[k, j]]``.

    See the module docstring for the three steps (transpose or mirror, reverse, ordering).
    """
    scan_type = _normalise_scan_type(scan_type)
    if scan_count not in SCAN_COUNTS:
        raise ValueError(f"scan_count must be one of {SCAN_COUNTS}, got {scan_count!r}")
    _check_size(h, w)
    grid = np.arange(h * w, dtype=np.int64).reshape(h, w)
    ordering = scan_order(scan_type, h, w)
    heads = []
    for k in range(scan_count):
        seq = grid.reshape(-1)                                     # row-major
        if k % 4 in (2, 3):
            seq = grid.T.reshape(-1) if (scan_type is None or k >= 4) else grid[:, ::-1].reshape(-1)
        if k % 2 == 1:
            seq = seq[::-1]
        if scan_count != 8 or k < 4:
            seq = seq[ordering]
        heads.append(seq)
    return np.stack(heads)


class ScanTransform:
    """All-around scan: ``(B, C, L)`` -> ``(B, K, C', L)`` and back (see module docstring).

    Attributes ``scan_type``, ``scan_count``, ``merge_method`` as in the official class. Index
    tensors are computed once per grid size and cached.
    """

    def __init__(self, scan_type, scan_count: int, merge_method: str | None = "concate"):
        self.scan_type = _normalise_scan_type(scan_type)
        if scan_count not in SCAN_COUNTS:
            raise ValueError(f"scan_count must be one of {SCAN_COUNTS}, got {scan_count!r}")
        if scan_count > 1 and merge_method not in MERGE_METHODS:
            raise ValueError(f"scan_merge_method must be one of {MERGE_METHODS}, got {merge_method!r}")
        self.scan_count = scan_count
        # With one head there is nothing to merge; 'concate' and 'add' coincide.
        self.merge_method = merge_method if merge_method in MERGE_METHODS else "concate"
        self._cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def heads_channels(self, channels: int) -> int:
        """Channels per head C' for C input channels (raises if 'concate' cannot split C)."""
        if self.merge_method == "add":
            return channels
        if channels % self.scan_count != 0:
            raise ValueError(
                f"'concate' needs channels divisible by scan_count={self.scan_count}, got {channels}"
            )
        return channels // self.scan_count

    def indices(self, size) -> tuple[torch.Tensor, torch.Tensor]:
        """``(orders, inverse)``, both ``(K, L)`` int64: gather with ``orders`` to scan, ``inverse`` to restore."""
        h, w = (int(s) for s in size)
        key = (h, w)
        if key not in self._cache:
            orders = direction_orders(self.scan_type, self.scan_count, h, w)
            inverse = np.argsort(orders, axis=1)
            self._cache[key] = (torch.from_numpy(orders), torch.from_numpy(inverse))
        return self._cache[key]

    def apply(self, x: torch.Tensor, size) -> torch.Tensor:
        """``x (B, C, L)`` row-major -> ``(B, K, C', L)`` direction sequences."""
        if x.dim() != 3 or x.shape[2] != int(size[0]) * int(size[1]):
            raise ValueError(f"expected (B, C, L={size[0]}*{size[1]}), got {tuple(x.shape)}")
        B, C, L = x.shape
        K = self.scan_count
        Cp = self.heads_channels(C)
        orders, _ = self.indices(size)
        if self.merge_method == "add":
            heads = x[:, None].expand(B, K, C, L)                  # every head sees all channels
        else:
            heads = x.reshape(B, K, Cp, L)                         # head k: its own channel slice
        return torch.take_along_dim(heads, orders.to(x.device)[None, :, None, :], dim=3)

    def restore(self, y: torch.Tensor, size) -> torch.Tensor:
        """``y (B, K, C', L)`` direction sequences -> ``(B, C, L)`` row-major, merged."""
        K = self.scan_count
        if y.dim() != 4 or y.shape[1] != K or y.shape[3] != int(size[0]) * int(size[1]):
            raise ValueError(f"expected (B, K={K}, C', L={size[0]}*{size[1]}), got {tuple(y.shape)}")
        B, _, Cp, L = y.shape
        _, inverse = self.indices(size)
        y = torch.take_along_dim(y, inverse.to(y.device)[None, :, None, :], dim=3)
        if self.merge_method == "add":
            return y.sum(dim=1)                                    # (B, C, L)
        return y.reshape(B, K * Cp, L)                             # (B, C, L)

    # The official method names.
    apply_scan_transform = apply
    restore_scan_transform = restore
