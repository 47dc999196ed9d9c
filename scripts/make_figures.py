"""Draw the figures of the README and docs/ into docs/figures/.

    python scripts/make_figures.py                        # every figure
    python scripts/make_figures.py --only scans diagrams  # just some of them
    python scripts/make_figures.py --weights my.npz       # another denoiser for the last two figures

Figures (PNG):
    scans        scan_orderings.png, scan_directions_diagonal8.png  -- every ordering; the 8 directions
    diagrams     unet.png, mhssm.png                                 -- the architecture (docs/architecture.md)
    forgetting   local_forgetting.png  -- the influence of every pixel on the centre pixel inside one
                 selective scan of a real MHSSM layer: raster vs all-around (notebook 3 explains it)
    restoration  denoise_before_after.png  -- the bundled sample, noisy (sigma 25) / EAMamba / clean

'forgetting' and 'restoration' use the bundled demo denoiser (eamamba_ref/weights/denoise_demo.npz, or
--weights). Without it, 'forgetting' is drawn with random weights (and says so in its title) and
'restoration' is skipped: a restoration by an untrained model would mislead.
Runs in about half a minute on 2 cores.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIGURES = ("scans", "diagrams", "forgetting", "restoration")


# ------------------------------------------------------------------------------------ scans
def figures_scans(out):
    from eamamba_ref.apps import draw
    yield draw.figure_orderings((8, 8)), os.path.join(out, "scan_orderings.png")
    yield draw.figure_directions("diagonal", 8, (8, 8)), os.path.join(out, "scan_directions_diagonal8.png")


# --------------------------------------------------------------------------------- diagrams
def _box(ax, x, y, text, w=2.6, h=0.62, color="#dbe9f6", fontsize=8):
    from matplotlib.patches import FancyBboxPatch
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.04,rounding_size=0.12",
                                fc=color, ec="0.3", lw=0.8))
    ax.text(x, y, text, ha="center", va="center", fontsize=fontsize)


def _arrow(ax, a, b, text=None, color="0.25", style="-|>", rad=0.0):
    from matplotlib.patches import FancyArrowPatch
    ax.add_patch(FancyArrowPatch(a, b, arrowstyle=style, mutation_scale=9, color=color, lw=0.9,
                                 connectionstyle=f"arc3,rad={rad}", shrinkA=0, shrinkB=0))
    if text:
        ax.text((a[0] + b[0]) / 2 + 0.08, (a[1] + b[1]) / 2, text, fontsize=6.5, color=color, va="center")


def figure_unet():
    """The EAMamba U-Net with the official module names; c = dim (64 in the released models)."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9.5, 6.4))
    enc = [("encoder_level1\nN1 blocks, c, HxW", 5.0), ("encoder_level2\nN2 blocks, 2c, H/2", 3.6),
           ("encoder_level3\nN3 blocks, 4c, H/4", 2.2)]
    dec = [("decoder_level1\nN1 blocks, 2c, HxW", 5.0), ("decoder_level2\nN2 blocks, 2c, H/2", 3.6),
           ("decoder_level3\nN3 blocks, 4c, H/4", 2.2)]
    xl, xr = 2.0, 8.0
    _box(ax, xl, 6.3, "input x (B, 3, H, W)", color="#f2f2f2")
    _box(ax, xl, 5.75 - 0.05, "patch_embed.proj 3x3", h=0.4, color="#fde9c9")
    _arrow(ax, (xl, 6.0), (xl, 5.9))
    for i, (text, y) in enumerate(enc):
        _box(ax, xl, y - 0.25, text, h=0.6)
        if i == 0:
            _arrow(ax, (xl, 5.5), (xl, y + 0.05))
        if i < 2:
            _arrow(ax, (xl, y - 0.55), (xl, enc[i + 1][1] + 0.05),
                   f"down{i + 1}_{i + 2}: conv 3x3 to C/2 + PixelUnshuffle(2)")
    _box(ax, 5.0, 0.7, "latent\nN4 blocks, 8c, H/8", h=0.6)
    _arrow(ax, (xl, 1.65), (4.2, 0.8), "down3_4")
    _arrow(ax, (5.8, 0.8), (xr, 1.65), "up4_3")
    for i, (text, y) in enumerate(dec):
        _box(ax, xr, y - 0.25, text, h=0.6)
        _arrow(ax, (xl + 1.3, y - 0.25), (xr - 1.3, y - 0.25), color="tab:blue")
        skip = "concat" + ("" if i == 0 else f", reduce_chan_level{i + 1} 1x1")
        ax.text(5.0, y - 0.12, skip, fontsize=6.5, color="tab:blue", ha="center")
        if i > 0:
            _arrow(ax, (xr, y + 0.05), (xr, dec[i - 1][1] - 0.55),
                   f"up{i + 1}_{i}: conv 3x3 to 2C + PixelShuffle(2)")
    _box(ax, xr, 6.0, "refinement\nR blocks, 2c", h=0.55)
    _arrow(ax, (xr, 5.05), (xr, 5.72))
    _box(ax, xr, 6.75, "output 3x3  +  x  ->  restored", color="#fde9c9", h=0.45)
    _arrow(ax, (xr, 6.28), (xr, 6.52))
    _box(ax, 5.0, -0.35, "MambaFormerBlock:  x = x + MHSSM(LN(x));  x = x + FFN(LN(x))\n"
                         "LN: LayerNorm over channels (norm1, norm2); FFN 'Simple': 1x1 to f*C, "
                         "SimpleGate, 1x1 back (project_in/out)", w=8.6, h=0.62, color="#e8f4e4", fontsize=7.5)
    ax.set_xlim(0, 10)
    ax.set_ylim(-0.8, 7.1)
    ax.axis("off")
    ax.set_title("EAMamba U-Net (official names; released denoiser: c = 64, N = 4, 6, 6, 7, R = 2)", fontsize=9)
    fig.tight_layout()
    return fig


