"""Train the bundled demo models on a 2-core CPU: the recipe behind eamamba_ref/weights/.

    python training/train_demo.py --task denoise --data path/to/CBSD432 \
        --val path/to/Kodak24 --minutes 60 --out training/runs/denoise --total-steps 5800
    python training/train_demo.py --task sr2 --data path/to/CBSD432 \
        --val path/to/Set14 --patch 96 --lr 5e-4 --minutes 40 --out training/runs/sr2 --total-steps 7000

The models are the paper's architecture (MHSSM with the 8-direction all-around diagonal scan,
'concate' merge) scaled down so that training fits a 2-core CPU. Training uses the PyTorch
reference (eamamba_ref.pytorch) with the Numba selective scan when available. Checkpoints are
written in the official format (`sd` raw weights, `sd_e` EMA weights), so `--resume` continues a
run and `python -m eamamba_ref.convert` turns the result into the bundled `.npz`. Every
`--val-every` minutes the EMA model is evaluated (PSNR on centre crops of the validation images)
and a line is appended to `log.csv` (wall minutes, step, PSNR): the curve in the model card.

Denoising: blind gaussian colour noise, sigma ~ U[0, 50] per patch (as the official recipe),
validated at sigma 25. SR x2: bicubic downscaling (skimage, anti-aliased) of HR patches; the model
starts as bilinear upsampling (`bilinear_start`, below) unless --random-start.

The bundled weights came from these runs; their last checkpoints (raw + EMA weights, optimizer
state) and validation logs are kept in training/checkpoints/ (docs/model_card.md has the history).
To continue one (give numba the same thread count as torch: `NUMBA_NUM_THREADS`):

    mkdir -p training/runs/denoise && cp training/checkpoints/denoise_last.pth training/runs/denoise/last.pth
    NUMBA_NUM_THREADS=2 python training/train_demo.py --task denoise ... --out training/runs/denoise --resume --threads 2
"""
from __future__ import annotations

import argparse
import copy
import csv
import glob
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from skimage.io import imread
from skimage.transform import rescale

from eamamba_ref.apps.evaluate import gray_8bit
from eamamba_ref.apps.metrics import psnr
from eamamba_ref.pytorch import build_from_args, save_official_checkpoint, set_scan_mode

MAMBA = dict(scan_type="diagonal", scan_count=8, scan_merge_method="concate", disable_z_branch=False,
             d_state=8, d_conv=3, expand=2, conv_2d=True)
TASKS = {
    "denoise": ("eamamba", dict(inp_channels=3, out_channels=3, dim=16, num_blocks=[1, 1, 1, 1],
                                num_refinement_blocks=1, ffn_expansion_factor=2, bias=False,
                                layernorm_type="WithBias", channel_mixer_type="Simple", mamba_cfg=MAMBA)),
    # the same U-Net on one channel: gray photos carry one noise field, which a colour model, fed
    # the channel three times, never saw (it leaves them noisy)
    "denoise_gray": ("eamamba", dict(inp_channels=1, out_channels=1, dim=16, num_blocks=[1, 1, 1, 1],
                                     num_refinement_blocks=1, ffn_expansion_factor=2, bias=False,
                                     layernorm_type="WithBias", channel_mixer_type="Simple", mamba_cfg=MAMBA)),
    "sr2": ("eamambasr", dict(inp_channels=3, out_channels=3, dim=32, num_blocks=[2, 2], upscale=2,
                              ffn_expansion_factor=2, bias=False, layernorm_type="WithBias",
                              channel_mixer_type="Simple", mamba_cfg=dict(MAMBA, d_state=8, expand=1))),
}


def load_images(folder, gray=False):
    """uint8 images `(H, W, 3)`, or `(H, W, 1)` with gray=True (colour photos -> 8-bit luma)."""
    paths = sorted(p for ext in ("png", "jpg", "jpeg") for p in glob.glob(os.path.join(folder, f"*.{ext}")))
    if not paths:
        raise SystemExit(f"no PNG/JPEG images in {folder}")
    images = [imread(p) for p in paths]
    if gray:
        # rounded to 8 bits like a gray photo file; already-gray images pass through unchanged
        return [im[..., None] if im.ndim == 2 else np.round(gray_8bit(im[..., :3] / 255.0) * 255).astype(np.uint8)
                for im in images]
    return [np.repeat(im[..., None], 3, axis=2) if im.ndim == 2 else im[..., :3] for im in images]


def random_patches(images, n, size, rng):
    """n random crops `(n, C, size, size)` in [0, 1] with random flips / 90-degree rotations."""
    out = np.empty((n, images[0].shape[2], size, size), np.float32)
    for i in range(n):
        img = images[rng.integers(len(images))]
        y = rng.integers(img.shape[0] - size + 1)
        x = rng.integers(img.shape[1] - size + 1)
        p = img[y:y + size, x:x + size]
        p = np.rot90(p, rng.integers(4))
        if rng.integers(2):
            p = p[:, ::-1]
        out[i] = p.transpose(2, 0, 1) / 255.0
    return out


