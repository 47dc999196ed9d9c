"""Benchmark of the whole EAMamba denoising model: eamamba_ref vs the PyTorch reference, side by side.

Run:  python benchmarks/bench_model.py                      (64, 128, 256, 512; a long while)
      python benchmarks/bench_model.py --sizes 64 128 --repeats 1 --no-profile   (quick)
      python benchmarks/bench_model.py --checkpoint model.npz

Rows, for every size (each in a child process of its own, so that its peak resident memory is its own):

  eamamba_ref                     the package imported first in its process
  eamamba_ref, NumPy first        NumPy imported (and a BLAS product run) before the package
  eamamba_ref, torch first        torch imported and used before the package (torch loads GNU
                                  OpenMP and its idle-thread policy before Numba starts)
  eamamba_ref again (control)     a second process of the first row's setting: how far two
                                  processes that differ in nothing differ on this machine, the
                                  yardstick for the spread between the host settings (--no-control)
  torch (<scan>)                  the PyTorch reference of the official architecture
                                  (eamamba_ref.pytorch) with the fastest pure-PyTorch CPU scan
                                  found here: each candidate (the reference's chunked scan and an
                                  in-place chunked scan written for inference, several chunk
                                  lengths) is timed once on the first U-Net level's scan at this
                                  size, and the fastest runs the model (--torch-scan pins one)
  torch + Numba scan              the same model with the Numba scan of eamamba_ref.pytorch.scan_function

Every child runs one warm-up forward, then `--repeats` timed ones, *interleaved* between the rows
(the children wait for their turn, in an order shuffled every round, seeded by --seed), so that a
machine whose speed drifts over minutes slows all alike and no row always follows the same one.
Printed are the median and the best wall time, the peak RSS of the child during one more, untimed
forward (the kernel's high-water mark, reset before it; nothing else runs in the child while a
timed forward runs) and its growth over the RSS before it, the time relative to eamamba_ref
imported first, and the largest difference of the output from it. All rows use the same weights
(random, `model.init_params` with a fixed seed, or the checkpoint), the same thread count for
every library (OPENBLAS/OMP/MKL/NUMBA_NUM_THREADS and torch.set_num_threads), and the torch rows
flush denormals to zero on all of torch's threads (`flush_denormals_everywhere`: the flag is per
thread, and torch.set_flush_denormal sets it for the calling thread only).

Also printed: this machine's FLOP floor for the model (a large float32 GEMM and the model's typical
1x1-conv GEMM through NumPy's BLAS, and NumPy's float32 exp, measured here and now) with the
fraction of it reached, a line per size with the spread between the three host settings beside
the spread between the two identical processes (largest / smallest - 1, of the medians and of the
best times), and a per-stage profile of one eamamba_ref forward.

The machine may be shared: the load average is printed before and after; compare only ratios
measured in the same run, on a quiet machine.
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# The eamamba_ref a child times: this checkout, or another one (--baseline) for a before/after row.
TREE = os.environ.get("BENCH_TREE") or ROOT
if TREE not in sys.path:
    sys.path.insert(0, TREE)

# The child's host setting comes first, before this file imports NumPy (see the docstring).
_CHILD = sys.argv[sys.argv.index("--child") + 1] if "--child" in sys.argv[:-1] else None
if _CHILD in ("eamamba_ref", "eamamba_ref_again", "baseline"):
    import eamamba_ref  # noqa: F401
elif _CHILD in ("eamamba_ref_torch_first", "torch", "torch_numba", "torch_scan_select"):
    import torch
    (torch.ones(256, 256) @ torch.ones(256, 256)).sum().item()     # torch's threads started

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

if _CHILD == "eamamba_ref_numpy_first":
    (np.ones((256, 256), np.float32) @ np.ones((256, 256), np.float32)).sum()   # BLAS threads started

IMPLS = {   # child name -> row label
    "eamamba_ref": "eamamba_ref",
    "eamamba_ref_numpy_first": "eamamba_ref, NumPy first",
    "eamamba_ref_torch_first": "eamamba_ref, torch first",
    "eamamba_ref_again": "eamamba_ref again (control)",
    "torch": "torch",
    "torch_numba": "torch + Numba scan",
    "unfused": "eamamba_ref unfused",
    "baseline": "eamamba_ref, --baseline",
}
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

def api():
    """(denoise_config, init_params, EAMamba, load) of the eamamba_ref imported, in this layout or
    in the flat one of earlier versions (a --baseline checkout)."""
    try:
        from eamamba_ref.io.config import denoise_config
        from eamamba_ref.io.loading import load
        from eamamba_ref.reference.parameters import init_params
        from eamamba_ref.runtime.model import EAMamba
    except ImportError:
        from eamamba_ref.config import denoise_config
        from eamamba_ref.loading import load
        from eamamba_ref.model import EAMamba, init_params
    return denoise_config, init_params, EAMamba, load


def build(checkpoint, seed):
    """(config, params) of the official denoising model, or of a checkpoint."""
    denoise_config, init_params, _, load = api()
    if checkpoint:
        model = load(checkpoint)
        return model.config, model.params
    cfg = denoise_config()
    return cfg, init_params(cfg, seed)


def make_input(cfg, size, seed=1):
    return np.random.default_rng(seed).random((1, cfg.inp_channels, size, size), dtype=np.float32)


# ------------------------------------------------------------------------------------------------
# The PyTorch reference: its fastest pure-PyTorch scan, denormals flushed on every thread

def flush_denormals_everywhere(threads):
    """Set flush-to-zero / denormals-are-zero on the calling thread and on each of torch's OpenMP
    threads; returns whether a multi-threaded product of denormals now gives zeros everywhere.

    `torch.set_flush_denormal` sets the flag of the calling thread only (measured: a 2-thread
    multiply of 4M denormals kept half of them). torch's CPU wheel runs its intra-op work on GNU
    OpenMP's thread pool, so a parallel region of that runtime (GOMP_parallel, through ctypes)
    runs the setter once on each of its threads.
    """
    import ctypes
    import torch
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    try:
        with open("/proc/self/maps") as f:
            libs = sorted({line.split()[-1] for line in f if "libgomp" in line.split()[-1]})
    except OSError:
        libs = []
    if libs and threads > 1:
        gomp = ctypes.CDLL(next((p for p in libs if "torch" in p), libs[0]))
        body = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(lambda _: torch.set_flush_denormal(True))
        gomp.GOMP_parallel.argtypes = [type(body), ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
        gomp.GOMP_parallel(body, None, threads, 0)
    probe = torch.full((1 << 20,), 1e-39) * 1.0
    return bool((probe == 0).all())


def scan_inplace_chunked(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                         chunk_size=64):
    """The selective scan of `torch_ref.selective_scan` (same arguments, B and C `(b, g, n, l)`,
    float32, no autograd): the chunked algorithm of the reference written with in-place updates of
    two `(T, nc, b, d, n)` buffers (T steps per chunk, nc chunks), for inference.

    1. every chunk from a zero state at once, in place: drive[t] = decay[t] drive[t-1] + drive[t]
       (local states) and decay[t] *= decay[t-1] (decay since the chunk began), T - 1 steps;
    2. the true state entering each chunk, `carry`, nc - 1 steps over (b, d, n);
    3. all states at once: h = drive + decay * carry; y = C . h as one batched product.
    """
    import torch
    import torch.nn.functional as F
    with torch.no_grad():
        b, d, l = u.shape
        n = A.shape[1]
        g = B.shape[1]
        if delta_bias is not None:
            delta = delta + delta_bias[:, None]
        if delta_softplus:
            delta = F.softplus(delta)
        T = max(1, min(l, int(chunk_size)))
        nc = -(-l // T)
        pad = nc * T - l

        def fold(x):                       # (..., l) time last -> (T, nc, ...) with [t, c] = step c T + t
            x = x.movedim(-1, 0)
            if pad:
                x = torch.cat([x, x.new_zeros((pad,) + x.shape[1:])])
            return x.reshape(nc, T, *x.shape[1:]).transpose(0, 1).contiguous()

        dt, ut = fold(delta), fold(u)                      # (T, nc, b, d); padded steps: delta 0
        Bt, Ct = fold(B), fold(C)                          # (T, nc, b, g, n)
        decay = torch.exp(dt[..., None] * A)               # (T, nc, b, d, n)
        drive = ((dt * ut).view(T, nc, b, g, d // g, 1) * Bt.view(T, nc, b, g, 1, n)).view(T, nc, b, d, n)
        for t in range(1, T):
            drive[t].addcmul_(decay[t], drive[t - 1])
            decay[t].mul_(decay[t - 1])
        carry = torch.zeros((nc, b, d, n), dtype=u.dtype)
        for c in range(1, nc):
            torch.addcmul(drive[T - 1, c - 1], decay[T - 1, c - 1], carry[c - 1], out=carry[c])
        drive.addcmul_(decay, carry)                       # every true state h_t
        y = torch.matmul(drive.view(T, nc, b, g, d // g, n), Ct.view(T, nc, b, g, n, 1))
        y = y.view(T, nc, b, d).transpose(0, 1).reshape(nc * T, b, d)[:l].permute(1, 2, 0)
        if D is not None:
            y = y + u * D[:, None]
        if z is not None:
            y = y * F.silu(z)
        return y.contiguous()


def torch_scan_candidates():
    """name -> scan function (the signature of torch_ref.selective_scan)."""
    import functools
    from eamamba_ref import pytorch as torch_ref
    cands = {f"chunked T={T}": functools.partial(torch_ref.selective_scan, mode="chunked", chunk_size=T)
             for T in (32, 64, 128, 256)}
    cands.update({f"in-place chunked T={T}": functools.partial(scan_inplace_chunked, chunk_size=T)
                  for T in (32, 64, 128, 256, 512, 1024)})
    return cands


def check_scan(fn):
    """fn against the reference's sequential scan on a small problem (relative error < 1e-5)."""
    import torch
    from eamamba_ref import pytorch as torch_ref
    g = torch.Generator().manual_seed(0)
    b, d, n, l, k = 1, 8, 16, 300, 4
    args = (torch.randn(b, d, l, generator=g), torch.randn(b, d, l, generator=g) - 1,
            -torch.rand(d, n, generator=g) * 3, torch.randn(b, k, n, l, generator=g),
            torch.randn(b, k, n, l, generator=g), torch.randn(d, generator=g))
    kw = dict(delta_bias=torch.randn(d, generator=g), delta_softplus=True)
    want = torch_ref.selective_scan(*args, mode="sequential", **kw)
    err = float((fn(*args, **kw) - want).abs().max() / want.abs().max())
    if not err < 1e-5:
        raise AssertionError(f"scan variant differs from the sequential reference: {err:.1e}")


