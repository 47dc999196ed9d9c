"""Restore images with EAMamba, on a laptop, without PyTorch or a GPU.

    python -m eamamba_ref.restore                          # demo: bundled sample + noise -> cleaned
    python -m eamamba_ref.restore photo.png --task denoise # -> photo_denoise.png next to it
    python -m eamamba_ref.restore a.png b.tif --task sr2 -o out/
    python -m eamamba_ref.restore left.png right.png --task defocus-deblur --weights dpdd.pth
    python -m eamamba_ref.restore big.tif --task denoise --tile 256 --tile-overlap 32

Tasks follow the official model zoo (see --list-tasks). Those with bundled demo weights run out
of the box; the others need --weights (an official .pth or a converted .npz) and say how to get it.
Outputs keep the input's bit depth and alpha channel; existing files are never overwritten
unless --overwrite is given.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from . import inference, ssm
from .checkpoint import CheckpointError
from .config import ConfigError
from .images import Image, ImageError, read_image, write_image
from .layers import bicubic_upsample
from .loading import load
from .tasks import TASKS

SAMPLE = os.path.join(os.path.dirname(__file__), "data", "kodim23_crop.png")


class RestoreError(ValueError):
    """A request the restore command cannot serve (one line for the user)."""


def load_task_model(task, weights=None, backend=None):
    """The model for `task`: from `weights` (official .pth / converted .npz) or the bundled demo."""
    if weights is None:
        path = task.bundled_path()
        if path is None:
            raise RestoreError(task.weights_help())
        if not os.path.exists(path):
            raise RestoreError(f"bundled weights {path} are missing from this installation; reinstall "
                               f"eamamba_ref or pass --weights")
    else:
        path = weights
        if not os.path.exists(path):
            raise RestoreError(f"{path}: no such weights file")
    model = load(path, backend=backend)
    cfg = model.config
    if cfg.name != task.model:
        raise RestoreError(f"{path} holds an {cfg.name} model, but task '{task.name}' needs an {task.model} model "
                           f"(official configs/{task.official_config}.yaml)")
    if cfg.name == "eamambasr" and cfg.upscale != task.scale:
        raise RestoreError(f"{path} is an x{cfg.upscale} super-resolution model, task '{task.name}' is x{task.scale}")
    if task.inputs == 2 and cfg.inp_channels != 6:
        raise RestoreError(f"{path} takes {cfg.inp_channels} input channels; '{task.name}' needs a dual-pixel "
                           f"model (6 channels: left and right views)")
    if task.inputs == 1 and cfg.inp_channels != 3:
        raise RestoreError(f"{path} takes {cfg.inp_channels} input channels; '{task.name}' needs an RGB model "
                           f"(3 channels)" + (" — this looks like a dual-pixel model: use --task defocus-deblur"
                                              if cfg.inp_channels == 6 else ""))
    return model


def to_model_input(images, task):
    """Images -> `(1, C, H, W)`: grayscale is replicated to RGB; the dual-pixel views are stacked."""
    planes = []
    for im in images:
        px = im.pixels
        if px.shape[2] == 1:
            px = np.repeat(px, 3, axis=2)
        planes.append(px.transpose(2, 0, 1))
    x = np.ascontiguousarray(np.concatenate(planes, axis=0)[None], dtype=np.float32)
    if task.pre_upsample:                # RealSR models restore a bicubic-upsampled LR image
        x = bicubic_upsample(x, task.scale)
    return x


def restore_array(model, x, tile=None, overlap=32, use_ensemble=False, progress=None):
    """Model output for `x (1, C, H, W)` with padding, optional tiling and self-ensemble."""
    def run(inp):
        return inference.tiled(model, inp, tile, overlap, progress)
    return inference.ensemble(run, x) if use_ensemble else run(x)


def from_model_output(y, like: Image, scale):
    """`(1, 3, H', W')` -> `(H', W', C)` matching the input's channels; alpha resized if needed."""
    out = y[0].transpose(1, 2, 0)
    if like.pixels.shape[2] == 1:
        out = out.mean(axis=2, keepdims=True)
    alpha = like.alpha
    if alpha is not None and scale != 1:       # alpha is not restored: nearest-neighbour resize
        alpha = np.repeat(np.repeat(alpha, scale, axis=0), scale, axis=1)
    return out, alpha


def add_noise(image: Image, sigma, seed):
    """Seeded gaussian noise of std sigma/255 (like the official test: no clipping of the input)."""
    rng = np.random.default_rng(seed)
    noisy = image.pixels + rng.standard_normal(image.pixels.shape).astype(np.float32) * np.float32(sigma / 255.0)
    return Image(pixels=noisy, alpha=image.alpha, bit_depth=image.bit_depth, path=image.path)


def default_output(input_path, task, out_dir=None):
    root, ext = os.path.splitext(os.path.basename(input_path))
    ext = ".png" if ext.lower() in (".jpg", ".jpeg") else ext    # no second lossy encoding
    return os.path.join(out_dir or os.path.dirname(os.path.abspath(input_path)), f"{root}_{task.name}{ext}")


def _progress_bar(total, desc):
    if total <= 1:
        return None, None
    from tqdm import tqdm
    bar = tqdm(total=total, desc=desc, unit="tile", leave=False)
    return bar, bar.update


def psnr(a, b):
    mse = float(np.mean((np.clip(a, 0, 1).astype(np.float64) - np.clip(b, 0, 1)) ** 2))
    return 10 * np.log10(1.0 / max(mse, 1e-12))


