"""Draw scan orderings as paths over the pixel grid (matplotlib).

    python -m eamamba_ref.draw -o scans.png                  # every ordering + the 8 diagonal heads
    python -m eamamba_ref.draw --scan hilbert --count 4 --size 16 16 -o hilbert4.png

The path runs from a green dot (step 0) to a red square (last step), coloured from dark to bright
with the step index, so a reader sees where two pixels that are neighbours in 2-D end up far apart
in the 1-D sequence -- the "local pixel forgetting" that the all-around scan is designed to fix.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from eamamba_ref.reference import scans


def plot_path(ax, order, height, width, title=""):
    """Draw one ordering `order` (int `(H*W,)`, step -> row-major pixel) on a matplotlib axis."""
    from matplotlib.collections import LineCollection

    rows, cols = np.divmod(np.asarray(order), width)
    points = np.stack([cols, rows], axis=1).astype(float)
    segments = np.stack([points[:-1], points[1:]], axis=1)
    steps = np.linspace(0.0, 1.0, max(len(segments), 1))
    ax.add_collection(LineCollection(segments, cmap="viridis", array=steps, linewidths=1.8))
    ax.scatter(cols, rows, s=6, c="0.6", zorder=2)
    ax.plot(points[0, 0], points[0, 1], "o", color="tab:green", ms=7, zorder=3)
    ax.plot(points[-1, 0], points[-1, 1], "s", color="tab:red", ms=6, zorder=3)
    ax.set_xlim(-0.7, width - 0.3)
    ax.set_ylim(height - 0.3, -0.7)                  # row 0 at the top, like an image
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)


def _label(scan_type):
    return "raster" if scan_type is None else scan_type


def figure_orderings(size=(8, 8)):
    """One panel per ordering (raster, diagonal, zigzag, zorder, hilbert, morton)."""
    import matplotlib.pyplot as plt

    h, w = size
    types = list(scans.SCAN_TYPES) + list(scans.EXTRA_SCAN_TYPES)
    fig, axes = plt.subplots(1, len(types), figsize=(2.4 * len(types), 2.6))
    for ax, t in zip(axes, types):
        plot_path(ax, scans.scan_order(t, h, w), h, w, _label(t))
    fig.suptitle(f"Scan orderings on a {h}x{w} grid (green: first step, red: last)", fontsize=10)
    fig.tight_layout()
    return fig


def figure_directions(scan_type="diagonal", scan_count=8, size=(8, 8)):
    """One panel per all-around direction k of a configuration."""
    import matplotlib.pyplot as plt

    h, w = size
    table = scans.direction_indices(scan_type, scan_count, size)
    cols = min(scan_count, 4)
    nrows = (scan_count + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(2.4 * cols, 2.6 * nrows), squeeze=False)
    for k, ax in enumerate(axes.flat):
        if k < scan_count:
            plot_path(ax, table[k], h, w, f"head {k}")
        else:
            ax.axis("off")
    fig.suptitle(f"All-around {_label(scans.canonical_scan_type(scan_type))} scan, "
                 f"{scan_count} directions, {h}x{w}", fontsize=10)
    fig.tight_layout()
    return fig


def save_figure(fig, path, overwrite=False):
    """Write `fig` to `path` atomically (temp file + rename); refuse to replace a file unless asked."""
    from eamamba_ref.io.atomic import atomic_output
    with atomic_output(path, overwrite, suffix=os.path.splitext(path)[1] or ".png", error=FileExistsError) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", pad_inches=0.08)   # never clip a title


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m eamamba_ref.draw", description=__doc__.split("\n")[0])
    parser.add_argument("--scan", default=None,
                        help="draw the all-around directions of this ordering (diagonal, zigzag, "
                             "zorder, hilbert, morton, raster); default: every ordering and the "
                             "8 diagonal heads")
    parser.add_argument("--count", type=int, default=8, help="number of directions (1, 2, 4, 8)")
    parser.add_argument("--size", type=int, nargs=2, default=(8, 8), metavar=("H", "W"))
    parser.add_argument("-o", "--output", default="scans.png", help="PNG to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = parser.parse_args(argv)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    try:
        size = tuple(args.size)
        if args.scan is None:
            figs = [figure_orderings(size), figure_directions("diagonal", 8, size)]
            paths = [args.output, _suffixed(args.output, "_diagonal8")]
        else:
            figs = [figure_directions(args.scan, args.count, size)]
            paths = [args.output]
        for fig, path in zip(figs, paths):
            save_figure(fig, path, args.overwrite)
            plt.close(fig)
            print(f"wrote {path}")
    except (ValueError, FileExistsError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def _suffixed(path, suffix):
    root, ext = os.path.splitext(path)
    return f"{root}{suffix}{ext or '.png'}"