def pick_torch_scan(cfg, size, pinned=None):
    """(name, function, {name: seconds}) of the fastest candidate scan, each timed best of 3 (after
    a warm-up) on the first U-Net level's scan at this size; `pinned` names one without timing."""
    import torch
    cands = torch_scan_candidates()
    if pinned:
        if pinned not in cands:
            raise SystemExit(f"--torch-scan must be one of {sorted(cands)}, got {pinned!r}")
        check_scan(cands[pinned])
        return pinned, cands[pinned], {}
    m = cfg.mamba
    d = m.d_inner(cfg.dim)
    K, _ = m.heads(cfg.dim)
    L, N = size * size, m.d_state
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(1, d, L, generator=g), torch.randn(1, d, L, generator=g) - 3,
            -torch.arange(1, N + 1, dtype=torch.float32).repeat(d, 1), torch.randn(1, K, N, L, generator=g),
            torch.randn(1, K, N, L, generator=g), torch.ones(d))
    kw = dict(delta_bias=torch.zeros(d), delta_softplus=True)
    times = {}
    for name, fn in cands.items():
        check_scan(fn)
        fn(*args, **kw)
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            with torch.no_grad():
                fn(*args, **kw)
            best = min(best, time.perf_counter() - start)
        times[name] = best
    best = min(times, key=times.get)
    return best, cands[best], times


