"""Restore images with EAMamba, on a laptop, without PyTorch or a GPU.

    python -m eamamba_ref.restore                          # demo: bundled sample + noise -> eamamba_demo/
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
import threading

import numpy as np

from . import inference, ssm
from .atomic import check_destination, check_writable
from .errors import RestoreError, command
from .images import MAX_PIXELS, Image, ImageError, check_output, is_gray, read_image, write_image
from .layers import bicubic_upsample
from .loading import load
from .metrics import psnr
from .tasks import TASKS, check_task

SAMPLE = os.path.join(os.path.dirname(__file__), "data", "kodim23_crop.png")
DEMO_DIR = "eamamba_demo"          # where the demo writes without -o (in the current folder)

# RestoreError is imported from errors.py (and re-exported here): see that module for why.


def load_task_model(task, weights=None, backend=None, channels=3):
    """The model for `task`: from `weights` (official .pth / converted .npz) or the bundled demo
    (`channels` 1: the task's bundled gray model)."""
    if weights is None:
        path = task.bundled_path(channels)
        if path is None:
            raise RestoreError(task.weights_help())
        if not os.path.exists(path):
            raise RestoreError(f"bundled weights {path} are missing from this installation; reinstall "
                               f"eamamba_ref or pass --weights")
    else:
        path = weights
        if not os.path.exists(path):
            raise RestoreError(f"{path}: no such weights file")
        if os.path.isdir(path):
            raise RestoreError(f"{path} is a folder; --weights takes a weights file (official .pth or converted .npz)")
    model, info = load(path, backend=backend, return_info=True)
    check_task(info.get("meta"), task)          # weights that record another task: refused
    cfg = model.config
    if cfg.name != task.model:
        raise RestoreError(f"{path} holds an {cfg.name} model, but task '{task.name}' needs an {task.model} model "
                           f"(official configs/{task.official_config}.yaml)")
    if cfg.name == "eamambasr" and cfg.upscale != task.scale:
        raise RestoreError(f"{path} is an x{cfg.upscale} super-resolution model, task '{task.name}' is x{task.scale}")
    if task.inputs == 2 and cfg.inp_channels != 6:
        raise RestoreError(f"{path} takes {cfg.inp_channels} input channels; '{task.name}' needs a dual-pixel "
                           f"model (6 channels: left and right views)")
    if task.inputs == 1 and cfg.inp_channels not in (1, 3):
        raise RestoreError(f"{path} takes {cfg.inp_channels} input channels; '{task.name}' needs an RGB (3) or "
                           f"gray (1) model" + (" — this looks like a dual-pixel model: use --task defocus-deblur"
                                                if cfg.inp_channels == 6 else ""))
    return model


class TaskModels:
    """The models one run may use, each loaded once, on first use: the given weights, or the
    task's bundled colour model and, for gray images, its bundled gray model.

    Why two bundled models: a gray photo fed to a colour model as (g, g, g) carries one noise
    field copied into three channels, a noise the colour model never saw; it comes back noisy.
    """

    def __init__(self, task, weights=None, backend=None):
        self.task, self.weights, self.backend = task, weights, backend
        self._loaded = {}
        self._lock = threading.Lock()           # Dask worker threads share one TaskModels

    def _load(self, channels):
        key = None if self.weights is not None else channels
        with self._lock:
            if key not in self._loaded:
                self._loaded[key] = load_task_model(self.task, self.weights, self.backend, channels)
            return self._loaded[key]

    def check(self):
        """Load the given weights now (a bad file fails before any image is read)."""
        if self.weights is not None:
            self._load(None)

    def pick(self, image: Image, path="the image"):
        """The model for `image`: gray images (one channel, or three equal ones) go to a 1-channel
        model where there is one; a 1-channel model refuses colour images."""
        return self.for_channels(1 if self.task.inputs == 1 and is_gray(image.pixels) else 3, path)

    def for_channels(self, channels, path="the image"):
        """The model for images of `channels` colour channels (1: gray, 3: RGB)."""
        if self.weights is None:
            return self._load(1 if channels == 1 and self.task.bundled_gray else 3)
        model = self._load(None)
        if model.config.inp_channels == 1 and channels != 1:
            raise RestoreError(f"{self.weights} is a gray (1-channel) model and {path} is a colour image")
        return model


def as_model_channels(image: Image, channels):
    """`image` with the pixels a `channels`-channel model reads: a gray image saved as RGB (three
    equal channels) becomes one channel for a gray model; alpha and bit depth are kept."""
    if channels == 1 and image.pixels.shape[2] == 3:
        return Image(pixels=np.ascontiguousarray(image.pixels[..., :1]), alpha=image.alpha,
                     bit_depth=image.bit_depth, path=image.path)
    return image


def to_model_input(images, task, channels=3):
    """Images -> `(1, C, H, W)`: gray is replicated to RGB for a colour (`channels` 3) model; the
    dual-pixel views are stacked."""
    planes = []
    for im in images:
        px = im.pixels
        if px.shape[2] == 1 and channels == 3:
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
    """`(1, C', H', W')` -> `(H', W', C)` with the input's C channels (a colour output of a gray
    input is averaged, a gray output of an RGB input repeated); alpha resized if needed."""
    out = y[0].transpose(1, 2, 0)
    if like.pixels.shape[2] == 1 and out.shape[2] == 3:
        out = out.mean(axis=2, keepdims=True)
    elif like.pixels.shape[2] == 3 and out.shape[2] == 1:
        out = np.repeat(out, 3, axis=2)
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
    ext = ext if ext.lower() in (".png", ".tif", ".tiff") else ".png"   # no second lossy encoding; .gif, .bmp, ...: PNG
    return os.path.join(out_dir or os.path.dirname(os.path.abspath(input_path)), f"{root}_{task.name}{ext}")


def names_a_file(output):
    """Whether -o/--out names an output file (it has an extension and is not an existing folder)."""
    return bool(output) and not os.path.isdir(output) and bool(os.path.splitext(output)[1])


def output_folder(output):
    """Create the output folder -o names (if needed); one-line error if it is an existing file."""
    if os.path.lexists(output) and not os.path.isdir(output):
        raise RestoreError(f"{output} exists and is not a folder (an -o/--out without an extension names an "
                           f"output folder; give a file name with an extension, e.g. out.png)")
    os.makedirs(output, exist_ok=True)
    return output


def plan_outputs(groups, task, output=None):
    """`(inputs, output path)` for each group of inputs, refusing two groups with one output.

    `output` (-o): a file name for a single group, else a folder (created) or None (next to the
    first input, named `<input>_<task>`). Nothing is written; the caller checks the paths."""
    if names_a_file(output):
        if len(groups) > 1:
            raise RestoreError("several inputs need -o to be a folder, not a file name")
        return [(groups[0], output)]
    if output:
        output_folder(output)
    plan, seen = [], {}
    for group in groups:
        dst = default_output(group[0], task, output)
        key = os.path.abspath(dst)
        if key in seen:
            raise RestoreError(f"{seen[key]} and {group[0]} would both be written to {dst}; restore them into "
                               f"different -o/--out folders")
        seen[key] = group[0]
        plan.append((group, dst))
    return plan


def check_outputs(plan, overwrite):
    """Before any work: every output may be written (not an input, not existing unless
    `overwrite`, its folder exists and takes files)."""
    inputs = [p for group, _ in plan for p in group]
    for _, dst in plan:
        check_destination(dst, overwrite, inputs)
    for folder in sorted({os.path.dirname(os.path.abspath(dst)) for _, dst in plan}):
        check_writable(folder)


def _progress_bar(total, desc):
    if total <= 1:
        return None, None
    from tqdm import tqdm
    bar = tqdm(total=total, desc=desc, unit="tile", leave=False)
    return bar, bar.update


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


@command
def main(argv=None):
    """The restore command; returns the exit status (errors: one line on stderr, see errors.command)."""
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
    ap.add_argument("--backend", choices=["numpy", "numba", "cuda"], help="cuda: the whole model on the GPU (default where numba-cuda sees one); numba (default otherwise) / numpy: CPU kernels")
    ap.add_argument("--overwrite", action="store_true", help="replace existing output files")
    ap.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                    help=f"refuse larger images before decoding them (default {MAX_PIXELS}, 8192x8192)")
    ap.add_argument("--list-tasks", action="store_true", help="list the tasks and their weights, then exit")
    # cluster mode (eamamba_ref.distributed): on for folders/globs, --scheduler, --workers or --chunk
    ap.add_argument("--scheduler", help="Dask scheduler address, or 'local' (default for folders/globs)")
    ap.add_argument("--workers", type=int, help="workers of the local Dask cluster (default: one per core)")
    ap.add_argument("--chunk", type=int, help="restore TIFFs larger than memory in chunks of this size (Dask)")
    args = ap.parse_args(argv)

    if args.list_tasks:
        for t in TASKS.values():
            bundled = " (colour + gray)" if t.bundled_gray else ""
            print(f"{t.name:15s} {t.description}" + (f"  [bundled demo weights{bundled}]" if t.bundled else ""))
        return 0
    task = TASKS[args.task]
    check_numbers(args)
    backend = args.backend or default_backend()
    models = TaskModels(task, args.weights, backend)
    models.check()
    if not args.inputs:
        run_demo(task, models, args)
        return 0
    from .distributed import run_command, wants_cluster
    if wants_cluster(args):
        return run_command(task, args, backend)
    groups = [args.inputs] if task.inputs == 2 else [[p] for p in args.inputs]
    if task.inputs == 2 and len(args.inputs) != 2:
        raise RestoreError(f"task '{task.name}' takes exactly two inputs (left and right dual-pixel views), "
                           f"got {len(args.inputs)}")
    for path in args.inputs:            # before the outputs: "no such file" says more than "no such folder"
        if not os.path.isfile(path):
            raise ImageError(f"{path}: no such file")
    plan = plan_outputs(groups, task, args.output)
    check_outputs(plan, args.overwrite)
    for group, out_path in plan:
        restore_files(task, models, group, args, out_path)
    return 0


