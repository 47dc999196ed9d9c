"""Convert an official checkpoint to this project's NumPy format, without torch.

    python -m eamamba_ref.convert IN.pth OUT.npz [--weights ema|raw] [--scan-type diagonal] [--task denoise]
                                  [--overwrite]

Reads the official `.pth` with the restricted (code-free) reader, builds and checks the model it
describes, and writes a `.npz` holding every tensor under its official name plus the config as JSON
(and the task the weights were trained for, when given, so that `restore --task` can check it).
Prints what it found: architecture, parameter count, scan configuration, which weights.
The output is written atomically, with the usual (umask) permissions, and never replaces an
existing file without --overwrite, nor the input file at all.
"""
from __future__ import annotations

import argparse
import os
import sys

from eamamba_ref.io.checkpoint import CheckpointError, CheckpointExistsError, save_converted
from eamamba_ref.io.config import ConfigError
from eamamba_ref.io.loading import load
from eamamba_ref.apps.tasks import TASKS, check_task


def describe(info):
    cfg = info["config"]
    m = cfg.mamba
    lines = [
        f"architecture : {cfg.name} (dim {cfg.dim}, blocks {list(cfg.num_blocks)}"
        + (f", {cfg.num_refinement_blocks} refinement" if cfg.name == "eamamba" else f", upscale x{cfg.upscale}")
        + f", {cfg.channel_mixer_type} mixer, {cfg.layernorm_type} LayerNorm)",
        f"channels     : {cfg.inp_channels} in, {cfg.out_channels} out",
        f"parameters   : {info['num_params']:,}",
        f"scan         : {m.scan_type or 'raster'} x{m.scan_count} directions, '{m.scan_merge_method}' merge, "
        f"d_state {m.d_state}, d_conv {m.d_conv} ({'2-D' if m.conv_2d else 'causal 1-D'}), expand {m.expand}",
        f"weights      : {info['weights']} ({info['kind']})",
    ]
    task = (info.get("meta") or {}).get("task")
    if task:
        lines.append(f"task         : {task}")
    lines += [f"note         : {n}" for n in info["notes"]]
    return "\n".join(lines)


def _check_output(input_path, output, overwrite):
    """Refuse, before any work, an output that is the input, a folder, in a missing folder, or exists."""
    if os.path.exists(input_path) and os.path.exists(output) and os.path.samefile(input_path, output):
        raise CheckpointError(f"{output} is the input file; write the converted weights to another file")
    if os.path.isdir(output):
        raise CheckpointError(f"{output} is a folder; give the name of the .npz file to write")
    folder = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(folder):
        raise CheckpointError(f"output folder {folder} does not exist")
    if not overwrite and os.path.lexists(output):
        raise CheckpointExistsError(f"{output} exists; pass --overwrite to replace it")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m eamamba_ref.convert", description=__doc__.split("\n")[0])
    ap.add_argument("input", help="official checkpoint (.pth) or bare state dict")
    ap.add_argument("output", help="converted file to write (.npz)")
    ap.add_argument("--weights", choices=["ema", "raw"], default="ema",
                    help="which weights of an official checkpoint (default: ema, as the official test.py)")
    ap.add_argument("--scan-type", default=None, help="scan ordering of a bare state dict (default diagonal)")
    ap.add_argument("--task", choices=list(TASKS), metavar="TASK",
                    help="record the task the weights were trained for (restore --task then checks it); "
                         "one of: " + ", ".join(TASKS))
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = ap.parse_args(argv)
    try:
        _check_output(args.input, args.output, args.overwrite)
        model, info = load(args.input, weights=args.weights, scan_type=args.scan_type, return_info=True)
        meta = {"source": str(args.input), "weights": info["weights"], "notes": info["notes"]}
        if args.task:
            check_task(info["meta"], args.task)       # a converted input may record another task
        inherited = (info["meta"] or {}).get("task")
        task = args.task or (inherited if isinstance(inherited, str) else None)
        if task:
            meta["task"] = task
            info["meta"] = {**(info["meta"] or {}), "task": task}
        cfg = model.config
        save_converted(args.output, cfg.name, cfg.to_args(), model.params, meta=meta, overwrite=args.overwrite)
    except CheckpointExistsError:   # created meanwhile: the library's message names its keyword argument
        print(f"error: {args.output} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    except (CheckpointError, ConfigError, OSError, ValueError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"error: not enough memory to convert {args.input}", file=sys.stderr)
        return 2
    print(describe(info))
    print(f"wrote        : {args.output}")
    return 0