# ------------------------------------------------------------------------------------------------
# The children

def child(impl, size, repeats, threads, checkpoint, seed, torch_scan=None):
    """Runs in a child process: time `repeats` forwards of one implementation; prints JSON.
    The host setting (what was imported first) was made at the top of this file."""
    cfg, params = build(checkpoint, seed)
    x = make_input(cfg, size)
    info = {}
    if impl in ("torch", "torch_numba"):
        import torch
        from eamamba_ref import pytorch as torch_ref
        from eamamba_ref.pytorch import mamba as torch_mamba
        info["denormals_flushed_on_all_threads"] = flush_denormals_everywhere(threads)
        if impl == "torch":
            name, scan, times = pick_torch_scan(cfg, size, torch_scan)
            torch_mamba.selective_scan = scan             # the name the reference's MHSSM calls
            info.update(scan=name, scan_seconds=times)
        else:
            from eamamba_ref.runtime import threads as runtime
            info["numba_layer"] = runtime.start_numba_threads()   # the layer eamamba_ref would use
            torch_ref.set_scan_mode("numba")
        model = torch_ref.build_from_args(cfg.name, cfg.to_args()).eval()
        model.load_state_dict({k: torch.from_numpy(v) for k, v in params.items()}, strict=True)
        del params
        xt = torch.from_numpy(x)

        def forward():
            with torch.no_grad():
                return model(xt).numpy()
    else:
        EAMamba = api()[2]
        model = EAMamba(cfg, params)
        if impl == "unfused":           # the plain composition with the numba scan (before fusion)
            from eamamba_ref.reference.ops import NUMPY
            model.ops = model.ops._replace(mhssm=NUMPY.mhssm, block_mhssm=NUMPY.block_mhssm)

        def forward():
            return model(x)
    out = forward()                                     # warm-up (and numba compilation)
    del out
    if impl.startswith("eamamba_ref") or impl == "baseline":
        import numba
        info["numba_layer"] = numba.threading_layer()
    times, out = [], None
    print("ready", flush=True)
    for line in sys.stdin:                              # the parent says when it is our turn
        if line.strip() != "go":
            break
        start = time.perf_counter()
        out = forward()
        times.append(time.perf_counter() - start)
        print(f"{times[-1]:.6f}", flush=True)
    # Memory is measured on one more, untimed forward: a sampling thread during the timed ones
    # would share the GIL with the forward (measured: +9 % on eamamba_ref's median at 128x128).
    del out
    base = rss_mib()
    with PeakRss() as peak:
        out = forward()
    np.save(os.environ["BENCH_OUT"], out)
    print(json.dumps({"median": float(np.median(times)), "min": float(np.min(times)),
                      "peak_mib": peak.peak, "growth_mib": peak.peak - base, "peak_by": peak.how,
                      **info}), flush=True)


