"""Evaluate a model against classical baselines with the official protocol.

    python -m eamamba_ref.evaluate --task denoise --sigma 25 --data ../shared/data/Kodak24
    python -m eamamba_ref.evaluate --task sr2 --data ../shared/data/Set5 --csv set5.csv

Denoising: the clean image plus seeded gaussian noise of std sigma/255 (not clipped, as the official
test), restored by the model and by scikit-image's TV (Chambolle), wavelet (BayesShrink) and
non-local means denoisers -- and BM3D when the `bm3d` package is installed -- each given the true
sigma. SR: the HR image cropped to a multiple of the scale, downscaled with the same bicubic
(anti-aliased) degradation as the demo model's training, restored by the model and by bicubic
upsampling; PSNR/SSIM on the Y channel with `scale` border pixels shaved.
A CSV gets one row per image and method; the table of means is printed.
"""
from __future__ import annotations

import argparse
import csv
import glob
import os
import time

import numpy as np

from eamamba_ref.apps import metrics
from eamamba_ref.io.atomic import atomic_output, check_destination
from eamamba_ref.apps.errors import command
from eamamba_ref.io.images import Image, read_image
from eamamba_ref.reference.layers import bicubic_upsample
from eamamba_ref.apps.errors import RestoreError
from eamamba_ref.apps.pipeline import (default_backend, from_model_output, load_task_model,
                                       restore_array, to_model_input)
from eamamba_ref.apps.tasks import TASKS


def gray_8bit(rgb):
    """Colour pixels `(H, W, 3)` in [0, 1] -> the 8-bit gray photo `(H, W, 1)` made from them.

    scikit-image's luma (ITU-R BT.709 weights) rounded to 8 bits, so that a gray evaluation set
    made from a colour one (e.g. gray CBSD68) is what a gray photo file of it would hold; the demo
    gray denoiser is trained on the same conversion of its colour training images."""
    from skimage.color import rgb2gray

    return (np.round(rgb2gray(rgb) * 255) / 255).astype(np.float32)[..., None]


def denoise_baselines(noisy, sigma, which):
    """Classical denoisers on `(H, W, C)` noisy float images (C = 3 or 1), each told the true sigma
    (0-255 scale). Gray images get the gray forms (BM3D instead of CBM3D, no YCbCr wavelets)."""
    from skimage.restoration import denoise_nl_means, denoise_tv_chambolle, denoise_wavelet

    s = sigma / 255.0
    colour = noisy.shape[2] == 3
    img = noisy if colour else noisy[..., 0]
    axis = -1 if colour else None
    out = {}
    if "tv" in which:
        out["TV"] = denoise_tv_chambolle(img, weight=0.9 * s, channel_axis=axis)
    if "wavelet" in which:
        out["wavelet"] = denoise_wavelet(img, sigma=s, channel_axis=axis, convert2ycbcr=colour,
                                         method="BayesShrink", mode="soft", rescale_sigma=True)
    if "nlm" in which:
        out["NL-means"] = denoise_nl_means(img, h=0.8 * s, sigma=s, patch_size=5, patch_distance=6,
                                           fast_mode=True, channel_axis=axis)
    if "bm3d" in which:
        try:
            import bm3d
        except ImportError:
            pass
        else:
            if colour:
                out["CBM3D"] = bm3d.bm3d_rgb(img, sigma_psd=s)
            else:
                out["BM3D"] = bm3d.bm3d(img, sigma_psd=s)
    return {k: v.reshape(noisy.shape) for k, v in out.items()}


def list_images(folder):
    paths = sorted(p for ext in ("png", "jpg", "jpeg", "tif", "tiff", "bmp")
                   for p in glob.glob(os.path.join(folder, f"*.{ext}")))
    if not paths:
        raise RestoreError(f"{folder}: no images found (PNG, JPEG, TIFF, BMP)")
    return paths


