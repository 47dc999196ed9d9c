"""The one script to run on a machine with an NVIDIA GPU: the CUDA path checked against NumPy, then timed.

    python3 benchmarks/gpu_check.py --out gpu_check.json      # from the repository root; < 5 min on an H200
    NUMBA_ENABLE_CUDASIM=1 python benchmarks/gpu_check.py --tiny --out sim.json   # rehearsal on the CPU

1. Environment: Python and the versions of numpy, numba, numba-cuda, scipy and torch (missing ones
   are named, not fatal unless the check needs them), and the GPU numba.cuda sees. If numba.cuda
   cannot be imported, numba-cuda is installed from the wheels in --wheels (default: .whl/ in the
   repository root) when there are any, else from the package index with a short timeout.
2. Kernels against the NumPy layers at small sizes (several blocks per launch, sizes off the tile
   and block multiples): the tiled and the plain GEMM, dense and depthwise convs, the element-wise
   functions, layer norm, pooling, the index kernels (exact), and the selective scan. The scan is
   compiled with fast math (``__expf``, denormals flushed, fused multiply-adds), which numba's CUDA
   simulator does not emulate: this is where its float32 agreement is measured.
3. The whole model, `EAMamba(..., backend='cuda')` against `backend='numpy'` with the same weights:
   the official denoising configuration (random weights) at 40x24 and two small SR models with the
   other layer kinds ('add' merge, zigzag, 1-D conv, GDFN, CCA, BiasFree, Hilbert).
4. Speed: median wall time of whole forwards of the official denoising model (random weights, dim 64,
   blocks [4, 6, 6, 7]) at 256x256 and 1024x1024 (upload and download included, after a warm-up run
   that compiles the kernels), and the same for the PyTorch reference (eamamba_ref.pytorch, chunked
   scan, TF32 off) on the same GPU when torch sees it, with the agreement of the two outputs at the
   first size. The tiled and plain GEMM kernels are timed on one level-1 convolution's product.
   Timings that would overrun --budget-s are skipped and say so.

Every relative error is max |got - want| / max |want| and has a threshold. The last line is
'GPU CHECK: PASS (<device>)' or 'GPU CHECK: FAIL (<device>; <what failed>)', the exit status 0 or 1.
Timings do not decide the verdict, but our CUDA forward must run at every timed size. --out gets
every figure as JSON (rewritten after each stage, so a run cut short still leaves what it measured).
"""
import argparse
import importlib
import json
import os
import platform
import subprocess
import sys
import time
import traceback
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for path in (ROOT, HERE):       # eamamba_ref from this checkout; bench_scan beside this file
    if path not in sys.path:
        sys.path.insert(0, path)

# Thresholds on relative max errors (docs/numerics.md): one float32 kernel 1e-5; the fast-math scan
# 1e-4 (__expf is a few ulp off, and a long-memory state accumulates it); the whole network 1e-4.
KERNEL_TOL = 1e-5
SCAN_TOL = 1e-4
MODEL_TOL = 1e-4
EXACT = 0.0


class Report:
    """The results dict, printed as it grows and written to --out after every stage."""

    def __init__(self, path):
        self.path = path
        self.data = {"environment": {}, "kernels": {}, "models": {}, "timings": [], "errors": [],
                     "verdict": None}
        self.failures = []

    def check(self, section, name, err, tol, **extra):
        ok = err is not None and err <= tol and err == err          # NaN fails
        self.data[section][name] = dict(rel_err=err, tol=tol, ok=bool(ok), **extra)
        shown = "n/a" if err is None else f"{err:.2e}"
        print(f"  {'ok  ' if ok else 'FAIL'} {name:34s} rel err {shown:>9s}  (threshold {tol:.0e})", flush=True)
        if not ok:
            self.failures.append(f"{section}/{name}")

    def error(self, stage, exc, fatal=True):
        text = f"{stage}: {type(exc).__name__}: {exc}"
        print(f"  ERROR {text}", flush=True)
        if not self.data["errors"]:     # the first error's traceback only: later ones often repeat it
            traceback.print_exc(limit=6)
        self.data["errors"].append(text)
        if fatal:
            self.failures.append(stage)

    def save(self):
        if self.path:
            with open(self.path, "w") as f:
                json.dump(self.data, f, indent=1, default=str)