def degrade(task, hr, rng):
    """(input, target) tensors for a batch of clean patches `(n, C, s, s)`."""
    if task.startswith("denoise"):
        sigma = rng.uniform(0, 50, (hr.shape[0], 1, 1, 1)) / 255.0
        return (hr + rng.standard_normal(hr.shape) * sigma).astype(np.float32), hr
    lr = np.stack([rescale(p, 0.5, channel_axis=0, anti_aliasing=True, order=3) for p in hr])
    return lr.astype(np.float32), hr


def bilinear_start(model, scale=2):
    """Initialise an x2 EAMambaSR so that, before any training, it IS bilinear upsampling.

    Why: EAMambaSR has no bicubic skip, so from a random start it spends its first thousands of
    steps learning to copy and enlarge the image - most of a CPU training budget. Here image
    channel c rides through the network unchanged in feature channel c: conv_first and
    conv_before_upsample pass it on (centre tap 1; images are >= 0, so the LeakyReLU is the
    identity on them), the body's contribution to it starts at zero (its rows of conv_after_body),
    the upsampling conv gives each of the four sub-pixels its bilinear 3x3 kernel, and conv_last
    reads it back. Every other weight keeps its random start, so the body learns a residual on top
    of bilinear from step one. The architecture is untouched: this is only a starting point.
    """
    if scale != 2:
        raise ValueError("bilinear_start is written for x2 (one conv + PixelShuffle(2))")
    c = model.conv_first.weight.shape[1]
    # 1-D bilinear taps (offsets -1, 0, +1) of the two x2 sub-pixels, align_corners=False.
    taps = torch.tensor([[0.25, 0.75, 0.0], [0.0, 0.75, 0.25]])
    with torch.no_grad():
        conv_up = model.upsample[0]
        for k in range(c):
            for conv in (model.conv_first, model.conv_before_upsample[0]):
                conv.weight[k] = 0
                conv.weight[k, k, 1, 1] = 1
                if conv.bias is not None:
                    conv.bias[k] = 0
            model.conv_after_body.weight[k] = 0
            for i in range(2):
                for j in range(2):
                    row = 4 * k + 2 * i + j                  # PixelShuffle(2): channel k, sub-pixel (i, j)
                    conv_up.weight[row] = 0
                    conv_up.weight[row, k] = torch.outer(taps[i], taps[j])
                    conv_up.bias[row] = 0
        model.conv_last.weight.zero_()
        for k in range(c):
            model.conv_last.weight[k, k, 1, 1] = 1


def gray_from_colour(model, colour_state_dict):
    """Start a 1-channel U-Net from a colour one: the colour model applied to a gray image (g, g, g).

    Why: the colour denoiser already knows images; only the noise statistics differ (one noise
    field instead of three). Feeding gray g as (g, g, g) equals a first conv whose weights are
    summed over the three input channels; reading gray out as the mean of the three outputs equals
    the last conv averaged over its output channels (the input residual stays g). Every other
    weight is shared as it is, so fine-tuning starts from the colour model's quality on gray.
    """
    sd = {k: v.clone() for k, v in colour_state_dict.items()}
    first, last = "patch_embed.proj.weight", "output.weight"
    sd[first] = sd[first].sum(dim=1, keepdim=True)
    sd[last] = sd[last].mean(dim=0, keepdim=True)
    if "output.bias" in sd:
        sd["output.bias"] = sd["output.bias"].mean(dim=0, keepdim=True)
    model.load_state_dict(sd)