def run_demo(task, model, args):
    """No input given: degrade the bundled sample, restore it, write result + comparison PNGs."""
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
    y = restore_array(model, to_model_input([degraded], task), args.tile, args.tile_overlap, args.ensemble)
    out, _ = from_model_output(y, degraded, task.scale)
    out_dir = args.output or "."
    os.makedirs(out_dir, exist_ok=True)
    result = os.path.join(out_dir, f"eamamba_demo_{task.name}.png")
    comparison = os.path.join(out_dir, f"eamamba_demo_{task.name}_comparison.png")
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

    from .draw import save_figure

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


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m eamamba_ref.restore", description=__doc__.split("\n")[0],
                                 epilog="Tasks: " + ", ".join(TASKS))
    ap.add_argument("inputs", nargs="*", help="image files (PNG, JPEG, TIFF); none: run the demo on a bundled sample")
    ap.add_argument("--task", default="denoise", choices=list(TASKS), metavar="TASK",
                    help="restoration task (default: denoise); --list-tasks shows them")
    ap.add_argument("-o", "--output", "--out", help="output file (one input) or folder")
    ap.add_argument("--weights", help="official checkpoint (.pth) or converted file (.npz)")
    ap.add_argument("--sigma", type=float, help="add gaussian noise of this std (0-255 scale) first")
    ap.add_argument("--seed", type=int, default=0, help="seed of --sigma noise (default 0)")
    ap.add_argument("--tile", type=int, help="run on overlapping tiles of this size (bounds memory)")
    ap.add_argument("--tile-overlap", type=int, default=32, help="overlap of tiles in pixels (default 32)")
    ap.add_argument("--ensemble", action="store_true", help="average over the 4 flips (official self-ensemble)")
    ap.add_argument("--backend", choices=["numpy", "numba", "cuda"], help="numba (default) / numpy: CPU kernels; cuda: the whole model on the GPU (opt-in: not yet verified on GPU hardware)")
    ap.add_argument("--overwrite", action="store_true", help="replace existing output files")
    ap.add_argument("--list-tasks", action="store_true", help="list the tasks and their weights, then exit")
    # cluster mode (eamamba_ref.distributed): on for folders/globs, --scheduler, --workers or --chunk
    ap.add_argument("--scheduler", help="Dask scheduler address, or 'local' (default for folders/globs)")
    ap.add_argument("--workers", type=int, help="workers of the local Dask cluster (default: one per core)")
    ap.add_argument("--chunk", type=int, help="restore TIFFs larger than memory in chunks of this size (Dask)")
    args = ap.parse_args(argv)

    if args.list_tasks:
        for t in TASKS.values():
            print(f"{t.name:15s} {t.description}" + ("  [bundled demo weights]" if t.bundled else ""))
        return 0
    task = TASKS[args.task]
    try:
        if args.tile is not None and (args.tile < 8 or not 0 <= args.tile_overlap < args.tile):
            raise RestoreError(f"--tile must be >= 8 and --tile-overlap in [0, tile), got {args.tile}, {args.tile_overlap}")
        backend = args.backend or default_backend()
        if backend == "cuda":
            ssm.note_cuda_unverified(sys.stderr)
        model = load_task_model(task, args.weights, backend)
        if not args.inputs:
            run_demo(task, model, args)
            return 0
        from .distributed import run_command, wants_cluster
        if wants_cluster(args):
            return run_command(task, args, backend)
        groups = [args.inputs] if task.inputs == 2 else [[p] for p in args.inputs]
        if task.inputs == 2 and len(args.inputs) != 2:
            raise RestoreError(f"task '{task.name}' takes exactly two inputs (left and right dual-pixel views), "
                               f"got {len(args.inputs)}")
        if len(groups) > 1 and args.output and os.path.splitext(args.output)[1]:
            raise RestoreError("several inputs need -o to be a folder, not a file name")
        for group in groups:
            restore_files(task, model, group, args)
    except (RestoreError, ImageError, CheckpointError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def restore_files(task, model, paths, args):
    images = [read_image(p) for p in paths]
    if len(images) == 2 and images[0].pixels.shape != images[1].pixels.shape:
        raise RestoreError(f"the two dual-pixel views differ in size: {images[0].pixels.shape} vs {images[1].pixels.shape}")
    if args.sigma is not None:
        images = [add_noise(im, args.sigma, args.seed) for im in images]
    first = images[0]
    if args.output and (len(paths) == 1 or task.inputs == 2) and os.path.splitext(args.output)[1]:
        out_path = args.output
    else:
        if args.output:
            os.makedirs(args.output, exist_ok=True)
        out_path = default_output(paths[0], task, args.output)
    if os.path.abspath(out_path) in {os.path.abspath(p) for p in paths}:
        raise RestoreError(f"{out_path} is an input file; refusing to overwrite it")
    if os.path.exists(out_path) and not args.overwrite:
        raise RestoreError(f"{out_path} exists; refusing to overwrite it (pass --overwrite)")
    x = to_model_input(images, task)
    H, W = x.shape[2:]
    total = inference.n_tiles(H, W, args.tile, args.tile_overlap) * (4 if args.ensemble else 1)
    bar, update = _progress_bar(total, os.path.basename(paths[0]))
    try:
        y = restore_array(model, x, args.tile, args.tile_overlap, args.ensemble, update)
    finally:
        if bar is not None:
            bar.close()
    out, alpha = from_model_output(y, first, task.scale)      # alpha follows the output's size
    write_image(out_path, out, first.bit_depth, alpha, overwrite=args.overwrite)
    print(f"{' + '.join(paths)} -> {out_path}")


def default_backend():
    """Numba's CPU kernels, even where a GPU is present: 'cuda' is opt-in (--backend cuda) until
    benchmarks/gpu_check.py has passed on a real GPU (ssm.CUDA_VERIFIED_ON_HARDWARE)."""
    return "numba"


if __name__ == "__main__":
    sys.exit(main())