def check_numbers(args):
    """The numeric options' ranges (one-line errors before anything starts)."""
    if args.tile is not None and (args.tile < 8 or not 0 <= args.tile_overlap < args.tile):
        raise RestoreError(f"--tile must be >= 8 and --tile-overlap in [0, tile), got --tile {args.tile} and "
                           f"--tile-overlap {args.tile_overlap} (default 32)")
    if args.workers is not None and args.workers < 1:
        raise RestoreError(f"--workers must be >= 1, got {args.workers}")
    if args.chunk is not None and args.chunk < 1:
        raise RestoreError(f"--chunk must be a positive size in pixels, got {args.chunk}")


def restore_images(task, models, images, sigma=None, seed=0, tile=None, overlap=32, ensemble=False,
                   progress=None, note=None):
    """One group of images (one, or the two dual-pixel views) -> restored `(H', W', C)` pixels and
    alpha, C as the first image's. The steps of every front end (restore, Dask batches).

    The model comes from `models.pick` (gray images to a gray model where there is one); `sigma`
    adds seeded noise first, on the channels the model reads; `note(line)` hears that an RGB image
    with three equal channels is restored as gray.
    """
    first = images[0]
    model = models.pick(first, first.path or "the image")
    channels = model.config.inp_channels // task.inputs
    if channels == 1 and first.pixels.shape[2] == 3 and note is not None:
        note(f"{first.path}: its three colour channels are equal: restoring it as a gray image")
    work = [as_model_channels(im, channels) for im in images]
    if sigma is not None:
        work = [add_noise(im, sigma, seed) for im in work]
    y = restore_array(model, to_model_input(work, task, channels), tile, overlap, ensemble, progress)
    return from_model_output(y, first, task.scale)      # alpha follows the output's size


