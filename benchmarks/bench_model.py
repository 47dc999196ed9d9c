"""Benchmark of the whole EAMamba denoising model: eamamba_ref vs the PyTorch reference, side by side.

Run:  python benchmarks/bench_model.py                      (64, 128, 256, 512; a few minutes)
      python benchmarks/bench_model.py --sizes 64 128 --repeats 1 --no-profile   (quick)
      python benchmarks/bench_model.py --checkpoint model.npz

For every size, each implementation runs in a child process of its own (so that its peak resident
memory is its own): one warm-up forward, then `--repeats` timed ones, *interleaved* between the
implementations (ours, torch, ours, torch, ...: the children wait for their turn), so that a
machine whose speed drifts over minutes (shared hosts do) slows both alike. Printed are the
median wall time, the peak RSS of the child during the timed forwards (sampled every 5 ms) and its
growth over the RSS before them (model built, warm-up done), and the time ratio torch /
eamamba_ref. Both use the same weights (random, `model.init_params` with a fixed seed, or the
checkpoint) and the same number of threads; torch runs the reference's vectorised chunked scan
with denormals flushed.

Also printed: this machine's FLOP floor for the model (a large float32 GEMM and the model's typical
1x1-conv GEMM through NumPy's BLAS, and NumPy's float32 exp, measured here and now) with the
fraction of it reached, and a per-stage profile of one eamamba_ref forward.

The machine may be shared: the load average is printed before and after; compare only ratios
measured in the same run.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def load_average():
    try:
        return "load average %.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        return "load average unavailable"


def rss_mib():
    """Current resident set size of this process (MiB), from /proc (Linux) or 0."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return 0.0


# ------------------------------------------------------------------------------------------------
# The model and its weights (the same in every child)

def build(checkpoint, seed):
    """(config, params) of the official denoising model, or of a checkpoint."""
    from eamamba_ref.config import denoise_config
    from eamamba_ref.model import init_params
    if checkpoint:
        from eamamba_ref.loading import load
        model = load(checkpoint)
        return model.config, model.params
    cfg = denoise_config()
    return cfg, init_params(cfg, seed)


def make_input(cfg, size, seed=1):
    return np.random.default_rng(seed).random((1, cfg.inp_channels, size, size), dtype=np.float32)


def child(impl, size, repeats, threads, checkpoint, seed):
    """Runs in a child process: time `repeats` forwards of one implementation; prints JSON."""
    if impl == "torch":
        import torch  # noqa: F401  (before eamamba_ref: torch's OpenMP reads the environment as it loads)
    cfg, params = build(checkpoint, seed)
    x = make_input(cfg, size)
    if impl == "torch":
        import torch
        from eamamba_ref import torch_ref
        torch.set_num_threads(threads)
        torch_ref.flush_denormals()
        torch_ref.set_scan_mode("chunked")
        model = torch_ref.build_from_args(cfg.name, cfg.to_args()).eval()
        model.load_state_dict({k: torch.from_numpy(v) for k, v in params.items()}, strict=True)
        del params
        xt = torch.from_numpy(x)

        def forward():
            with torch.no_grad():
                return model(xt).numpy()
    else:
        from eamamba_ref.model import EAMamba
        if impl == "unfused":           # the plain composition with the numba scan (before fusion)
            from eamamba_ref import mhssm
            mhssm._fused = lambda *args: False
        model = EAMamba(cfg, params)

        def forward():
            return model(x)
    out = forward()                                     # warm-up (and numba compilation)
    del out
    base = rss_mib()
    sampler = RssSampler()                              # peak RSS during the timed forwards only
    times = []
    print("ready", flush=True)
    with sampler:
        for line in sys.stdin:                          # the parent says when it is our turn
            if line.strip() != "go":
                break
            start = time.perf_counter()
            out = forward()
            times.append(time.perf_counter() - start)
            print(f"{times[-1]:.6f}", flush=True)
    np.save(os.environ["BENCH_OUT"], out)
    print(json.dumps({"median": float(np.median(times)), "min": float(np.min(times)),
                      "peak_mib": sampler.peak, "growth_mib": sampler.peak - base}), flush=True)


class RssSampler:
    """Samples this process's RSS every few milliseconds in a thread; `peak` is the largest seen.

    (ru_maxrss would report the peak of the whole process, which includes Numba's compilation.)
    """

    def __init__(self, interval=0.005):
        import threading
        self.interval = interval
        self.peak = rss_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mib())
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mib())