def rel(got, want):
    import numpy as np
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        raise ValueError(f"shape {got.shape} != {want.shape}")
    err = float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))
    return err if err == err else float("inf")     # NaN: an unwritten (poisoned) element; fails


# ------------------------------------------------------------------------------ 1. environment
def versions():
    """{package: version or None} for what the check uses."""
    out = {}
    for name, module in (("numpy", "numpy"), ("scipy", "scipy"), ("numba", "numba"),
                         ("numba-cuda", "numba_cuda"), ("torch", "torch")):
        try:
            out[name] = getattr(importlib.import_module(module), "__version__", "?")
        except Exception as exc:   # noqa: BLE001 - a broken install is reported like a missing one
            out[name] = None
            out[name + " (import error)"] = f"{type(exc).__name__}: {exc}"[:200]
    return out


def install_numba_cuda(wheels):
    """pip install numba-cuda: from the wheels in `wheels` if any, else from the index (short
    timeout: machines without a network say so at once). Returns the pip output's last line."""
    target = os.path.join("/tmp", "gpu_check_site")
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--target", target]
    if wheels and os.path.isdir(wheels) and any(f.endswith(".whl") for f in os.listdir(wheels)):
        cmd += ["--no-index", "--find-links", wheels, "numba-cuda"]
    else:
        cmd += ["--timeout", "15", "--retries", "0", "numba-cuda"]
    print("  numba.cuda missing: " + " ".join(cmd), flush=True)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired:
        return "pip timed out"
    if proc.returncode == 0:
        sys.path.insert(0, target)
        importlib.invalidate_caches()
        return "installed"
    return (proc.stderr.strip().splitlines() or ["pip failed"])[-1][:300]


def environment(report, args):
    env = report.data["environment"]
    env.update(python=platform.python_version(), executable=sys.executable,
               simulator=os.environ.get("NUMBA_ENABLE_CUDASIM") == "1")
    env["packages"] = versions()
    missing = [k for k, v in env["packages"].items() if v is None]
    print(f"python {env['python']}; " + ", ".join(f"{k} {v}" for k, v in env["packages"].items()
                                                   if "error" not in k and v is not None), flush=True)
    for name in missing:
        print(f"  missing: {name} ({env['packages'].get(name + ' (import error)', 'not installed')})")
    if env["packages"]["numpy"] is None or env["packages"]["numba"] is None:
        raise RuntimeError("numpy and numba are required (pip install numpy numba)")
    try:
        from numba import cuda
    except ImportError:
        env["numba_cuda_install"] = install_numba_cuda(args.wheels)
        print(f"  numba-cuda install: {env['numba_cuda_install']}", flush=True)
        from numba import cuda                                        # raises if still missing
    if env["packages"]["numba-cuda"] is None:                         # older numba: built in
        env["packages"]["numba-cuda"] = f"numba.cuda of numba {env['packages']['numba']}"
    if not cuda.is_available():
        try:
            cuda.detect()
        except Exception:  # noqa: BLE001 - detect() only prints what it finds
            pass
        raise RuntimeError("numba.cuda sees no GPU (see the lines above)")
    if env["simulator"]:
        env["device"] = "CUDA simulator"
    else:
        dev = cuda.get_current_device()
        name = dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name)
        env["device"] = name
        env["compute_capability"] = list(dev.compute_capability)
        free, total = cuda.current_context().get_memory_info()
        env["gpu_memory_gib"] = round(total / 2**30, 1)
        try:
            env["driver"] = ".".join(map(str, cuda.cudadrv.driver.driver.get_version()))
        except Exception:  # noqa: BLE001 - informative only
            pass
    print(f"device: {env['device']}" + (f", compute capability {env.get('compute_capability')}, "
                                        f"{env.get('gpu_memory_gib')} GiB" if not env["simulator"] else ""),
          flush=True)