def restore_files(task, models, paths, args, out_path):
    """Restore one group of inputs (one image, or the two dual-pixel views) into `out_path`."""
    images = [read_image(p, getattr(args, "max_pixels", MAX_PIXELS)) for p in paths]
    if len(images) == 2 and images[0].pixels.shape != images[1].pixels.shape:
        raise RestoreError(f"the two dual-pixel views differ in size: {images[0].pixels.shape} vs {images[1].pixels.shape}")
    first = images[0]
    # format for this bit depth and alpha, folder, input, existing file: refused now, not after
    check_output(out_path, paths, args.overwrite, first.bit_depth, first.alpha is not None)
    up = task.scale if task.pre_upsample else 1
    total = (inference.n_tiles(first.height * up, first.width * up, args.tile, args.tile_overlap)
             * (4 if args.ensemble else 1))
    bar, update = _progress_bar(total, os.path.basename(paths[0]))
    try:
        out, alpha = restore_images(task, models, images, args.sigma, args.seed, args.tile, args.tile_overlap,
                                    args.ensemble, update, note=print)
    finally:
        if bar is not None:
            bar.close()
    write_image(out_path, out, first.bit_depth, alpha, overwrite=args.overwrite)
    print(f"{' + '.join(paths)} -> {out_path}")


def default_backend():
    """The whole model on the GPU where one works (numba-cuda sees a real GPU), else Numba's CPU
    kernels. The CUDA path passed benchmarks/gpu_check.py on an NVIDIA H200 (every kernel and the
    whole model against NumPy, the official denoiser against the PyTorch reference on the GPU)."""
    if "cuda" in ssm.available_backends() and not os.environ.get("NUMBA_ENABLE_CUDASIM"):
        return "cuda"
    return "numba"


if __name__ == "__main__":
    # Run the imported module's main, not this __main__ copy's: one copy of the module's state.
    from eamamba_ref.restore import main as _main
    sys.exit(_main())
