"""Restore images with EAMamba, on a laptop, without PyTorch or a GPU.

    python -m eamamba_ref.restore                          # demo: bundled sample + noise -> eamamba_demo/
    python -m eamamba_ref.restore photo.png --task denoise # -> photo_denoise.png next to it
    python -m eamamba_ref.restore a.png b.tif --task sr2 -o out/
    python -m eamamba_ref.restore left.png right.png --task defocus-deblur --weights dpdd.pth
    python -m eamamba_ref.restore big.tif --task denoise --tile 256 --tile-overlap 32

Tasks follow the official model zoo (see --list-tasks). Those with bundled demo weights run out
of the box; the others need --weights (an official .pth or a converted .npz) and say how to get it.
Outputs keep the input's bit depth and alpha channel; existing files are never overwritten
unless --overwrite is given. Without inputs the command runs the demo (`demo.py`); folders, globs
and --scheduler/--workers/--chunk run on Dask (`distributed.py`).
"""
from __future__ import annotations

import argparse
import os

from eamamba_ref.apps import inference
from eamamba_ref.apps.demo import run_demo
from eamamba_ref.apps.errors import RestoreError, command
from eamamba_ref.io.images import MAX_PIXELS, ImageError, check_output, read_image, write_image
from eamamba_ref.apps.pipeline import (TaskModels, check_outputs, default_backend, plan_outputs,
                                       restore_images)
from eamamba_ref.apps.tasks import TASKS


def _progress_bar(total, desc):
    if total <= 1:
        return None, None
    from tqdm import tqdm
    bar = tqdm(total=total, desc=desc, unit="tile", leave=False)
    return bar, bar.update


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
    # cluster mode (eamamba_ref.apps.distributed): on for folders/globs, --scheduler, --workers or --chunk
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
    from eamamba_ref.apps.distributed import run_command, wants_cluster
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