def evaluate(task, model, paths, sigma=25.0, seed=0, baselines=("tv", "wavelet", "nlm"), tile=None,
             progress=True, gray=False):
    """Rows of {'image', 'method', 'psnr', 'ssim', 'seconds'} for every image and method.

    gray: denoise gray images (colour ones made gray by `gray_8bit`) with a 1-channel model.

    model None: the baselines only (they do not depend on the weights, so a table can be made while
    a model is still training, and merged with a `--baselines none` run of the model later)."""
    from tqdm import tqdm

    rows = []
    scale = task.scale
    for i, path in enumerate(tqdm(paths, desc="images", disable=not progress, leave=False)):
        gt = read_image(path).pixels
        if gray and gt.shape[2] == 3:
            gt = gray_8bit(gt)
        elif not gray and gt.shape[2] == 1:
            gt = np.repeat(gt, 3, axis=2)
        outputs = {}
        if task.name == "denoise":
            rng = np.random.default_rng(seed + i)
            degraded = (gt + rng.standard_normal(gt.shape) * (sigma / 255.0)).astype(np.float32)
            kw = dict(y_only=False, border=0)
        else:
            from skimage.transform import rescale
            h, w = (gt.shape[0] // scale) * scale, (gt.shape[1] // scale) * scale
            gt = gt[:h, :w]
            degraded = rescale(gt, 1 / scale, channel_axis=2, anti_aliasing=True, order=3).astype(np.float32)
            kw = dict(y_only=True, border=scale)
        x = np.ascontiguousarray(degraded.transpose(2, 0, 1)[None])
        if model is not None:
            t = time.time()
            image = Image(degraded, None, 8)              # gray into a colour model: replicated, averaged
            y = restore_array(model, to_model_input([image], task, model.config.inp_channels), tile)
            outputs["EAMamba"] = (from_model_output(y, image, scale)[0], time.time() - t)
        if task.name == "denoise":
            outputs["noisy input"] = (degraded, 0.0)
            for name in baselines:             # timed one by one; all see the same noisy input
                t = time.time()
                for label, out in denoise_baselines(degraded.astype(np.float64), sigma, (name,)).items():
                    outputs[label] = (out, time.time() - t)
        else:
            t = time.time()
            outputs["bicubic"] = (bicubic_upsample(x, scale)[0].transpose(1, 2, 0), time.time() - t)
        for method, (out, seconds) in outputs.items():
            rows.append({"image": os.path.basename(path), "method": method,
                         "psnr": metrics.psnr(out, gt, **kw), "ssim": metrics.ssim(out, gt, **kw),
                         "seconds": seconds})
    return rows


def summarise(rows):
    """{method: (mean psnr, mean ssim, n)} in first-seen order."""
    table = {}
    for r in rows:
        table.setdefault(r["method"], []).append((r["psnr"], r["ssim"]))
    return {m: (float(np.mean([p for p, _ in v])), float(np.mean([s for _, s in v])), len(v)) for m, v in table.items()}


@command
def main(argv=None):
    """The evaluate command; returns the exit status (errors: one line on stderr, see errors.command)."""
    ap = argparse.ArgumentParser(prog="python -m eamamba_ref.evaluate", description=__doc__.split("\n")[0])
    ap.add_argument("--task", default="denoise", choices=["denoise", "sr2", "sr3", "sr4"])
    ap.add_argument("--data", required=True, help="folder of clean (ground-truth) images")
    ap.add_argument("--sigma", type=float, default=25.0, help="noise std on the 0-255 scale (denoise)")
    ap.add_argument("--weights", help="official checkpoint or converted file (default: bundled demo weights)")
    ap.add_argument("--seed", type=int, default=0, help="noise seed; image i uses seed + i")
    ap.add_argument("--baselines", default="tv,wavelet,nlm",
                    help="comma-separated subset of tv,wavelet,nlm,bm3d, or 'none' (denoise; bm3d needs the "
                         "`bm3d` package and takes minutes per image)")
    ap.add_argument("--limit", type=int, help="only the first N images")
    ap.add_argument("--tile", type=int, help="restore in tiles of this size (bounds memory)")
    ap.add_argument("--csv", help="write per-image results here")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --csv file")
    ap.add_argument("--backend", choices=["numpy", "numba", "cuda"])
    ap.add_argument("--gray", action="store_true",
                    help="denoise: gray images (colour ones converted to 8-bit gray) with a 1-channel model and "
                         "the gray baselines (BM3D instead of CBM3D)")
    ap.add_argument("--no-model", action="store_true",
                    help="only the baselines (and the noisy input / bicubic rows): no weights needed")
    args = ap.parse_args(argv)
    task = TASKS[args.task]
    if args.csv:                        # before the (long) evaluation, not after it
        check_destination(args.csv, args.overwrite)
    model = None if args.no_model else load_task_model(task, args.weights, args.backend or default_backend(),
                                                          channels=1 if args.gray else 3)
    paths = list_images(args.data)[: args.limit]
    which = () if args.baselines == "none" else tuple(b.strip() for b in args.baselines.split(","))
    unknown = set(which) - {"tv", "wavelet", "nlm", "bm3d"}
    if unknown:
        raise RestoreError(f"unknown baselines {sorted(unknown)}; choose from tv, wavelet, nlm, bm3d")
    rows = evaluate(task, model, paths, args.sigma, args.seed, which, args.tile, gray=args.gray)
    if args.csv:
        with atomic_output(args.csv, args.overwrite) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["image", "method", "psnr", "ssim", "seconds"])
            writer.writeheader()
            writer.writerows(rows)
    what = f"sigma {args.sigma:g}" if task.name == "denoise" else f"x{task.scale}, Y channel, border {task.scale}"
    print(f"{task.name} on {os.path.basename(os.path.normpath(args.data))} ({len(paths)} images, {what})")
    print(f"{'method':14s} {'PSNR (dB)':>10s} {'SSIM':>8s}")
    for method, (p, s, n) in summarise(rows).items():
        print(f"{method:14s} {p:10.2f} {s:8.4f}")
    return 0
