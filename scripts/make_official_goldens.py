"""Write golden files from the official EAMamba code: checkpoints, inputs, outputs, per-layer traces.

    python scripts/make_official_goldens.py --official /path/to/EAMamba [--commit SHA] [--out tests/golden]

DIR is a checkout of the official code (github daidaijr/EAMamba); it is imported from there and
nothing of it is copied. It needs torch, einops and numpy-hilbert-curve; mamba_ssm's CUDA selective
scan is replaced by this project's pure-torch one (`eamamba_ref.pytorch.selective_scan`, run
step by step, i.e. `selective_scan_ref`'s loop), injected as a stand-in `mamba_ssm` module before
the official model files are imported. Everything runs on the CPU in float32.

For every case (a small random-weight configuration, seeded) the official `models.make` builds the
model and its EMA copy exactly as the official `train.py` does; the EMA weights are then perturbed
(so LayerNorm biases, D, A are not at their initial values) and the output is the EMA model's, as
the official `test.py` evaluates. Written under OUT/<case>/:

    checkpoint.pth   the official train.py layout {'model': {'name','args','sd','sd_e'}, 'optimizer',
                     'current_iter', 'state'} via torch.save ('sd' shares every tensor with 'sd_e'
                     except `output.weight` / `conv_last.weight`, so the raw weights give a different
                     output and the file stays small)
    weights.npz      'sd_e' as plain arrays under the official names (the converted format of
                     eamamba_ref.io.checkpoint: np.load(allow_pickle=False) reads it)
    io.npz           x0, y0[, x1, y1]: float32 inputs (B, C, H, W) and the official outputs
    trace.npz        (some cases) every named module output of the official model on the last
                     input, in the format of `python -m eamamba_ref.oracle`

and OUT/manifest.json: official commit, torch/numpy versions, the cases with their args and files,
the cases the official code cannot run, and the official scan permutations (OUT/scans.npz).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import subprocess
import sys
import types

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from eamamba_ref.apps import oracle  # noqa: E402
from eamamba_ref.io.checkpoint import save_converted  # noqa: E402
from eamamba_ref.pytorch.selective_scan import selective_scan  # noqa: E402

# ----------------------------------------------------------------------------------------------
# The cases

SCAN_TYPES = [None, "diagonal", "zigzag", "zorder", "hilbert"]     # None: raster (row-major)

# One MHSSM block of EAMambaSR: cheap (a few thousand parameters), any input size.
SR_BASE = dict(inp_channels=3, out_channels=3, dim=4, num_blocks=[1], ffn_expansion_factor=2.0,
               bias=False, layernorm_type="WithBias", channel_mixer_type="Simple", upscale=2,
               mamba_cfg=dict(scan_type="diagonal", scan_count=8, scan_merge_method="concate",
                              disable_z_branch=False, d_state=4, d_conv=3, expand=4, conv_2d=True))
SR_INPUTS = [(1, 3, 12, 20), (1, 3, 7, 13)]

# The U-Net at its smallest: every level runs one block, so the scans run on four grids.
UNET_BASE = dict(inp_channels=3, out_channels=3, dim=4, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1,
                 ffn_expansion_factor=2.0, bias=False, layernorm_type="WithBias", dual_pixel_task=False,
                 channel_mixer_type="Simple", upscale=1,
                 mamba_cfg=dict(scan_type="diagonal", scan_count=8, scan_merge_method="concate",
                                disable_z_branch=False, d_state=4, d_conv=3, expand=4, conv_2d=True))
UNET_INPUTS = [(1, 3, 16, 24), (1, 3, 8, 8)]

# At its initial scale the MHSSM branch is a small part of the output: a wrong scan ordering would
# move the output by only ~1e-3 of its range. Scaling out_proj makes it 2e-3..5e-3 (measured).
MHSSM_GAIN = 8.0

# What the official code cannot run (checked by this script: each must raise).
UNRUNNABLE = [
    ("scan_count 1", "eamambasr", dict(mamba_cfg=dict(scan_type="diagonal", scan_count=1)), (1, 3, 8, 8)),
    ("raster (scan_type None) with scan_count 8", "eamambasr",
     dict(mamba_cfg=dict(scan_type=None, scan_count=8)), (1, 3, 8, 8)),
    ("'concate' with fewer than 2 channels per direction (d_inner 8, 8 directions)", "eamambasr",
     dict(mamba_cfg=dict(expand=2)), (1, 3, 8, 8)),
    ("Hilbert on a 1x1 map (here a U-Net whose latent level is 1x1)", "eamamba",
     dict(mamba_cfg=dict(scan_type="hilbert")), (1, 3, 8, 8)),
    ("EAMambaSR with scale 5", "eamambasr", dict(upscale=5), (1, 3, 8, 8)),
    ("EAMamba (U-Net) with upscale 2", "eamamba", dict(upscale=2), (1, 3, 8, 8)),
]


def merged(base, over):
    out = dict(base, **{k: v for k, v in over.items() if k != "mamba_cfg"})
    out["mamba_cfg"] = dict(base["mamba_cfg"], **over.get("mamba_cfg", {}))
    return out


def cases():
    """(case id, model name, args, input shapes, with trace)."""
    out = []
    for st in SCAN_TYPES:
        for k in (2, 4, 8):
            if st is None and k == 8:
                continue        # the official code cannot run it: see UNRUNNABLE
            for merge in ("add", "concate"):
                args = merged(SR_BASE, dict(mamba_cfg=dict(scan_type=st, scan_count=k, scan_merge_method=merge)))
                trace = (st, k, merge) == ("diagonal", 8, "concate")
                out.append((f"scan-{st or 'raster'}-{k}-{merge}", "eamambasr", args, SR_INPUTS, trace))
    for scale in (2, 3, 4):
        # the light-SR release's block (ffn factor 1, d_state 10), small
        args = merged(SR_BASE, dict(dim=8, upscale=scale, ffn_expansion_factor=1.0,
                                    mamba_cfg=dict(d_state=10, expand=2)))
        out.append((f"sr-x{scale}", "eamambasr", args, SR_INPUTS[1:], False))
    for mixer in ("GDFN", "FFN", "CCA"):
        out.append((f"mixer-{mixer.lower()}", "eamambasr", merged(SR_BASE, dict(channel_mixer_type=mixer)),
                    SR_INPUTS, False))
    out.append(("biasfree-bias", "eamambasr",
                merged(SR_BASE, dict(layernorm_type="BiasFree", bias=True)), SR_INPUTS, False))
    out.append(("conv1d", "eamambasr", merged(SR_BASE, dict(mamba_cfg=dict(conv_2d=False, d_conv=4))),
                SR_INPUTS, False))
    out.append(("no-z-branch", "eamambasr", merged(SR_BASE, dict(mamba_cfg=dict(disable_z_branch=True))),
                SR_INPUTS, False))
    out.append(("mamba-bias-dtrank", "eamambasr",
                merged(SR_BASE, dict(mamba_cfg=dict(bias=True, conv_bias=False, dt_rank=3))), SR_INPUTS, False))
    # A released-style args dict: the YAML's keys, including those the constructor ignores
    # (LayerNorm_type, checkpoint_percentage) and a capitalised scan type.
    unet = merged(UNET_BASE, dict(LayerNorm_type="WithBias", checkpoint_percentage=0.0,
                                  mamba_cfg=dict(scan_type="Diagonal")))
    out.append(("unet-diagonal-8-concate", "eamamba", unet, UNET_INPUTS, True))
    # dual-pixel input (6 channels, skip_conv), with the U-Net's other options (BiasFree, bias, GDFN)
    out.append(("unet-dual-pixel-biasfree-gdfn", "eamamba",
                merged(UNET_BASE, dict(inp_channels=6, dual_pixel_task=True, layernorm_type="BiasFree",
                                       bias=True, channel_mixer_type="GDFN",
                                       mamba_cfg=dict(scan_type="zigzag", scan_count=4, expand=2))),
                [(1, 6, 16, 24)], False))
    return out


# ----------------------------------------------------------------------------------------------
# The official code, with the pure-torch scan standing in for mamba_ssm

def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False):
    """mamba_ssm's `selective_scan_fn` signature; the step-by-step pure-torch recurrence."""
    return selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                          mode="sequential")