def figure_mhssm():
    """The Multi-Head Selective Scan Module (official ExtendedMamba) with its parameter names."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8.6, 7.4))
    x0, xz = 3.2, 7.4
    steps = [
        (9.4, "tokens (B, C, L), L = H*W  (after norm1)", "#f2f2f2"),
        (8.5, "in_proj.weight (2d, C): split into x and z", "#fde9c9"),
        (7.6, "conv.weight/bias: depthwise 3x3 on the (H, W) map, SiLU", "#fde9c9"),
        (6.6, "all-around transform: K heads of d/K channels,\nhead k gathers its channels in direction k", "#e3dcf2"),
        (5.5, "x_proj_weight[k] (R+2N, d/K): per token -> dt (R), B (N), C (N)\n"
              "dt_projs_weight[k] (d/K, R) + dt_projs_bias[k], softplus -> Delta", "#fde9c9"),
        (4.3, "selective scan, all heads in one call (B/C: one group per head)\n"
              "h_t = exp(Delta_t A) h_(t-1) + Delta_t B_t u_t,  y_t = C_t h_t + D u_t\n"
              "A = -exp(A_logs) (d, N),  D = Ds (d)", "#dbe9f6"),
        (3.1, "restore: every head back to row-major order,\nconcatenate the heads -> (B, d, L)", "#e3dcf2"),
        (2.2, "out_norm: LayerNorm over the d channels", "#fde9c9"),
        (1.3, "x  SiLU(z)   (gate)", "#e8f4e4"),
        (0.4, "out_proj.weight (C, d) -> (B, C, L)", "#fde9c9"),
    ]
    heights = {6.6: 0.75, 5.5: 0.75, 4.3: 0.95, 3.1: 0.75}
    for y, text, color in steps:
        _box(ax, x0, y, text, w=5.6, h=heights.get(y, 0.5), color=color, fontsize=7.5)
    for (ya, _, _), (yb, _, _) in zip(steps[:-1], steps[1:]):
        _arrow(ax, (x0, ya - heights.get(ya, 0.5) / 2), (x0, yb + heights.get(yb, 0.5) / 2))
    _box(ax, xz, 5.0, "z (B, d, L)\ngate branch", w=2.0, h=0.7, color="#e8f4e4", fontsize=7.5)
    _arrow(ax, (x0 + 2.8, 8.5), (xz, 8.5), style="-")                 # z leaves in_proj ...
    _arrow(ax, (xz, 8.5), (xz, 5.35))
    _arrow(ax, (xz, 4.65), (xz, 1.3), style="-")                      # ... and gates the normed scan output
    _arrow(ax, (xz, 1.3), (x0 + 2.8, 1.3))
    ax.text(xz + 0.1, -0.25, "d = expand * C,  N = d_state\nR = dt_rank = ceil(C/16)\nK = scan_count (8)\n"
                             "'concate': the K heads split the\nd channels, so K directions\ncost the same as one scan",
            fontsize=7, ha="center", va="center", color="0.25")
    ax.set_xlim(0, 9)
    ax.set_ylim(-0.9, 9.9)
    ax.axis("off")
    ax.set_title("MHSSM: Multi-Head Selective Scan Module (official ExtendedMamba)", fontsize=9)
    fig.tight_layout()
    return fig


def figures_diagrams(out):
    yield figure_unet(), os.path.join(out, "unet.png")
    yield figure_mhssm(), os.path.join(out, "mhssm.png")


# ------------------------------------------------------------------------------- the models
def demo_model(weights):
    """(model, True) from the demo weights, or (random model of the demo architecture, False)."""
    from eamamba_ref.io.config import ModelConfig
    from eamamba_ref.io.loading import load
    from eamamba_ref.runtime.model import EAMamba
    from eamamba_ref.reference.parameters import init_params
    if os.path.exists(weights):
        return load(weights), True
    cfg = ModelConfig.from_args("eamamba", dict(
        dim=16, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, ffn_expansion_factor=2,
        layernorm_type="WithBias", channel_mixer_type="Simple",
        mamba_cfg=dict(scan_type="diagonal", scan_count=8, scan_merge_method="concate", d_state=8,
                       d_conv=3, expand=2, conv_2d=True)))
    return EAMamba(cfg, init_params(cfg, seed=1)), False


def sample_image():
    from eamamba_ref.io.images import read_image
    from eamamba_ref.apps.demo import SAMPLE
    return read_image(SAMPLE).pixels                       # (256, 256, 3) float32 in [0, 1]


# ----------------------------------------------------------------------- local forgetting
def _softplus(x):
    return np.where(x > 20, x, np.log1p(np.exp(np.minimum(x, 20))))


def scan_influence_map(model, image, scan_type, scan_count, block="encoder_level1.0"):
    """|influence| of every input pixel on the centre pixel's scan output in `block`'s MHSSM: (H, W).

    The layer's own weights, with head k scanning in direction k mod scan_count of the given
    configuration (Delta, B, C of a pixel do not depend on the ordering, only the path does).
    Closed form of one scan row (diagonal A): M[t, s] = sum_n C_t[n] exp(sum_{s<r<=t} Delta_r A_n) Delta_s B_s[n].
    """
    from eamamba_ref.reference import layers, scans
    from eamamba_ref.reference.mhssm import depthwise_conv
    from eamamba_ref.reference.model import conv, norm, sub
    from eamamba_ref.reference.ops import NUMPY
    P, mcfg = model.params, model.config.mamba
    H, W = image.shape[:2]
    x = np.ascontiguousarray(image.transpose(2, 0, 1)[None])
    feat = conv(P, "patch_embed.proj", x, NUMPY)
    tokens = norm(sub(P, block), "norm1", feat, NUMPY).reshape(1, feat.shape[1], -1)
    p = sub(P, block + ".mamba")
    Cm = tokens.shape[1]
    d, N, R = mcfg.d_inner(Cm), mcfg.d_state, mcfg.resolved_dt_rank(Cm)
    K, Cp = mcfg.heads(Cm)
    xs = layers.silu(depthwise_conv((p["in_proj.weight"] @ tokens[0])[None, :d], p["conv.weight"],
                                    p.get("conv.bias"), (H, W), mcfg.conv_2d, NUMPY))[0].astype(np.float64)
    table = scans.direction_indices(scan_type, scan_count, (H, W))
    centre = (H // 2) * W + W // 2
    total = np.zeros(H * W)
    for k in range(K):
        order = table[k % scan_count]
        u = xs[k * Cp:(k + 1) * Cp][:, order]
        x_dbl = p["x_proj_weight"][k] @ u
        delta = _softplus(p["dt_projs_weight"][k] @ x_dbl[:R] + p["dt_projs_bias"][k][:, None])
        B, C = x_dbl[R:R + N], x_dbl[R + N:]
        A = -np.exp(p["A_logs"][k * Cp:(k + 1) * Cp].astype(np.float64))
        t = int(np.flatnonzero(order == centre)[0])
        cum = np.cumsum(delta[:, :t + 1, None] * A[:, None, :], axis=1)       # (C', t+1, N)
        row = np.einsum("n,csn,cs,ns->cs", C[:, t], np.exp(cum[:, t:t + 1] - cum), delta[:, :t + 1], B[:, :t + 1])
        total[order[:t + 1]] += np.abs(row).sum(axis=0)
    return total.reshape(H, W)


def figures_forgetting(out, weights):
    import matplotlib.pyplot as plt
    model, trained = demo_model(weights)
    crop = np.ascontiguousarray(sample_image()[96:160, 96:160])
    configs = [(None, 1, "raster x1 (plain Mamba)"), (None, 4, "raster x4"), ("diagonal", 1, "diagonal x1"),
               ("diagonal", 8, "all-around diagonal x8 (EAMamba)")]
    fig, axes = plt.subplots(1, len(configs), figsize=(2.9 * len(configs) + 1.0, 3.2), layout="constrained")
    for ax, (st, k, title) in zip(axes, configs):
        m = scan_influence_map(model, crop, st, k)
        im = ax.imshow(np.log10(m / m.max() + 1e-12), vmin=-4, vmax=0, cmap="inferno")
        ax.plot(32, 32, "c+", ms=8, mew=1.5)
        ax.set_title(title, fontsize=9)
        ax.set_xticks([]); ax.set_yticks([])
    fig.colorbar(im, ax=axes, shrink=0.8, label="log10 influence / max")
    what = "demo weights" if trained else "RANDOM weights (demo weights not found)"
    fig.suptitle(f"Influence of each pixel on the centre pixel (+) inside one MHSSM scan, "
                 f"encoder level 1, 64x64, {what}", fontsize=9)
    yield fig, os.path.join(out, "local_forgetting.png")


# ----------------------------------------------------------------------------- restoration
def figures_restoration(out, weights):
    import matplotlib.pyplot as plt
    from eamamba_ref.apps import inference
    from eamamba_ref.apps.metrics import psnr
    model, trained = demo_model(weights)
    if not trained:
        print(f"skipped denoise_before_after.png: no demo weights at {weights}")
        return
    clean = sample_image()
    noisy = clean + np.random.default_rng(0).standard_normal(clean.shape).astype(np.float32) * np.float32(25 / 255)
    restored = inference.padded(model, np.ascontiguousarray(noisy.transpose(2, 0, 1)[None]))[0].transpose(1, 2, 0)
    panels = [(f"noisy, sigma 25\n{psnr(noisy, clean):.2f} dB", noisy),
              (f"EAMamba (demo weights)\n{psnr(restored, clean):.2f} dB", restored), ("clean\n", clean)]
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.4))
    for ax, (title, img) in zip(axes, panels):
        ax.imshow(np.clip(img, 0, 1))
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    yield fig, os.path.join(out, "denoise_before_after.png")


# ------------------------------------------------------------------------------------ main
def main(argv=None):
    from eamamba_ref.apps.tasks import TASKS
    ap = argparse.ArgumentParser(prog="python scripts/make_figures.py", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "figures"), help="folder to write (default docs/figures)")
    ap.add_argument("--only", nargs="+", choices=FIGURES, default=list(FIGURES), help="which figures")
    ap.add_argument("--weights", default=TASKS["denoise"].bundled_path(),
                    help="denoiser for 'forgetting' and 'restoration' (default: the bundled demo weights)")
    args = ap.parse_args(argv)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from eamamba_ref.apps.draw import save_figure

    os.makedirs(args.out, exist_ok=True)
    umask = os.umask(0)
    os.umask(umask)
    makers = {"scans": lambda: figures_scans(args.out), "diagrams": lambda: figures_diagrams(args.out),
              "forgetting": lambda: figures_forgetting(args.out, args.weights),
              "restoration": lambda: figures_restoration(args.out, args.weights)}
    for name in FIGURES:
        if name not in args.only:
            continue
        for fig, path in makers[name]():
            save_figure(fig, path, overwrite=True)
            os.chmod(path, 0o666 & ~umask)      # save_figure's temp file is private (0600); a figure is not
            plt.close(fig)
            print(f"wrote {os.path.relpath(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
