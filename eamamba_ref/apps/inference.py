"""Running a model on whole images: padding, overlapping tiles, and the flip self-ensemble.

Every function maps an input `(B, C, H, W)` float32 array to the model's output
`(B, C_out, s*H, s*W)` (s = the model's scale) for ANY H, W:

- `padded`: the U-Net needs H, W divisible by 8; like the official test script, the image is
  extended at the bottom and right by mirror reflection (cv2.BORDER_REFLECT, numpy 'symmetric')
  and the output cropped back.
- `tiled`: overlapping tiles of at most `tile` x `tile` input pixels, each run through `padded`,
  so peak memory follows the tile size, not the image size. The tiles are spread evenly (every
  overlap at least `overlap`, none larger than needed) and blended with raised-cosine weights
  across each overlap, normalised by their sum, so the output has no seams. A tile that covers
  the whole image is exactly the untiled result; smaller tiles differ from it by a bounded amount
  (the model sees less context near a tile's edge; docs/usage.md gives measured figures). The
  result is deterministic: the same tiles are summed in the same order every time.
- `ensemble`: the official test script's self-ensemble: the mean of the outputs for the input,
  its left-right flip, its up-down flip and both, each flipped back.
"""
from __future__ import annotations

import numpy as np

from eamamba_ref.runtime.allocator import reuse_freed_memory


def padded(model, x, multiple=8):
    """model(x) for any H, W: mirror-pad bottom/right to a multiple, run, crop. x: `(B, C, H, W)`."""
    B, C, H, W = x.shape
    if getattr(model, "config", None) is not None and model.config.name == "eamambasr":
        return model(x)                                  # the SR model takes any size
    ph, pw = (-H) % multiple, (-W) % multiple
    if ph or pw:
        # 'symmetric' repeats the edge pixel (cv2.BORDER_REFLECT); it needs pad <= size, so tiny
        # inputs are padded in steps
        xp = x
        while xp.shape[2] < H + ph or xp.shape[3] < W + pw:
            need_h = min(H + ph - xp.shape[2], xp.shape[2])
            need_w = min(W + pw - xp.shape[3], xp.shape[3])
            xp = np.pad(xp, ((0, 0), (0, 0), (0, need_h), (0, need_w)), mode="symmetric")
        x = np.ascontiguousarray(xp)
    y = model(x)
    s = y.shape[2] // x.shape[2]
    return y[:, :, : s * H, : s * W]


def _starts(size, tile, overlap):
    """Tile start offsets along one axis: the fewest tiles whose overlaps are all >= `overlap`,
    spread evenly from 0 to `size - tile` (the last tile flush with the end).

    Spreading them evenly (rather than stepping by `tile - overlap` and squeezing the last tile
    against the end) costs no extra tile and gives every seam the same, larger overlap.
    """
    if tile >= size:
        return [0]
    n = -(-(size - overlap) // (tile - overlap))             # ceil: tiles needed
    span = size - tile
    return [(i * span + (n - 1) // 2) // (n - 1) for i in range(n)]    # integer rounding


def _ramp(length, before, after):
    """1-D blending weight of a tile: raised-cosine ramps over the overlaps with its neighbours.

    Over an overlap of n pixels the rising ramp is sin^2(pi (k + 1/2) / (2n)), k = 0..n-1, and the
    neighbour's falling ramp over the same pixels is cos^2 of the same angle: the two sum to 1, rise
    smoothly (no kink where the overlap starts), and give a tile's outermost pixels, the ones
    with the least context, the least weight. Never zero, so the normalising sum never is.
    """
    w = np.ones(length, np.float64)
    if before:
        w[:before] = np.sin(np.pi * (np.arange(before) + 0.5) / (2 * before)) ** 2
    if after:
        falling = np.sin(np.pi * (np.arange(after, 0, -1) - 0.5) / (2 * after)) ** 2
        w[length - after:] = np.minimum(w[length - after:], falling)
    return w.astype(np.float32)


def tile_grid(H, W, tile, overlap):
    """The (y, x) start of every tile of an H x W image."""
    if tile is None:
        return [(0, 0)]
    return [(y, x) for y in _starts(H, tile, overlap) for x in _starts(W, tile, overlap)]


def tiled(model, x, tile=None, overlap=32, progress=None):
    """model(x) over overlapping tiles of `tile` x `tile` input pixels (None: one piece).

    `progress(n)` is called after each tile (e.g. a tqdm bar's update).
    """
    B, C, H, W = x.shape
    if tile is None or (tile >= H and tile >= W):
        y = padded(model, x)
        if progress:
            progress(1)
        return y
    if tile < 8 or not 0 <= overlap < tile:
        raise ValueError(f"tile must be >= 8 and overlap in [0, tile), got tile {tile}, overlap {overlap}")
    ys, xs = _starts(H, tile, overlap), _starts(W, tile, overlap)
    out = weight = None
    with reuse_freed_memory():        # the tiles' activations reuse each other's memory
        for i, y0 in enumerate(ys):
            for j, x0 in enumerate(xs):
                th, tw = min(tile, H), min(tile, W)
                piece = padded(model, np.ascontiguousarray(x[:, :, y0:y0 + th, x0:x0 + tw]))
                s = piece.shape[2] // th
                if out is None:
                    out = np.zeros((B, piece.shape[1], s * H, s * W), np.float32)
                    weight = np.zeros((s * H, s * W), np.float32)
                # ramp only where this tile overlaps a neighbour
                up = (ys[i - 1] + th - y0) * s if i > 0 else 0
                down = (y0 + th - ys[i + 1]) * s if i + 1 < len(ys) else 0
                left = (xs[j - 1] + tw - x0) * s if j > 0 else 0
                right = (x0 + tw - xs[j + 1]) * s if j + 1 < len(xs) else 0
                w = np.outer(_ramp(s * th, up, down), _ramp(s * tw, left, right))
                out[:, :, s * y0:s * (y0 + th), s * x0:s * (x0 + tw)] += piece * w
                weight[s * y0:s * (y0 + th), s * x0:s * (x0 + tw)] += w
                if progress:
                    progress(1)
    return out / weight


FLIPS = [(), (3,), (2,), (2, 3)]     # identity, left-right, up-down, both (official test.py)


def ensemble(run, x):
    """Mean of run(flip(x)) flipped back, over the four flips of the official self-ensemble."""
    total = None
    for axes in FLIPS:
        xf = np.ascontiguousarray(np.flip(x, axes)) if axes else x
        y = run(xf)
        y = np.flip(y, axes) if axes else y
        total = y.copy() if total is None else total + y
    return total / np.float32(len(FLIPS))


def n_tiles(H, W, tile, overlap):
    return len(tile_grid(H, W, tile, overlap)) if tile is not None and (tile < H or tile < W) else 1