def child_env(args, out_path, impl=None):
    """The children's environment: the thread counts, and the thread settings of `import eamamba_ref`
    (its __init__: idle OpenBLAS and OpenMP threads sleep), which this process's import has put into
    os.environ, for eamamba_ref's children only (they import NumPy first, so they would not set
    OpenBLAS's themselves); the PyTorch reference runs with torch's own defaults, as its users run it."""
    import eamamba_ref
    env = dict(os.environ, NUMBA_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads),
               OPENBLAS_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               BENCH_OUT=out_path, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if impl == "torch":
        for name in eamamba_ref.THREAD_ENV_SET:       # set by our import, not by the user
            env.pop(name)
    return env


def child_cmd(impl, size, args):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", impl, "--sizes", str(size),
           "--repeats", str(args.repeats), "--threads", str(args.threads), "--seed", str(args.seed)]
    return cmd + (["--checkpoint", args.checkpoint] if args.checkpoint else [])


def run_child(impl, size, args, out_path):
    """One child that runs to completion (the machine rates, the profile); its last line as JSON."""
    proc = subprocess.run(child_cmd(impl, size, args), env=child_env(args, out_path),
                          capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        return {"error": tail[0][:120]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_interleaved(impls, size, args, tmp):
    """Time the implementations `impls` at one size, their forwards taking turns; {impl: result}.

    Each child builds its model and warms up, says "ready", then runs one timed forward per "go"
    line it reads and finally reports median / peak memory as JSON. A child that fails (or runs
    past --timeout) gives {"error": ...} and the others go on without it.
    """
    import threading
    workers = {}
    for impl in impls:
        err = open(os.path.join(tmp, f"{impl}{size}.err"), "w+")
        proc = subprocess.Popen(child_cmd(impl, size, args), env=child_env(args, os.path.join(tmp, f"{impl}{size}.npy"), impl),
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)
        workers[impl] = (proc, err)
    watchdog = threading.Timer(args.timeout, lambda: [p.kill() for p, _ in workers.values()])
    watchdog.start()
    results = {}

    def fail(impl):
        proc, err = workers.pop(impl)
        proc.kill()
        proc.wait()
        err.seek(0)
        tail = err.read().strip().splitlines()[-1:] or ["killed (timeout?)"]
        results[impl] = {"error": tail[0][:120]}

    def expect(impl, want=None):
        line = workers[impl][0].stdout.readline().strip()
        if not line or (want and line != want):
            fail(impl)
            return None
        return line

    try:
        for impl in list(workers):
            expect(impl, "ready")
        for _ in range(args.repeats):
            for impl in list(workers):
                workers[impl][0].stdin.write("go\n")
                workers[impl][0].stdin.flush()
                expect(impl)
        for impl in list(workers):
            proc, err = workers[impl]
            proc.stdin.write("stop\n")
            proc.stdin.close()
            line = expect(impl)
            if line is not None:
                results[impl] = json.loads(line)
                proc.wait()
                err.close()
    finally:
        watchdog.cancel()
        for proc, err in workers.values():
            proc.kill()
            err.close()
    return results


# ------------------------------------------------------------------------------------------------
# The machine's floor

def best_of(fn, repeat=5):
    fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def machine_rates(threads):
    """GFLOP/s of a large GEMM and of a typical 1x1-conv GEMM (NumPy BLAS), and ns per exp (all cores)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2048, 2048), dtype=np.float32)
    big = 2 * 2048**3 / best_of(lambda: a @ a) / 1e9
    w = rng.standard_normal((256, 128), dtype=np.float32)          # decoder level 1: 128 -> 256 channels
    x = rng.standard_normal((128, 128 * 128), dtype=np.float32)
    conv = 2 * 256 * 128 * x.shape[1] / best_of(lambda: w @ x) / 1e9
    e = rng.uniform(-10, 0, 1 << 15).astype(np.float32)
    o = np.empty_like(e)

    def exps():
        for _ in range(100):
            np.exp(e, out=o)

    exp_ns = best_of(exps) / (100 * e.size) * 1e9 / threads     # NumPy's exp is single-threaded
    return big, conv, exp_ns


def floor_seconds(prof, gemm_gflops, exp_ns):
    """GEMM-like FLOPs at the 1x1-conv GEMM rate + one exp per scan state update at NumPy's rate."""
    gemm = sum(op.flops for op in prof.ops if op.kind not in ("scan", "norm", "out_norm", "elementwise"))
    m = prof.config.mamba
    updates = 0
    for op in prof.ops:
        if op.kind == "scan":       # fvcore MACs = 9 B D L N + B D L -> B D L N state updates
            updates += op.macs * m.d_state // (9 * m.d_state + 1)
    return gemm / (gemm_gflops * 1e9) + updates * exp_ns * 1e-9, gemm, updates


# ------------------------------------------------------------------------------------------------
# Per-stage profile (exclusive wall time of the functions a forward calls)

def stage_profile(cfg, params, size):
    """Seconds per stage of one eamamba_ref forward (after a warm-up), by wrapping the functions
    the model calls with timers; a stage's time excludes the stages nested in it."""
    from eamamba_ref import cpu_kernels, layers, mhssm, model, scans, ssm
    from eamamba_ref.ssm import fused
    totals = {}
    stack = []

    def timed(module, name, stage_of):
        original = getattr(module, name)

        def wrapper(*a, **k):
            stage = stage_of(*a, **k)
            stack.append(0.0)
            start = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                elapsed = time.perf_counter() - start
                inner = stack.pop()
                totals[stage] = totals.get(stage, 0.0) + elapsed - inner
                if stack:
                    stack[-1] += elapsed
        setattr(module, name, wrapper)
        return module, name, original

    def conv_stage(x, weight, *a, **k):
        if weight.shape[-1] == 1:
            return "1x1 convs (FFN, channel reduction)"
        if k.get("groups", 1) > 1:
            return "depthwise convs"
        return "3x3 convs (im2col + GEMM)"

    const = lambda label: (lambda *a, **k: label)  # noqa: E731
    patches = [
        timed(layers, "conv2d", conv_stage),
        timed(model, "mhssm", const("MHSSM projections + element-wise")),
        timed(scans, "all_around", const("scan transforms (gather/scatter)")),
        timed(scans, "restore", const("scan transforms (gather/scatter)")),
        timed(ssm, "selective_scan", const("selective scans")),
        timed(fused, "directional_scan", const("selective scans (fused gather/scatter, dt_proj)")),
        timed(fused, "dwconv_silu_pixel_major", const("depthwise convs")),
        timed(layers, "layer_norm_channels", const("norms")),
        timed(cpu_kernels, "layer_norm_channels", const("norms")),
        timed(layers, "layer_norm", const("norms")),
        timed(fused, "layer_norm_gate", const("norms")),
        timed(layers, "silu", const("activations")),
    ]
    try:
        net = model.EAMamba(cfg, params)
        x = make_input(cfg, size)
        net(x)
        totals.clear()
        start = time.perf_counter()
        net(x)
        total = time.perf_counter() - start
    finally:
        for module, name, original in patches:
            setattr(module, name, original)
    totals["other (FFN gate, residuals, (un)shuffle, concat)"] = total - sum(totals.values())
    return total, totals


# ------------------------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards per size (after a warm-up)")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--checkpoint", default=None, help=".pth/.npz checkpoint (default: random weights)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    parser.add_argument("--torch-max-size", type=int, default=512,
                        help="largest size the PyTorch reference runs at (it is slow)")
    parser.add_argument("--profile-size", type=int, default=256, help="size of the per-stage profile")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per child process")
    parser.add_argument("--unfused", action="store_true",
                        help="also time eamamba_ref without the fused MHSSM kernels (plain composition "
                             "+ numba scan), to show what the fusion gains")
    parser.add_argument("--child", choices=("eamamba_ref", "unfused", "torch", "profile", "rates"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child == "rates":
        print(json.dumps(dict(zip(("gemm", "conv", "exp_ns"), machine_rates(args.threads)))))
        return 0
    if args.child == "profile":
        cfg, params = build(args.checkpoint, args.seed)
        total, stages = stage_profile(cfg, params, args.sizes[0])
        print(json.dumps({"total": total, "stages": stages}))
        return 0
    if args.child:
        child(args.child, args.sizes[0], args.repeats, args.threads, args.checkpoint, args.seed)
        return 0

    from eamamba_ref import profile as prof_mod
    from eamamba_ref.ssm import get_default_backend
    cfg, params = build(args.checkpoint, args.seed)
    try:
        import torch  # noqa: F401
        have_torch = not args.no_torch
    except ImportError:
        have_torch = False

    print(f"EAMamba {prof_mod.describe(cfg)}; {sum(v.size for v in params.values()):,} parameters")
    print(f"eamamba_ref backend '{get_default_backend()}', {args.threads} threads; "
          f"{'PyTorch reference (chunked scan)' if have_torch else 'no torch'}; median of {args.repeats} "
          f"after a warm-up, the implementations' forwards taking turns")
    import eamamba_ref
    ours_env, torch_env = child_env(args, ""), child_env(args, "", "torch")
    print("eamamba_ref's children: " + " ".join(f"{k}={ours_env.get(k, '(unset)')}" for k in eamamba_ref.THREAD_ENV)
          + "; torch's: " + " ".join(f"{k}={torch_env.get(k, '(unset)')}" for k in eamamba_ref.THREAD_ENV))
    print(load_average())
    rates = run_child("rates", 0, args, os.devnull)          # in a child: with the benchmark's threads
    big, conv_rate, exp_ns = rates["gemm"], rates["conv"], rates["exp_ns"]
    print(f"machine: float32 GEMM 2048^3 {big:.0f} GFLOP/s, 1x1-conv GEMM (256x128 @ 128x16384) "
          f"{conv_rate:.0f} GFLOP/s, NumPy exp {exp_ns:.2f} ns/element on {args.threads} cores")
    print()
    header = (f"{'size':>9s} {'GFLOP':>7s} {'floor s':>8s} | {'eamamba_ref s':>13s} {'floor %':>7s} "
              f"{'peak MiB':>8s} {'+MiB':>6s} | {'torch s':>8s} {'peak MiB':>8s} {'+MiB':>6s} | "
              f"{'torch/ours':>10s} {'max |diff|':>10s}")
    print(header)
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            prof = prof_mod.profile(cfg, size, size)
            floor, _, _ = floor_seconds(prof, conv_rate, exp_ns)
            impls = ["eamamba_ref"]
            run_torch = have_torch and size <= args.torch_max_size
            impls += ["torch"] if run_torch else []
            impls += ["unfused"] if args.unfused else []
            res = run_interleaved(impls, size, args, tmp)
            ours = res["eamamba_ref"]
            row = f"{size:>4d}x{size:<4d} {prof.flops / 1e9:7.1f} {floor:8.2f} | "
            if "error" in ours:
                row += f"{'failed: ' + ours['error']:>37s} | "
            else:
                row += (f"{ours['median']:13.2f} {100 * floor / ours['median']:6.0f}% "
                        f"{ours['peak_mib']:8.0f} {ours['growth_mib']:6.0f} | ")
            if run_torch:
                ref = res["torch"]
                if "error" in ref:
                    row += f"{'failed: ' + ref['error']:>26s} |"
                else:
                    row += f"{ref['median']:8.2f} {ref['peak_mib']:8.0f} {ref['growth_mib']:6.0f} | "
                    if "error" not in ours:
                        diff = np.max(np.abs(np.load(os.path.join(tmp, f"eamamba_ref{size}.npy"))
                                             - np.load(os.path.join(tmp, f"torch{size}.npy"))))
                        row += f"{ref['median'] / ours['median']:9.2f}x {diff:10.1e}"
            else:
                row += f"{'-':>8s} {'-':>8s} {'-':>6s} |"
            if args.unfused:
                plain = res["unfused"]
                if "error" in plain:
                    row += f" unfused failed: {plain['error']}"
                elif "error" not in ours:
                    row += (f" | unfused {plain['median']:.2f} s, {plain['peak_mib']:.0f} MiB "
                            f"({plain['median'] / ours['median']:.2f}x)")
            print(row, flush=True)
    print(load_average())

    if not args.no_profile:
        with tempfile.TemporaryDirectory() as tmp:
            result = run_child("profile", args.profile_size, args, os.path.join(tmp, "unused.npy"))
        if "error" in result:
            print(f"per-stage profile failed: {result['error']}")
            return 1
        total, stages = result["total"], result["stages"]
        print()
        print(f"per-stage profile of one eamamba_ref forward at {args.profile_size}x{args.profile_size}: "
              f"{total:.2f} s (exclusive times)")
        for stage, seconds in sorted(stages.items(), key=lambda kv: -kv[1]):
            print(f"  {stage:52s} {seconds:7.3f} s {100 * seconds / total:5.1f}%")
        print(load_average())
    return 0


if __name__ == "__main__":
    sys.exit(main())