def validate(task, model, val_images, crop=256, device="cpu"):
    """Mean PSNR of the model on centre crops of the validation images (fixed seed noise)."""
    rng = np.random.default_rng(1234)
    scores = []
    with torch.no_grad():
        for img in val_images:
            h, w = img.shape[:2]
            size = min(crop, h, w) // 8 * 8
            y, x = (h - size) // 2, (w - size) // 2
            hr = (img[y:y + size, x:x + size].transpose(2, 0, 1) / 255.0).astype(np.float32)[None]
            if task.startswith("denoise"):
                inp = (hr + rng.standard_normal(hr.shape) * 25 / 255.0).astype(np.float32)
            else:
                inp = degrade(task, hr, rng)[0]
            out = model(torch.from_numpy(inp).to(device)).cpu().numpy()
            scores.append(psnr(out, hr))        # clips the output to [0, 1], as the evaluation does
    return float(np.mean(scores))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", choices=sorted(TASKS), required=True)
    ap.add_argument("--data", required=True, help="folder of clean training PNGs")
    ap.add_argument("--val", required=True, help="folder of validation PNGs (first --val-count used)")
    ap.add_argument("--val-count", type=int, default=4)
    ap.add_argument("--out", required=True)
    ap.add_argument("--minutes", type=float, default=60.0, help="wall-clock training budget of this run")
    ap.add_argument("--val-every", type=float, default=5.0, help="minutes between validations")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--patch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--total-steps", type=int, default=4000, help="length of the cosine schedule")
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--scan", default="auto", help="torch_ref scan mode: auto | numba | chunked "
                    "(auto: numba on the CPU, chunked on a GPU)")
    ap.add_argument("--device", default="cpu", help="torch device, e.g. cuda (the scan is then 'chunked')")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--init-from", help="denoise_gray: start from this colour denoise checkpoint's "
                    "EMA weights (gray_from_colour)")
    ap.add_argument("--restart-schedule", action="store_true",
                    help="with --resume: start a new cosine schedule of --total-steps at the resumed step "
                         "(a warm restart; the optimizer state is kept)")
    ap.add_argument("--cosine-by-time", action="store_true",
                    help="the cosine schedule spans this run's --minutes instead of --total-steps (for a "
                         "fixed time budget on hardware whose step rate is not known beforehand)")
    ap.add_argument("--random-start", action="store_true",
                    help="sr2: start from random weights instead of bilinear_start")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)      # decayed scan states underflow: denormals are 10-50x slower
    mode = args.scan
    if mode == "auto" and args.device != "cpu":
        mode = "chunked"             # the Numba scan runs on the CPU only
    if mode == "auto":
        try:
            set_scan_mode("numba")
            mode = "numba"
        except ValueError:
            mode = "chunked"
    set_scan_mode(mode)
    os.makedirs(args.out, exist_ok=True)
    name, model_args = TASKS[args.task]
    torch.manual_seed(0)
    model = build_from_args(name, model_args)
    load = lambda path: torch.load(path, weights_only=True, map_location="cpu")   # noqa: E731
    if args.task == "sr2" and not args.random_start:
        bilinear_start(model)
    if args.init_from:
        gray_from_colour(model, load(args.init_from)["model"]["sd_e"])
    model.to(args.device)
    ema = copy.deepcopy(model).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4, betas=(0.9, 0.999))
    ckpt_path = os.path.join(args.out, "last.pth")
    step, minutes_before, schedule_start = 0, 0.0, 0
    if args.resume and os.path.exists(ckpt_path):
        ck = load(ckpt_path)
        model.load_state_dict(ck["model"]["sd"])
        ema.load_state_dict(ck["model"]["sd_e"])
        opt.load_state_dict(ck["optimizer"]["sd"])
        step = int(ck["current_iter"])
        minutes_before = float(ck["model"]["args"].get("_train_minutes", 0.0))
        schedule_start = step if args.restart_schedule else int(ck["model"]["args"].get("_schedule_start", 0))
        print(f"resumed at step {step} ({minutes_before:.1f} min), schedule from step {schedule_start}")

    gray = model_args["inp_channels"] == 1
    train_images = load_images(args.data, gray)
    val_images = load_images(args.val, gray)[: args.val_count]
    rng = np.random.default_rng(step + 1)
    log_path = os.path.join(args.out, "log.csv")
    new_log = not os.path.exists(log_path)
    log = open(log_path, "a", newline="")
    writer = csv.writer(log)
    if new_log:
        writer.writerow(["minutes", "step", "val_psnr", "train_l1", "scan"])
    print(f"{args.task}: {name} {sum(p.numel() for p in model.parameters()):,} params, scan mode {mode}")

    start = time.time()
    next_val = 0.0
    losses = []

    def save():
        saved_args = dict(model_args, _train_minutes=minutes_before + (time.time() - start) / 60,
                          _schedule_start=schedule_start)
        tmp = ckpt_path + ".tmp"
        save_official_checkpoint(model, tmp, name, saved_args, ema_state_dict=ema.state_dict(),
                                 optimizer_state_dict=opt.state_dict(), current_iter=step)
        os.replace(tmp, ckpt_path)

    while True:
        elapsed = (time.time() - start) / 60
        if elapsed >= next_val:
            score = validate(args.task, ema, val_images, device=args.device)
            train_l1 = float(np.mean(losses)) if losses else float("nan")
            writer.writerow([f"{minutes_before + elapsed:.2f}", step, f"{score:.3f}", f"{train_l1:.5f}", mode])
            log.flush()
            print(f"{minutes_before + elapsed:7.1f} min  step {step:6d}  val PSNR {score:.2f} dB  "
                  f"train L1 {train_l1:.4f}", flush=True)
            losses = []
            save()
            next_val = elapsed + args.val_every
        if elapsed >= args.minutes:
            break
        if args.cosine_by_time:
            progress = min(elapsed / args.minutes, 1.0)
        else:
            progress = min((step - schedule_start) / args.total_steps, 1.0)
        lr = args.lr * 0.5 * (1 + math.cos(math.pi * progress))
        lr = max(lr, args.lr * 0.02)
        for g in opt.param_groups:
            g["lr"] = lr
        hr = random_patches(train_images, args.batch, args.patch, rng)
        inp, target = degrade(args.task, hr, rng)
        out = model(torch.from_numpy(inp).to(args.device))
        loss = F.l1_loss(out, torch.from_numpy(target).to(args.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        with torch.no_grad():
            decay = min(args.ema, (1 + step) / (10 + step))      # warm-up of the EMA
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.mul_(decay).add_(pm.detach(), alpha=1 - decay)
        losses.append(loss.item())
        step += 1
    save()
    log.close()


if __name__ == "__main__":
    main()