class PeakRss:
    """The peak resident memory of this process inside the block (MiB), in `peak`.

    On Linux the kernel's own high-water mark (VmHWM) is reset on entry (writing 5 to
    /proc/self/clear_refs) and read on exit: exact, and nothing runs beside the block. Where that
    is not allowed, a thread samples the RSS every 5 ms (`how` says which).
    """

    def __init__(self, interval=0.005):
        self.interval = interval
        self.peak = rss_mib()
        self.how = "VmHWM"

    @staticmethod
    def _hwm_mib():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        raise OSError("no VmHWM")

    def __enter__(self):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._hwm_mib()
        except OSError:
            import threading
            self.how = "sampled every 5 ms"
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mib())
            self._stop.wait(self.interval)

    def __exit__(self, *exc):
        if self.how == "VmHWM":
            self.peak = max(self.peak, self._hwm_mib())
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, rss_mib())


def child_env(args, out_path, impl=None):
    """The children's environment: one thread count for every library, nothing else changed (the
    --baseline row imports eamamba_ref from the other checkout)."""
    n = str(args.threads)
    tree = os.path.abspath(args.baseline) if impl == "baseline" else ROOT
    env = dict(os.environ, NUMBA_NUM_THREADS=n, OMP_NUM_THREADS=n, OPENBLAS_NUM_THREADS=n,
               MKL_NUM_THREADS=n, BENCH_OUT=out_path, BENCH_TREE=tree,
               PYTHONPATH=tree + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return env


def child_cmd(impl, size, args):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", impl, "--sizes", str(size),
           "--repeats", str(args.repeats), "--threads", str(args.threads), "--seed", str(args.seed)]
    cmd += ["--torch-scan", args.torch_scan] if args.torch_scan else []
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

    order = random.Random(args.seed)
    try:
        for impl in list(workers):
            expect(impl, "ready")
        for _ in range(args.repeats):
            turns = list(workers)
            order.shuffle(turns)
            for impl in turns:
                if impl not in workers:            # failed earlier in this round
                    continue
                time.sleep(args.pause)      # the previous row's idle threads (torch's OpenMP spins) settle
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
    """Seconds per stage of one eamamba_ref forward (after a warm-up), by wrapping the entries of
    the model's backend table, and the fused MHSSM's kernels, with timers; a stage's time excludes
    the stages nested in it."""
    from eamamba_ref.kernels.cpu import fused
    from eamamba_ref.runtime.model import EAMamba
    totals = {}
    stack = []

    def timed(fn, stage_of):
        def wrapper(*a, **k):
            stage = stage_of(*a, **k)
            stack.append(0.0)
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                elapsed = time.perf_counter() - start
                inner = stack.pop()
                totals[stage] = totals.get(stage, 0.0) + elapsed - inner
                if stack:
                    stack[-1] += elapsed
        return wrapper

    def conv_stage(x, weight, *a, **k):
        if weight.shape[-1] == 1:
            return "1x1 convs (FFN, channel reduction)"
        if k.get("groups", 1) > 1:
            return "depthwise convs"
        return "3x3 convs (im2col + GEMM)"

    const = lambda label: (lambda *a, **k: label)  # noqa: E731
    net = EAMamba(cfg, params)
    stages = {"conv2d": conv_stage, "matmul": const("MHSSM projections (GEMM)"),
              "mhssm": const("MHSSM element-wise and glue"), "block_mhssm": const("MHSSM element-wise and glue"),
              "block_ffn": const("FFN halves (norm2, 1x1s, gate, residual: fused)"),
              "all_around": const("scan transforms (gather/scatter)"),
              "restore": const("scan transforms (gather/scatter)"), "selective_scan": const("selective scans"),
              "layer_norm_channels": const("norms"), "layer_norm": const("norms"), "silu": const("activations")}
    net.ops = net.ops._replace(**{name: timed(getattr(net.ops, name), stage) for name, stage in stages.items()})
    kernels = {"directional_scan": const("selective scans (fused gather/scatter, dt_proj)"),
               "dwconv_silu_pixel_major": const("depthwise convs"), "layer_norm_gate": const("norms"),
               "project": const("MHSSM projections (GEMM)")}
    originals = {name: getattr(fused, name) for name in kernels}
    for name, stage in kernels.items():        # called by the fused MHSSM as module globals
        setattr(fused, name, timed(originals[name], stage))
    try:
        x = make_input(cfg, size)
        net(x)
        totals.clear()
        start = time.perf_counter()
        net(x)
        total = time.perf_counter() - start
    finally:
        for name, original in originals.items():
            setattr(fused, name, original)
    totals["other (FFN gate, residuals, (un)shuffle, concat)"] = total - sum(totals.values())
    return total, totals