def import_official(directory):
    """The official `models` package from `directory`, with a stand-in mamba_ssm."""
    if not os.path.isfile(os.path.join(directory, "models", "eamamba.py")):
        sys.exit(f"error: {directory} is not a checkout of the official EAMamba code (no models/eamamba.py)")
    names = ["mamba_ssm", "mamba_ssm.ops", "mamba_ssm.ops.selective_scan_interface"]
    for name in names:
        sys.modules[name] = types.ModuleType(name)
    sys.modules["mamba_ssm.ops.selective_scan_interface"].selective_scan_fn = selective_scan_fn
    sys.path.insert(0, os.path.abspath(directory))
    return importlib.import_module("models")


def official_commit(directory, given):
    if given:
        return given
    try:
        return subprocess.run(["git", "-C", directory, "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def perturb(sd, gen):
    """Move every float tensor off its initial value: w + 0.1 * std(w) * noise (std 1 if w is constant)."""
    out = {}
    for k, v in sd.items():
        if v.is_floating_point():
            s = float(v.std()) if v.numel() > 1 else 0.0
            v = v + 0.1 * (s if s > 0 else 1.0) * torch.randn(v.shape, generator=gen)
        out[k] = v.detach().clone().contiguous()
    return out


def make_case(models, name, args, seed):
    """(model_e in eval mode with the perturbed weights, sd, sd_e, model's parameters), built the official way."""
    torch.manual_seed(seed)
    model, model_e = models.make({"name": name, "args": args})
    gen = torch.Generator().manual_seed(seed + 1)
    sd_e = perturb(model_e.state_dict(), gen)
    for k in sd_e:
        if k.endswith("mamba.out_proj.weight"):
            sd_e[k] = sd_e[k] * MHSSM_GAIN
    model_e.load_state_dict(sd_e, strict=True)
    # raw weights: the same tensors (stored once) except the last conv, so 'sd' != 'sd_e' in output
    last = "output.weight" if name == "eamamba" else "conv_last.weight"
    sd = dict(sd_e)
    sd[last] = sd_e[last] + 0.5 * sd_e[last].std() * torch.randn(sd_e[last].shape, generator=gen)
    return model_e.eval(), sd, sd_e, model.parameters()


def save_checkpoint(path, name, args, sd, sd_e, params):
    optimizer = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)     # a state dict before any step
    torch.save({"model": {"name": name, "args": args, "sd": sd, "sd_e": sd_e},
                "optimizer": {"name": "AdamW", "args": {"lr": 2e-4, "weight_decay": 0.0},
                              "sd": optimizer.state_dict()},
                "current_iter": 1, "state": torch.get_rng_state()}, path)


def scan_permutations(models):
    """The official ScanTransform's direction orders: {key: (K, L) int16} and their list.

    Direction k's step t reads pixel table[k, t] of the row-major map (the same for both merges:
    checked here), and restore_scan_transform inverts apply_scan_transform (checked here).
    """
    from models.module.scan import ScanTransform

    grids = [(h, w) for h in (1, 2, 3, 4, 5, 6, 7, 8) for w in (1, 2, 3, 4, 5, 7, 8)]
    grids += [(11, 16), (16, 11), (16, 16), (12, 20), (32, 24)]
    tables, keys = {}, []
    for st in SCAN_TYPES:
        for k in (2, 4, 8):
            if st is None and k == 8:
                continue
            for h, w in grids:
                if st == "hilbert" and h * w == 1:
                    continue            # the official code cannot run it
                L = h * w
                got = {}
                for merge in ("concate", "add"):
                    tr = ScanTransform(st, k, merge)
                    C = k if merge == "concate" else 1
                    x = torch.arange(C * L, dtype=torch.float64).view(1, C, L)
                    y = tr.apply_scan_transform(x.clone(), (h, w))            # (1, k, C', L)
                    pos = (y[0] % L).long()                                    # pixel read at each step
                    got[merge] = pos[:, 0, :]          # (add: C' = 1; concate: C' = 1 per head)
                    back = tr.restore_scan_transform(y.clone(), (h, w))
                    expect = x if merge == "concate" else k * x
                    assert torch.equal(back, expect), (st, k, merge, h, w)
                    if merge == "concate":     # head j holds channel j of the input
                        assert torch.equal((y[0, :, 0, :] // L).long(), torch.arange(k)[:, None].expand(k, L))
                assert torch.equal(got["concate"], got["add"]), (st, k, h, w)
                key = f"{st or 'raster'}-{k}-{h}x{w}"
                tables[key] = got["concate"].numpy().astype(np.int16)
                keys.append(dict(key=key, scan_type=st, scan_count=k, height=h, width=w))
    return tables, keys


def check_unrunnable(models):
    """Each UNRUNNABLE case must fail in the official code; returns their descriptions."""
    notes = []
    for what, name, over, shape in UNRUNNABLE:
        base = SR_BASE if name == "eamambasr" else UNET_BASE
        try:
            torch.manual_seed(0)
            model, model_e = models.make({"name": name, "args": merged(base, over)})
            model_e.load_state_dict(model.state_dict())      # as loading a checkpoint does
            with torch.no_grad():
                model.eval()(torch.rand(shape))
        except Exception as err:   # noqa: BLE001 -- any failure of the official code is the point
            notes.append(dict(case=what, model=name, args_override=over, input_shape=list(shape),
                              official_error=f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"))
            continue
        raise SystemExit(f"error: the official code ran '{what}', listed as unrunnable")
    return notes


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--official", required=True, help="a checkout of the official EAMamba code")
    ap.add_argument("--commit", help="its commit (default: git rev-parse HEAD in it)")
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "golden"))
    ap.add_argument("--only", nargs="*", help="case ids to (re)write (default all)")
    args = ap.parse_args(argv)

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    models = import_official(args.official)
    os.makedirs(args.out, exist_ok=True)
    manifest_path = os.path.join(args.out, "manifest.json")
    old = {}
    if args.only and os.path.exists(manifest_path):
        with open(manifest_path) as f:
            old = {c["id"]: c for c in json.load(f)["cases"]}
    entries = []
    for seed, (cid, name, margs, shapes, with_trace) in enumerate(cases()):
        if args.only and cid not in args.only:
            if cid in old:
                entries.append(old[cid])
            continue
        folder = os.path.join(args.out, cid)
        os.makedirs(folder, exist_ok=True)
        model_e, sd, sd_e, params = make_case(models, name, margs, 1000 + seed)
        save_checkpoint(os.path.join(folder, "checkpoint.pth"), name, margs, sd, sd_e, params)
        save_converted(os.path.join(folder, "weights.npz"), name, margs,
                       {k: v.numpy() for k, v in sd_e.items()},
                       meta={"source": "official code, EMA weights ('sd_e') of checkpoint.pth"}, overwrite=True)
        rng = np.random.default_rng(seed)
        io, ratios = {}, []
        for i, shape in enumerate(shapes):
            x = rng.random(shape, dtype=np.float32)
            with torch.no_grad():
                y = model_e(torch.from_numpy(x)).numpy()
            io[f"x{i}"], io[f"y{i}"] = x, y
            if name == "eamamba" and not margs.get("dual_pixel_task"):
                ratios.append(float(np.abs(y - x).max() / np.abs(y).max()))
        np.savez(os.path.join(folder, "io.npz"), **io)
        files = ["checkpoint.pth", "weights.npz", "io.npz"]
        if with_trace:
            x = io[f"x{len(shapes) - 1}"]
            values = oracle.trace_torch(model_e, x)
            oracle.save_trace(os.path.join(folder, "trace.npz"), {"input": x, **values},
                              {"impl": "official", "config": json.dumps({"name": name, "args": margs})})
            files.append("trace.npz")
        n_params = sum(int(v.numel()) for v in sd_e.values())
        entries.append(dict(id=cid, model=name, args=margs, seed=1000 + seed, params=n_params,
                            inputs=[list(s) for s in shapes], files=files,
                            **({"network_share": ratios} if ratios else {})))
        print(f"{cid:28s} {name:9s} {n_params:6d} params  inputs {shapes}", flush=True)

    tables, keys = scan_permutations(models)
    np.savez(os.path.join(args.out, "scans.npz"), **tables)
    manifest = {
        "official": {"repository": "github.com/daidaijr/EAMamba",
                     "commit": official_commit(args.official, args.commit)},
        "generator": "scripts/make_official_goldens.py",
        "selective_scan": "eamamba_ref.pytorch.selective_scan, mode 'sequential' (stand-in for mamba_ssm)",
        "torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version(),
        "device": "cpu", "dtype": "float32",
        "cases": entries,
        "unrunnable": check_unrunnable(models),
        "scans": {"file": "scans.npz", "tables": keys},
    }
    with open(manifest_path, "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    print(f"wrote {len(entries)} cases, {len(keys)} scan tables to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
