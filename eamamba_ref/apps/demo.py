"""The demo of `python -m eamamba_ref.restore` without inputs: a bundled sample, degraded for the
task (noise, or shrunk for super-resolution), restored, and shown next to the clean original.

Writes `eamamba_demo_<task>.png` (the result) and `eamamba_demo_<task>_comparison.png` (degraded |
restored | clean, PSNR in the titles) into -o, default `eamamba_demo/` in the current folder.
"""
from __future__ import annotations

import os

import numpy as np

from eamamba_ref.io.images import Image, ImageError, read_image, write_image
from eamamba_ref.apps.metrics import psnr
from eamamba_ref.apps.pipeline import add_noise, check_outputs, output_folder, restore_images

SAMPLE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "kodim23_crop.png")
DEMO_DIR = "eamamba_demo"          # where the demo writes without -o (in the current folder)


def run_demo(task, models, args):
    """No input given: degrade the bundled sample, restore it, write result + comparison PNGs
    (into -o, default `eamamba_demo/` in the current folder)."""
    clean = read_image(SAMPLE)
    if task.name == "denoise" or (task.scale == 1 and args.sigma is not None):
        degraded = add_noise(clean, 25 if args.sigma is None else args.sigma, args.seed)
        label = f"noisy (sigma {25 if args.sigma is None else args.sigma:g})"
    elif task.scale > 1:
        from skimage.transform import rescale
        small = rescale(clean.pixels, 1 / task.scale, channel_axis=2, anti_aliasing=True, order=3)
        degraded = Image(pixels=small.astype(np.float32), alpha=None, bit_depth=8)
        label = f"input (1/{task.scale} size)"
    else:
        degraded, label = clean, "input"
    out_dir = output_folder(args.output or DEMO_DIR)
    result = os.path.join(out_dir, f"eamamba_demo_{task.name}.png")
    comparison = os.path.join(out_dir, f"eamamba_demo_{task.name}_comparison.png")
    check_outputs([([SAMPLE], result), ([SAMPLE], comparison)], args.overwrite)
    out, _ = restore_images(task, models, [degraded], tile=args.tile, overlap=args.tile_overlap,
                            ensemble=args.ensemble)
    write_image(result, out, 8, overwrite=args.overwrite)
    shown = degraded.pixels
    if task.scale > 1:                     # show the low-resolution input at the output's size
        shown = np.repeat(np.repeat(shown, task.scale, 0), task.scale, 1)[: out.shape[0], : out.shape[1]]
    score_in = psnr(shown, clean.pixels) if shown.shape == clean.pixels.shape else None
    score_out = psnr(out, clean.pixels)
    write_comparison(comparison, [(label, shown), (f"EAMamba {task.name}", out), ("clean", clean.pixels)],
                     [score_in, score_out, None], args.overwrite)
    print(f"demo on the bundled sample ({os.path.basename(SAMPLE)}): {label}"
          + (f" {score_in:.2f} dB" if score_in is not None else "") + f" -> restored {score_out:.2f} dB PSNR")
    print(f"wrote {result}\nwrote {comparison}")


def write_comparison(path, panels, scores, overwrite):
    """Side-by-side PNG of (title, image) panels with PSNR in the titles."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from eamamba_ref.apps.draw import save_figure

    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.5))
    for ax, (title, img), score in zip(axes, panels, scores):
        ax.imshow(np.clip(img, 0, 1).squeeze(), cmap="gray" if img.shape[2] == 1 else None, interpolation="nearest")
        ax.set_title(title + (f"\n{score:.2f} dB" if score is not None else "\n"), fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    try:
        save_figure(fig, path, overwrite)
    except FileExistsError as err:
        raise ImageError(str(err)) from None
    finally:
        plt.close(fig)