# --------------------------------------------------------------------------------- 2. kernels
def kernel_checks(report, tiny):
    import numpy as np

    from eamamba_ref.reference import layers, scans
    from eamamba_ref.runtime import backends as ssm
    from eamamba_ref.kernels.cuda import DeviceTensor
    from eamamba_ref.kernels.cuda import kernels as K
    from eamamba_ref.kernels.cuda import tensor as T
    from bench_scan import make_inputs

    rng = np.random.default_rng(0)

    def r(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    def dev(a):
        return DeviceTensor.from_host(a)

    def host(t):
        return t.to_host()

    def check(name, fn, tol=KERNEL_TOL):
        try:
            got, want = fn()
            report.check("kernels", name, rel(got, want), tol)
        except Exception as exc:  # noqa: BLE001 - one kernel's crash must not hide the others
            report.error(f"kernels/{name}", exc)

    def gemm(tiled):
        worst = 0.0
        for za, z, m, k, n in ((1, 3, 37, 19, 21), (2, 4, 33, 40, 18), (1, 2, 64, 576, 300))[:1 if tiny else 3]:
            a, b = r(za, m, k), r(z, k, n)
            c = DeviceTensor.empty((z, m, n))
            K.matmul_kernel(z, m, n, tiled=tiled)(dev(a).data, dev(b).data, c.data)
            want = np.matmul(np.tile(a, (z // za, 1, 1)).astype(np.float64), b.astype(np.float64))
            worst = max(worst, rel(host(c), want))
        return worst, 0.0

    print("kernels vs NumPy (small sizes, several blocks per launch):", flush=True)
    for tiled in (True, False):
        name = "gemm_tiled" if tiled else "gemm_simple"
        try:
            report.check("kernels", name, gemm(tiled)[0], KERNEL_TOL)
        except Exception as exc:  # noqa: BLE001
            report.error(f"kernels/{name}", exc)

    # sizes: a few blocks per launch on the simulator (--tiny), tens to hundreds on a GPU
    x = r(2, 5, 7, 6) if tiny else r(2, 5, 17, 13)
    check("conv3x3_im2col", lambda: (host(T.conv2d(dev(x), dev(w := r(7, 5, 3, 3)), dev(b := r(7)), 1)),
                                     layers.conv2d(x, w, b, 1)))
    check("conv1xk_asymmetric", lambda: (host(T.conv2d(dev(x), dev(w := r(3, 5, 1, 4)), None, (0, 3))),
                                         layers.conv2d(x, w, None, (0, 3))))
    check("conv_depthwise", lambda: (host(T.conv2d(dev(x), dev(w := r(5, 1, 3, 3)), dev(b := r(5)), 1, 5)),
                                     layers.conv2d(x, w, b, 1, 5)))
    v = np.concatenate([r(300 if tiny else 5000) * 4, np.float32([-30, -12, -9, 0, 9, 30])])
    for f in ("silu", "gelu", "sigmoid", "relu", "leaky_relu"):
        check(f, lambda f=f: (host(getattr(T, f)(dev(v))), getattr(layers, f)(v)))
    check("exp", lambda: (host(T.exp(dev(v / 4))), np.exp(v / 4)))
    h, g, bb = (r(2, 6, 5, 7), r(6), r(6)) if tiny else (r(2, 24, 19, 11), r(24), r(24))
    check("layer_norm_channels", lambda: (host(T.layer_norm_channels(dev(h), dev(g), dev(bb))),
                                          layers.layer_norm_channels(h, g, bb)))
    check("layer_norm_biasfree", lambda: (host(T.layer_norm_channels(dev(h), dev(g))),
                                          layers.layer_norm_channels(h, g)))
    check("avg_pool", lambda: (host(T.adaptive_avg_pool_1(dev(h))), layers.adaptive_avg_pool_1(h)))
    check("binary_broadcast", lambda: (host(dev(h) * dev(g[:, None, None]) + dev(bb[None, :, None, None])),
                                       h * g[:, None, None] + bb[None, :, None, None]))
    s = r(1, 2, 6, 4) if tiny else r(2, 6, 18, 10)
    check("pixel_unshuffle", lambda: (host(T.pixel_unshuffle(dev(s), 2)), layers.pixel_unshuffle(s, 2)), EXACT)
    su = layers.pixel_unshuffle(s, 2)
    check("pixel_shuffle", lambda: (host(T.pixel_shuffle(dev(su), 2)), s), EXACT)
    check("slice_concat", lambda: (host(T.concatenate([dev(h)[:, 3:5], dev(h)[:, :2]], axis=1)),
                                   np.concatenate([h[:, 3:5], h[:, :2]], 1)), EXACT)
    grid = (3, 5) if tiny else (19, 11)
    seq = r(2, 8 if tiny else 32, grid[0] * grid[1])
    for kind in (("diagonal", 8, "concate"), ("zigzag", 2, "add"), ("hilbert", 4, "concate")):
        y = scans.all_around(seq, grid, *kind)
        check(f"all_around_{kind[0]}", lambda kind=kind, y=y: (host(T.all_around(dev(seq), grid, *kind)), y), EXACT)
        # 'add' sums the directions on the way back: float32 sums, in another order than NumPy's
        check(f"restore_{kind[0]}", lambda kind=kind, y=y: (host(T.restore(dev(y), grid, *kind)),
                                                            scans.restore(y, grid, *kind)),
              EXACT if kind[2] == "concate" else KERNEL_TOL)

    # the selective scan (fast math) on EAMamba-like inputs: one chunk, and the chunked path
    scan_sizes = ((8, 20), (8, 70)) if tiny else ((24, 60), (64, 3000))
    for name, (dim, length) in zip(("scan_one_chunk", "scan_chunked"), scan_sizes):
        def run(dim=dim, length=length):
            p = make_inputs(dim, length, n_state=16, groups=8, seed=dim)
            args = dict(p, delta_softplus=True, return_last_state=True)
            got = ssm.selective_scan(**args, backend="cuda")
            want = ssm.selective_scan(**args, backend="numpy")
            return max(rel(g, w) for g, w in zip(got, want))
        try:
            report.check("kernels", name, run(), SCAN_TOL)
        except Exception as exc:  # noqa: BLE001
            report.error(f"kernels/{name}", exc)


# ------------------------------------------------------------------------------ 3. whole model
def model_configs(tiny):
    from eamamba_ref.io.config import ModelConfig, denoise_config
    mamba = dict(scan_type="diagonal", scan_count=8, scan_merge_method="concate", d_state=4, d_conv=3,
                 expand=2, conv_2d=True)
    sr = ModelConfig.from_args("eamambasr", dict(
        dim=8, num_blocks=[1, 1], upscale=2, channel_mixer_type="GDFN", layernorm_type="BiasFree",
        mamba_cfg=dict(mamba, scan_type="zigzag", scan_count=2, scan_merge_method="add", conv_2d=False,
                       d_conv=4, expand=1, bias=True)))
    cca = ModelConfig.from_args("eamambasr", dict(
        dim=8, num_blocks=[1], upscale=3, channel_mixer_type="CCA",
        mamba_cfg=dict(mamba, scan_type="hilbert", scan_count=4, expand=1)))
    if tiny:   # the simulator: the smallest model, to rehearse the script
        return [("sr_cca_hilbert", cca, (1, 3, 4, 4))]
    return [("official_denoise", denoise_config(), (1, 3, 40, 24)),
            ("sr_add_zigzag_gdfn", sr, (2, 3, 20, 12)), ("sr_cca_hilbert", cca, (1, 3, 16, 16))]


def model_checks(report, tiny):
    import numpy as np

    from eamamba_ref.runtime.model import EAMamba
    from eamamba_ref.reference.parameters import init_params
    print("whole model, backend 'cuda' vs 'numpy' (same weights):", flush=True)
    for name, cfg, shape in model_configs(tiny):
        try:
            params = init_params(cfg, seed=3)
            x = np.random.default_rng(4).random(shape, dtype=np.float32)
            t0 = time.perf_counter()
            want = EAMamba(cfg, params, backend="numpy")(x)
            t1 = time.perf_counter()
            got = EAMamba(cfg, params, backend="cuda")(x)
            t2 = time.perf_counter()
            report.check("models", name, rel(got, want), MODEL_TOL, input=list(shape),
                         numpy_s=round(t1 - t0, 2), cuda_first_call_s=round(t2 - t1, 2))
        except Exception as exc:  # noqa: BLE001
            report.error(f"models/{name}", exc)


# ---------------------------------------------------------------------------------- 4. timings
def median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(sorted(times)[len(times) // 2])


def gemm_timing(report, tiny):
    """Tiled vs plain GEMM on the product of a level-1 3x3 conv at 256x256 (64 x 576 @ 576 x 65536):
    the measurement behind the model's use of the tiled kernel."""
    import numpy as np
    from numba import cuda

    from eamamba_ref.kernels.cuda import DeviceTensor
    from eamamba_ref.kernels.cuda import kernels as K
    rng = np.random.default_rng(5)
    m, k, n = (16, 20, 40) if tiny else (64, 576, 65536)
    a = DeviceTensor.from_host(rng.standard_normal((1, m, k)).astype(np.float32))
    b = DeviceTensor.from_host(rng.standard_normal((1, k, n)).astype(np.float32))
    c = DeviceTensor.empty((1, m, n))
    row = {"gemm_shape": [m, k, n]}
    for tiled in (True, False):
        def run():
            K.matmul_kernel(1, m, n, tiled=tiled)(a.data, b.data, c.data)
            cuda.synchronize()
        run()
        t = median_time(run, 1 if tiny else 5)
        row["tiled_s" if tiled else "simple_s"] = t
        row["tiled_tflops" if tiled else "simple_tflops"] = 2 * m * k * n / t / 1e12
    print(f"  GEMM {m}x{k} @ {k}x{n}: tiled {row['tiled_s'] * 1e3:.2f} ms ({row['tiled_tflops']:.2f} TFLOP/s), "
          f"plain {row['simple_s'] * 1e3:.2f} ms ({row['simple_tflops']:.2f} TFLOP/s)", flush=True)
    report.data["gemm"] = row


def torch_gpu_runner(cfg, params, tiny):
    """The PyTorch reference on the GPU (chunked scan, TF32 off), or (None, reason)."""
    try:
        import torch

        from eamamba_ref import pytorch as torch_ref
    except Exception as exc:  # noqa: BLE001 - torch missing or broken: timings without it
        return None, f"torch unavailable ({type(exc).__name__}: {exc})"
    device = "cuda" if torch.cuda.is_available() else ("cpu" if tiny else None)
    if device is None:
        return None, "torch sees no CUDA device"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch_ref.set_scan_mode("chunked")
    model = torch_ref.build_from_args(cfg.name, cfg.to_args()).eval().to(device)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in params.items()}, strict=True)

    def run(x):
        with torch.no_grad():
            return model(torch.from_numpy(x).to(device)).cpu().numpy()   # the copy back synchronises
    return run, f"torch {torch.__version__} on {device}"


def release_numba_memory():
    """Free the device arrays numba has queued for deallocation, before torch allocates."""
    try:
        from numba import cuda
        cuda.current_context().deallocations.clear()
    except Exception:  # noqa: BLE001 - the simulator has no such queue; numba also frees on pressure
        pass


def release_torch_memory():
    try:
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001
        pass


def timings(report, args, deadline):
    import numpy as np
    from numba import cuda

    from eamamba_ref.io.config import denoise_config
    from eamamba_ref.runtime.model import EAMamba
    from eamamba_ref.reference.parameters import init_params
    if args.tiny:
        cfg, sizes = model_configs(True)[0][1], args.sizes or [4]
    else:
        cfg, sizes = denoise_config(), args.sizes or [256, 1024]
    params = init_params(cfg, seed=0)
    ours = EAMamba(cfg, params, backend="cuda")
    torch_run, torch_note = torch_gpu_runner(cfg, params, args.tiny)
    print(f"timings: {cfg.name} dim {cfg.dim} blocks {list(cfg.num_blocks)}, random weights; "
          f"reference: {torch_note}", flush=True)
    report.data["torch_reference"] = torch_note

    def timed(label, fn, x, size, row):
        """Warm-up, then up to args.repeats timed calls, as many as the deadline allows."""
        left = deadline - time.perf_counter()
        estimate = row.get(f"{label}_estimate_s")
        if estimate is not None and estimate > left:
            row[f"{label}_skipped"] = f"about {estimate:.0f} s needed, {left:.0f} s left"
            print(f"  {size}^2 {label}: skipped ({row[f'{label}_skipped']})", flush=True)
            return None
        start = time.perf_counter()
        out = fn(x)
        first = time.perf_counter() - start
        repeats = max(1, min(args.repeats, int((deadline - time.perf_counter()) / max(first, 1e-3)) - 1))
        t = median_time(lambda: fn(x), repeats)
        row.update({f"{label}_s": t, f"{label}_first_call_s": first, f"{label}_repeats": repeats})
        return out

    last = {}
    for size in sizes:
        x = np.random.default_rng(2).random((1, cfg.inp_channels, size, size), dtype=np.float32)
        row = {"size": size}
        scale = (size / last["size"]) ** 2 if last else None
        if scale:   # a forward's cost grows with the pixel count: skip what cannot finish in time
            for label in ("eamamba_ref_cuda", "torch"):
                if f"{label}_s" in last:
                    row[f"{label}_estimate_s"] = last[f"{label}_s"] * scale * (1 + args.repeats)
        try:
            free_before = cuda.current_context().get_memory_info()[0]
            y = timed("eamamba_ref_cuda", ours, x, size, row)
            row["gpu_mem_held_mib"] = (free_before - cuda.current_context().get_memory_info()[0]) / 2**20
            if y is not None and not np.isfinite(y).all():
                raise FloatingPointError("non-finite values in the CUDA output")
        except Exception as exc:  # noqa: BLE001 - our forward must run: a failure fails the check
            report.error(f"timings/eamamba_ref_cuda_{size}", exc)
            y = None
        if torch_run is not None:
            try:
                release_numba_memory()
                yt = timed("torch", torch_run, x, size, row)
                release_torch_memory()
                if y is not None and yt is not None and size == sizes[0]:
                    report.check("models", f"cuda_vs_torch_{size}", rel(y, yt), MODEL_TOL)
            except Exception as exc:  # noqa: BLE001 - the reference failing is reported, not fatal
                report.error(f"timings/torch_{size}", exc, fatal=False)
        for k in [k for k in row if k.endswith("_estimate_s")]:
            del row[k]
        if "eamamba_ref_cuda_s" in row and "torch_s" in row:
            row["torch_over_ours"] = row["torch_s"] / row["eamamba_ref_cuda_s"]
        report.data["timings"].append(row)
        line = f"  {size:5d}^2  eamamba_ref cuda " + (f"{row['eamamba_ref_cuda_s']:8.3f} s" if "eamamba_ref_cuda_s" in row else "     n/a")
        if "torch_s" in row:
            line += f"   torch_ref (chunked scan, same device) {row['torch_s']:8.3f} s   torch/ours {row['torch_over_ours']:5.2f}x"
        print(line, flush=True)
        report.save()
        last = row


# ---------------------------------------------------------------------------------------- main
def set_poison(on):
    from eamamba_ref.kernels.cuda import scan as gpu_scan
    gpu_scan.POISON_OUTPUTS = on


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", "--json", dest="out", help="write the results here as JSON")
    ap.add_argument("--sizes", type=int, nargs="+", help="timed image sizes (default 256 1024; --tiny: 4)")
    ap.add_argument("--repeats", type=int, default=3, help="timed forwards per size (after a warm-up)")
    ap.add_argument("--budget-s", type=float, default=240.0,
                    help="wall-clock budget in seconds: timings that would overrun it are skipped")
    ap.add_argument("--tiny", action="store_true", help="small models only (a rehearsal on the CUDA simulator)")
    ap.add_argument("--wheels", default=os.path.join(ROOT, ".whl"),
                    help="folder of wheels to install numba-cuda from if it is missing")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    deadline = start + args.budget_s
    report = Report(args.out)
    warnings.simplefilter("ignore")     # numba's under-utilisation notes, the 'not verified' note
    stages = [("environment", lambda: environment(report, args)),
              ("kernels", lambda: kernel_checks(report, args.tiny)),
              ("models", lambda: model_checks(report, args.tiny)),
              ("gemm_timing", lambda: gemm_timing(report, args.tiny)),
              ("timings", lambda: timings(report, args, deadline))]
    for stage, run in stages:
        t0 = time.perf_counter()
        try:
            if stage in ("kernels", "models"):     # outputs start as NaN: unwritten elements show
                set_poison(True)
            run()
        except Exception as exc:  # noqa: BLE001 - reported, and the verdict fails
            report.error(stage, exc)
            if stage == "environment":
                break
        finally:
            if stage in ("kernels", "models"):
                set_poison(False)
        report.data.setdefault("stage_s", {})[stage] = round(time.perf_counter() - t0, 1)
        report.save()
    ok = not report.failures
    report.data["verdict"] = "PASS" if ok else "FAIL"
    report.data["failures"] = report.failures
    report.data["total_s"] = round(time.perf_counter() - start, 1)
    report.save()
    print(f"total {report.data['total_s']} s")
    where = report.data["environment"].get("device", "no device")
    print(f"GPU CHECK: PASS ({where})" if ok else f"GPU CHECK: FAIL ({where}; {', '.join(report.failures)})",
          flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
