"""A correctness oracle for other EAMamba implementations: named activations, saved and compared.

    # every named activation of a forward pass, to a file
    python -m eamamba_ref.oracle run WEIGHTS --shape 1 3 64 64 -o numpy_trace.npz
    python -m eamamba_ref.oracle run WEIGHTS --shape 1 3 64 64 --impl torch -o torch_trace.npz
    # the first layer where two traces diverge
    python -m eamamba_ref.oracle compare numpy_trace.npz torch_trace.npz --tol 1e-4

Names are the official module names (`encoder_level1.0`, `encoder_level1.0.mamba`,
`encoder_level1.0.mamba.out_norm`, `down1_2`, `down1_2.body.0`, `encoder_level1.0.ffn.project_in`,
`output`, ...), plus the MHSSM's internal stages that are not modules in the official code
(`...mamba.act`, `all_around`, `x_proj`, `dt_proj`, `selective_scan`, `restore`, `gate`; the
PyTorch reference has identity modules of these names). Layouts: image-level activations
`(B, C, H, W)`; `mamba.conv` as the module outputs it (`(B, d, H, W)`, or `(B, d, L + k - 1)` for
the 1-D conv); the MHSSM's other stages `(B, C, L)` (its module outputs are tokens `(B, L, C)` in
the official code: transposed here), `all_around`/`x_proj`/`dt_proj` `(B, K, ., L)` in each
direction's scan order, `selective_scan` `(B, K*C', L)`. Another implementation only has to produce
the names it has; `compare` walks the first file's names in forward order, checks those present in
both and lists the names found in only one file.

The NumPy trace is taken from the code that runs (the fused MHSSM kernels with the default 'numba'
backend; `trace.py`); the stages those kernels never store (`conv`, `dt_proj`, `out_norm`) are
recomputed from the kernels' inputs while recording (docs/usage.md).

A trace file is an `.npz` (no pickle) with one array per name and a JSON `__meta__` entry.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import zipfile

import numpy as np

from eamamba_ref.io.atomic import atomic_output, check_destination
from eamamba_ref.apps.errors import CommandError, command
from eamamba_ref.runtime.trace import recording

META = "__meta__"
# torch modules whose outputs are tokens (B, L, C): stored transposed to (B, C, L)
_TOKEN_MODULES = (".mamba", ".mamba.in_proj", ".mamba.out_norm", ".mamba.gate", ".mamba.out_proj")


def trace_numpy(model, x):
    """Every named activation of `model(x)` (an eamamba_ref.EAMamba, with its backend), in forward
    order; `result` is the model's output, bitwise the same as without tracing."""
    with recording() as rec:
        out = model(x)
    rec.values["result"] = np.asarray(out, np.float32)      # the model output, under one name for all models
    return rec.values


def trace_torch(module, x):
    """Every named module output of a torch model (the PyTorch reference or the official code)."""
    import torch

    values, handles = {}, []

    def hook(name):
        def fn(_mod, _inp, out):
            if isinstance(out, torch.Tensor):
                v = out.detach().float().cpu().numpy()
                if name.endswith(_TOKEN_MODULES) and v.ndim == 3:
                    v = v.transpose(0, 2, 1)
                values[name] = np.array(v, order="C")     # a copy: a later in-place op (ReLU) must not change it
        return fn

    for name, mod in module.named_modules():
        if name:
            handles.append(mod.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            out = module(torch.from_numpy(np.ascontiguousarray(x, np.float32)))
    finally:
        for h in handles:
            h.remove()
    values["result"] = out.detach().float().cpu().numpy()
    return values


def save_trace(path, values, meta=None, overwrite=False):
    """Write a trace atomically: one array per name (forward order kept in the metadata).

    An existing `path` is refused (`atomic.OutputRefused`) unless `overwrite`; the name is used as given."""
    meta = dict(meta or {}, order=list(values))
    with atomic_output(path, overwrite) as tmp, open(tmp, "wb") as f:    # a file object: no '.npz' appended
        np.savez(f, **{META: np.array(json.dumps(meta))}, **values)


def load_trace(path):
    """(values in forward order, meta) from a trace file (no pickle); `CommandError` if it is not one."""
    if not os.path.isfile(path):
        raise CommandError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):
        raise CommandError(f"{path} is not an oracle trace (.npz)")
    try:
        with np.load(path, allow_pickle=False) as f:
            meta = json.loads(str(f[META])) if META in f.files else {}
            order = meta.get("order") or [k for k in f.files if k != META]
            return {k: f[k] for k in order if k in f.files}, meta
    except (ValueError, zipfile.BadZipFile) as err:      # object arrays, broken members, bad JSON
        raise CommandError(f"{path} is not an oracle trace (.npz): {err}") from None


def unmatched(reference, other):
    """(names only in `reference`, names only in `other`), each in its file's order."""
    return [n for n in reference if n not in other], [n for n in other if n not in reference]


