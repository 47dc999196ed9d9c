"""Convert an official checkpoint to this project's NumPy format, without torch.

    python -m eamamba_ref.convert IN.pth OUT.npz [--weights ema|raw] [--scan-type diagonal] [--overwrite]

Reads the official `.pth` with the restricted (code-free) reader, builds and checks the model it
describes, and writes a `.npz` holding every tensor under its official name plus the config as JSON.
Prints what it found: architecture, parameter count, scan configuration, which weights.
"""
from __future__ import annotations

import argparse
import sys

from .checkpoint import CheckpointError, save_converted
from .config import ConfigError
from .loading import load


def describe(info):
    cfg = info["config"]
    m = cfg.mamba
    lines = [
        f"architecture : {cfg.name} (dim {cfg.dim}, blocks {list(cfg.num_blocks)}"
        + (f", {cfg.num_refinement_blocks} refinement" if cfg.name == "eamamba" else f", upscale x{cfg.upscale}")
        + f", {cfg.channel_mixer_type} mixer, {cfg.layernorm_type} LayerNorm)",
        f"parameters   : {info['num_params']:,}",
        f"scan         : {m.scan_type or 'raster'} x{m.scan_count} directions, '{m.scan_merge_method}' merge, "
        f"d_state {m.d_state}, d_conv {m.d_conv} ({'2-D' if m.conv_2d else 'causal 1-D'}), expand {m.expand}",
        f"weights      : {info['weights']} ({info['kind']})",
    ]
    lines += [f"note         : {n}" for n in info["notes"]]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m eamamba_ref.convert", description=__doc__.split("\n")[0])
    ap.add_argument("input", help="official checkpoint (.pth) or bare state dict")
    ap.add_argument("output", help="converted file to write (.npz)")
    ap.add_argument("--weights", choices=["ema", "raw"], default="ema",
                    help="which weights of an official checkpoint (default: ema, as the official test.py)")
    ap.add_argument("--scan-type", default=None, help="scan ordering of a bare state dict (default diagonal)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = ap.parse_args(argv)
    try:
        model, info = load(args.input, weights=args.weights, scan_type=args.scan_type, return_info=True)
        cfg = model.config
        save_converted(args.output, cfg.name, cfg.to_args(), model.params,
                       meta={"source": str(args.input), "weights": info["weights"], "notes": info["notes"]},
                       overwrite=args.overwrite)
    except (CheckpointError, ConfigError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(describe(info))
    print(f"wrote        : {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