def spreads(size, res):
    """One line: how far apart the host settings' times are, beside how far apart two processes
    of the same setting are (largest / smallest - 1, of the medians and of the best times)."""
    def spread(impls):
        rows = [res[i] for i in impls if i in res and "error" not in res[i]]
        if len(rows) < 2:
            return None
        return tuple(max(r[k] for r in rows) / min(r[k] for r in rows) - 1 for k in ("median", "min"))

    settings = spread(["eamamba_ref", "eamamba_ref_numpy_first", "eamamba_ref_torch_first"])
    control = spread(["eamamba_ref", "eamamba_ref_again"])
    line = f"{size:>4d}x{size:<4d} spread of the host settings: "
    line += "-" if settings is None else f"medians {settings[0]:.1%}, best {settings[1]:.1%}"
    if control is not None:
        line += f"; of two identical processes (control): medians {control[0]:.1%}, best {control[1]:.1%}"
    return line


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
    parser.add_argument("--pause", type=float, default=0.5,
                        help="seconds of quiet before each timed forward (between the rows' turns)")
    parser.add_argument("--no-control", action="store_true",
                        help="leave out the control row (a second process of the first row's setting)")
    parser.add_argument("--baseline", default=None, metavar="DIR",
                        help="also time the eamamba_ref of another checkout (e.g. a git worktree of an "
                             "earlier commit), imported first, beside this one: a before/after row")
    parser.add_argument("--torch-scan", default=None,
                        help="run the PyTorch reference with this scan instead of timing the candidates "
                             "(e.g. 'in-place chunked T=64', 'chunked T=64')")
    parser.add_argument("--child", choices=tuple(IMPLS) + ("profile", "rates"), help=argparse.SUPPRESS)
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
        child(args.child, args.sizes[0], args.repeats, args.threads, args.checkpoint, args.seed, args.torch_scan)
        return 0

    from eamamba_ref.apps import profile as prof_mod
    from eamamba_ref.runtime.backends import get_default_backend
    cfg, params = build(args.checkpoint, args.seed)
    import importlib.util
    torch_installed = importlib.util.find_spec("torch") is not None     # (not imported here)
    have_torch = torch_installed and not args.no_torch

    print(f"EAMamba {prof_mod.describe(cfg)}; {sum(v.size for v in params.values()):,} parameters")
    print(f"eamamba_ref backend '{get_default_backend()}', {args.threads} threads for every library; "
          f"median of {args.repeats} after a warm-up, the rows' forwards taking turns")
    print(load_average())
    rates = run_child("rates", 0, args, os.devnull)          # in a child: with the benchmark's threads
    big, conv_rate, exp_ns = rates["gemm"], rates["conv"], rates["exp_ns"]
    print(f"machine: float32 GEMM 2048^3 {big:.0f} GFLOP/s, 1x1-conv GEMM (256x128 @ 128x16384) "
          f"{conv_rate:.0f} GFLOP/s, NumPy exp {exp_ns:.2f} ns/element on {args.threads} cores")
    print()
    header = (f"{'size':>9s} {'GFLOP':>7s} {'floor s':>8s} | {'implementation':32s} {'median s':>9s} "
              f"{'best s':>7s} {'floor %':>7s} {'peak MiB':>8s} {'+MiB':>6s} {'/ ours':>7s} {'max |diff|':>10s}")
    print(header)
    notes = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            prof = prof_mod.profile(cfg, size, size)
            floor, _, _ = floor_seconds(prof, conv_rate, exp_ns)
            impls = ["eamamba_ref", "eamamba_ref_numpy_first"]
            impls += ["eamamba_ref_torch_first"] if torch_installed else []
            impls += [] if args.no_control else ["eamamba_ref_again"]
            impls += ["torch", "torch_numba"] if have_torch and size <= args.torch_max_size else []
            impls += ["unfused"] if args.unfused else []
            impls += ["baseline"] if args.baseline else []
            res = run_interleaved(impls, size, args, tmp)
            ours = res["eamamba_ref"]
            reference = None if "error" in ours else np.load(os.path.join(tmp, f"eamamba_ref{size}.npy"))
            for impl in impls:
                r = res[impl]
                label = IMPLS[impl] + (f" ({r['scan']})" if impl == "torch" and "scan" in r else "")
                row = f"{size:>4d}x{size:<4d} {prof.flops / 1e9:7.1f} {floor:8.2f} | {label:32s} "
                if "error" in r:
                    print(row + f"failed: {r['error']}", flush=True)
                    continue
                row += (f"{r['median']:9.2f} {r['min']:7.2f} {100 * floor / r['median']:6.0f}% {r['peak_mib']:8.0f} "
                        f"{r['growth_mib']:6.0f} ")
                if reference is not None:
                    diff = np.max(np.abs(np.load(os.path.join(tmp, f"{impl}{size}.npy")) - reference))
                    row += f"{r['median'] / ours['median']:6.2f}x {diff:10.1e}"
                print(row, flush=True)
                if r.get("scan_seconds"):
                    notes.append(f"{size}x{size} torch scan candidates (s, first-level scan): " + ", ".join(
                        f"{k} {v:.3f}" for k, v in sorted(r["scan_seconds"].items(), key=lambda kv: kv[1])))
                if impl.startswith("torch") and not r.get("denormals_flushed_on_all_threads", True):
                    notes.append(f"{size}x{size} {IMPLS[impl]}: denormals NOT flushed on all threads")
                if "numba_layer" in r:
                    notes.append(f"{size}x{size} {IMPLS[impl]}: Numba threading layer {r['numba_layer']}")
            print(spreads(size, res), flush=True)
    for note in notes:
        print("  " + note)
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