def compare(reference, other, tol=1e-4):
    """Walk `reference`'s names in order; return (first divergent name or None, rows).

    rows: (name, relative error max|a-b|/max|ref|, shapes) for every name present in both.
    A shape mismatch counts as a divergence (relative error inf).
    """
    rows, first = [], None
    for name, ref in reference.items():
        if name not in other:
            continue
        got = other[name]
        if ref.shape != got.shape:
            err = float("inf")
        else:
            scale = float(np.max(np.abs(ref))) if ref.size else 0.0
            diff = float(np.max(np.abs(ref.astype(np.float64) - got))) if ref.size else 0.0
            err = diff / scale if scale > 0 else diff
        rows.append((name, err, ref.shape, got.shape))
        if first is None and not err <= tol:
            first = name
    return first, rows


def _torch_model(model):
    try:
        import torch
    except ImportError:
        raise CommandError('--impl torch needs PyTorch: pip install "eamamba_ref[torch]"') from None
    from eamamba_ref.pytorch import build_from_args

    module = build_from_args(model.config.name, model.config.to_args()).eval()
    module.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in model.params.items()}, strict=True)
    return module


@command
def main(argv=None):
    """The oracle command; returns the exit status (errors: one line on stderr, see errors.command)."""
    ap = argparse.ArgumentParser(prog="python -m eamamba_ref.oracle", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="trace a forward pass")
    run.add_argument("weights", help="official .pth, bare state dict or converted .npz")
    run.add_argument("--impl", choices=["numpy", "torch"], default="numpy",
                     help="numpy (this project) or torch (the PyTorch reference on the same weights)")
    run.add_argument("--input", help="an image file, or a trace .npz whose 'input' to run on "
                     "(otherwise a seeded random input of --shape)")
    run.add_argument("--shape", type=int, nargs=4, default=[1, 3, 32, 32], metavar=("B", "C", "H", "W"))
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("-o", "--output", required=True, help="trace file to write (.npz)")
    run.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    cmp_ = sub.add_parser("compare", help="first layer where two traces diverge")
    cmp_.add_argument("reference")
    cmp_.add_argument("other")
    cmp_.add_argument("--tol", type=float, default=1e-4, help="relative tolerance (default 1e-4)")
    cmp_.add_argument("--all", action="store_true", help="print every compared layer")
    args = ap.parse_args(argv)

    from eamamba_ref.io.images import read_image
    from eamamba_ref.io.loading import load

    if args.cmd == "run":
        # before the forward pass: never the input or the weights, never an existing file unless asked
        check_destination(args.output, args.overwrite, inputs=[p for p in (args.input, args.weights) if p])
        model = load(args.weights)
        if args.input and args.input.endswith(".npz"):     # another trace: run on its input
            traced, _ = load_trace(args.input)
            if "input" not in traced:
                raise CommandError(f"{args.input}: trace has no 'input' array")
            x = traced["input"]
        elif args.input:
            px = read_image(args.input).pixels
            x = np.ascontiguousarray(np.repeat(px, 3, 2) if px.shape[2] == 1 else px).transpose(2, 0, 1)[None]
        else:
            if args.shape[1] != model.config.inp_channels or min(args.shape) < 1:
                raise CommandError(f"--shape {' '.join(map(str, args.shape))}: {args.weights} takes "
                                   f"{model.config.inp_channels} input channels (B C H W, all >= 1)")
            x = np.random.default_rng(args.seed).random(tuple(args.shape), dtype=np.float32)
        values = trace_numpy(model, x) if args.impl == "numpy" else trace_torch(_torch_model(model), x)
        save_trace(args.output, {"input": np.ascontiguousarray(x, np.float32), **values},
                   {"impl": args.impl, "weights": str(args.weights), "config": model.config.to_json()},
                   overwrite=args.overwrite)
        print(f"wrote {len(values)} activations to {args.output}")
        return 0
    ref, meta_a = load_trace(args.reference)
    other, meta_b = load_trace(args.other)
    first, rows = compare(ref, other, args.tol)
    if not rows:
        print("error: the two traces have no activation name in common", file=sys.stderr)
        return 2
    for path, names in zip((args.reference, args.other), unmatched(ref, other)):
        if names:
            shown = names if args.all or len(names) <= 8 else names[:8] + ["..."]
            print(f"only in {path}: {len(names)} name{'s' * (len(names) > 1)} ({', '.join(shown)})")
    for name, err, sa, sb in rows:
        if args.all or name == first:
            shape = f"{sa}" if sa == sb else f"{sa} vs {sb}"
            print(f"{name:45s} rel. error {err:.3g}  {shape}")
    if first is None:
        print(f"agree: {len(rows)} common activations within relative error {args.tol:g} "
              f"(largest {max(r[1] for r in rows):.3g})")
        return 0
    print(f"first divergence: {first} (relative error above {args.tol:g}; {len(rows)} common activations)")
    return 1
