"""Benchmark of the selective scan at the sizes of the official denoising model at 256 x 256.

Run:  python benchmarks/bench_scan.py            (options: --help)

Shapes (level 1 of the U-Net, 256 x 256 = 65536 tokens, N = 16, 8 groups = 8 scan directions):
    encoder  u (1, 64, 65536)      decoder / refinement  u (1, 128, 65536)
with delta_softplus, D and delta_bias as EAMamba calls it (z = None).

Printed for each shape, side by side from one run: the time of every available backend of
eamamba_ref.runtime.backends, of a sequential torch loop and of a chunked torch scan (when torch is installed;
torch gets as many threads as Numba and flushes denormals), with the nanoseconds per state
update (B * D * L * N updates, one exp each). The NumPy reference and the sequential torch loop
are timed on a shorter sequence and extrapolated linearly (their cost is linear in L). The
"machine limit" is one exp per update at NumPy's vectorised float32 exp throughput on all
cores; 'x limit' is the ratio to it. A row "numba, u = 0 after L/8" checks that states decaying
through the denormal range do not slow the kernel down.

Timings on a shared machine vary a lot: the load average is printed before and after.
"""

import argparse
import os
import time

import numpy as np

from eamamba_ref.runtime import backends as ssm

SHAPES = {"encoder level 1": 64, "decoder level 1": 128}


def make_inputs(dim, length, n_state=16, groups=8, seed=0):
    """EAMamba-like scan inputs: u, delta (1, dim, L), A (dim, N), B, C (1, G, N, L), D, bias."""
    rng = np.random.default_rng(seed)
    f32 = np.float32
    return dict(
        u=rng.standard_normal((1, dim, length)).astype(f32),
        delta=(rng.standard_normal((1, dim, length)) - 2.0).astype(f32),
        # S4D-real initialisation, as Mamba: A = -(1, 2, ..., N), perturbed
        A=(-np.arange(1, n_state + 1) * np.exp(0.1 * rng.standard_normal((dim, n_state)))
           ).astype(f32),
        B=rng.standard_normal((1, groups, n_state, length)).astype(f32),
        C=rng.standard_normal((1, groups, n_state, length)).astype(f32),
        D=np.ones(dim, f32),
        delta_bias=(0.1 * rng.standard_normal(dim)).astype(f32),
    )


def best_time(fn, repeat):
    """(best, median) wall time of fn() over `repeat` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), float(np.median(times))


def exp_ns_per_element(repeat=7):
    """NumPy float32 exp on one core, on an array that stays in L2 cache (ns per element)."""
    x = np.random.default_rng(0).uniform(-10.0, 0.0, 1 << 15).astype(np.float32)
    out = np.empty_like(x)
    calls = 200

    def run():
        for _ in range(calls):
            np.exp(x, out=out)

    best, _ = best_time(run, repeat)
    return best / (calls * x.size) * 1e9


# ------------------------------------------------------------------------------------------------
# Torch forms of the same recurrence (forward only, no autograd)

def torch_sequential(torch, p):
    """One step per time step, as selective_scan_ref does: L iterations of (B, D, N) ops."""
    F = torch.nn.functional
    u, A, B, C = p["u"], p["A"], p["B"], p["C"]
    batch, dim, length = u.shape
    per_group = dim // B.shape[1]
    dt = F.softplus(p["delta"] + p["delta_bias"][:, None])
    B = B.repeat_interleave(per_group, dim=1)  # (b, d, n, l)
    C = C.repeat_interleave(per_group, dim=1)
    h = torch.zeros(batch, dim, A.shape[1])
    y = torch.empty(batch, dim, length)
    for t in range(length):
        h = torch.exp(dt[:, :, t, None] * A) * h + (dt[:, :, t] * u[:, :, t])[..., None] * B[..., t]
        y[:, :, t] = (h * C[..., t]).sum(-1)
    return y + p["D"][:, None] * u


def torch_chunked(torch, p, chunk=256):
    """Chunked scan: the sequence is cut into L/T chunks that are scanned *together*.

    Pass 1 runs T steps over all chunks at once from a zero state, keeping each chunk's final
    local state and its decay product. A loop over the chunks then carries the true state across
    the borders, and pass 2 reruns the T steps from those true entry states, producing y. Python
    iterations: 2 T + L / T instead of L; every op works on (B, G, D/G, L/T, N) tensors.
    """
    F = torch.nn.functional
    u, A, B, C = p["u"], p["A"], p["B"], p["C"]
    batch, dim, length = u.shape
    groups, n_state = B.shape[1], A.shape[1]
    per_group = dim // groups
    assert length % chunk == 0, "the benchmark uses lengths that are multiples of the chunk"
    n_chunks = length // chunk

    dt = F.softplus(p["delta"] + p["delta_bias"][:, None])

    def by_step(x, lead):  # (..., L) -> (..., T, L/T) contiguous, step i = [..., i, :]
        return x.reshape(*lead, n_chunks, chunk).transpose(-1, -2).contiguous()

    dt_s = by_step(dt.reshape(batch, groups, per_group, length), (batch, groups, per_group))
    du_s = by_step((dt * u).reshape(batch, groups, per_group, length),
                   (batch, groups, per_group))
    # B, C as (b, g, T, L/T, n): one step of all chunks is a contiguous (b, g, L/T, n) block
    B_s = B.reshape(batch, groups, n_state, n_chunks, chunk).permute(0, 1, 4, 3, 2).contiguous()
    C_s = C.reshape(batch, groups, n_state, n_chunks, chunk).permute(0, 1, 4, 3, 2).contiguous()
    A_g = A.reshape(1, groups, per_group, 1, n_state)

    shape = (batch, groups, per_group, n_chunks, n_state)
    h = torch.zeros(shape)
    decay_product = torch.ones(shape)
    a = torch.empty(shape)
    bu = torch.empty(shape)
    for i in range(chunk):  # pass 1: local scans from 0
        torch.mul(dt_s[..., i, :, None], A_g, out=a).exp_()
        torch.mul(du_s[..., i, :, None], B_s[:, :, None, i], out=bu)
        h.mul_(a).add_(bu)
        decay_product.mul_(a)

    entry = torch.zeros(shape)  # the true state entering each chunk
    for c in range(1, n_chunks):
        entry[..., c, :] = decay_product[..., c - 1, :] * entry[..., c - 1, :] + h[..., c - 1, :]

    y = torch.empty(batch, groups, per_group, chunk, n_chunks)
    h = entry
    for i in range(chunk):  # pass 2: the same steps from the true entry states
        torch.mul(dt_s[..., i, :, None], A_g, out=a).exp_()
        torch.mul(du_s[..., i, :, None], B_s[:, :, None, i], out=bu)
        h.mul_(a).add_(bu)
        torch.mul(h, C_s[:, :, None, i], out=bu)
        torch.sum(bu, dim=-1, out=y[..., i, :])
    y = y.transpose(-1, -2).reshape(batch, dim, length)
    return y + p["D"][:, None] * u


# ------------------------------------------------------------------------------------------------

def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--length", type=int, default=65536, help="sequence length L")
    parser.add_argument("--numpy-length", type=int, default=4096,
                        help="L for the NumPy reference, extrapolated linearly to --length")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs (best is reported)")
    parser.add_argument("--threads", type=int, default=0,
                        help="threads for numba and torch (default: numba's default, all cores)")
    parser.add_argument("--no-torch", action="store_true", help="skip the torch forms")
    parser.add_argument("--torch-sequential-length", type=int, default=8192,
                        help="L for the sequential torch loop, extrapolated linearly to --length"
                             " (0 skips it)")
    args = parser.parse_args()

    import numba

    if args.threads:
        numba.set_num_threads(args.threads)
    threads = numba.get_num_threads()
    torch = None
    if not args.no_torch:
        try:
            import torch
            torch.set_num_threads(threads)
            torch.set_flush_denormal(True)  # torch's own scans are otherwise slowed by denormals
        except ImportError:
            print("torch is not installed: skipping the torch forms")

    exp_ns = exp_ns_per_element()
    limit_ns = exp_ns / threads
    backends = [b for b in ssm.available_backends()
                if not (b == "cuda" and os.environ.get("NUMBA_ENABLE_CUDASIM") == "1")]
    print(f"threads: {threads} (numba and torch)   load average before: "
          f"{os.getloadavg()[0]:.2f}")
    print(f"NumPy float32 exp: {exp_ns:.3f} ns/element on one core -> machine limit "
          f"{limit_ns:.3f} ns per state update on {threads} cores")
    print(f"backends: {', '.join(backends)}\n")

    header = f"{'shape':<34}{'form':<30}{'time (s)':>10}{'median':>9}{'ns/update':>11}" \
             f"{'x limit':>9}{'err':>10}"
    print(header)
    print("-" * len(header))
    for label, dim in SHAPES.items():
        p = make_inputs(dim, args.length)
        updates = dim * args.length * 16
        shape_text = f"{label} (1, {dim}, {args.length})"
        rows = []

        reference = ssm.selective_scan(**p, delta_softplus=True, backend="numba")
        for backend in backends:
            length = args.length
            q = p
            if backend == "numpy":
                length = min(args.numpy_length, args.length)
                q = make_inputs(dim, length)
            best, median = best_time(
                lambda: ssm.selective_scan(**q, delta_softplus=True, backend=backend),
                1 if backend == "numpy" else args.repeat)
            scale = args.length / length
            form = backend + (f" (L={length}, x{scale:g})" if scale != 1 else "")
            err = ""
            if backend == "cuda":
                y = ssm.selective_scan(**p, delta_softplus=True, backend=backend)
                err = f"{np.max(np.abs(y - reference)) / np.max(np.abs(reference)):.1e}"
            rows.append((form, best * scale, median * scale, err))

        # Denormal check: the input stops after L/8 steps and every state decays through the
        # float32 denormal range; the flush in the kernel should keep the time unchanged.
        decaying = dict(p, u=p["u"].copy())
        decaying["u"][:, :, args.length // 8:] = 0.0
        best, median = best_time(
            lambda: ssm.selective_scan(**decaying, delta_softplus=True, backend="numba"),
            args.repeat)
        rows.append(("numba, u = 0 after L/8", best, median, ""))

        if torch is not None:
            tp = {k: torch.from_numpy(v) for k, v in p.items()}
            with torch.no_grad():
                best, median = best_time(lambda: torch_chunked(torch, tp), args.repeat)
                y = torch_chunked(torch, tp).numpy()
                err = np.max(np.abs(y - reference)) / np.max(np.abs(reference))
                rows.append(("torch chunked (T=256)", best, median, f"{err:.1e}"))
                length = min(args.torch_sequential_length, args.length)
                if length > 0:
                    tq = {k: torch.from_numpy(v) for k, v in make_inputs(dim, length).items()}
                    best, median = best_time(lambda: torch_sequential(torch, tq), 1)
                    scale = args.length / length
                    form = "torch sequential" + (f" (L={length}, x{scale:g})" if scale != 1 else "")
                    rows.append((form, best * scale, median * scale, ""))

        for form, best, median, err in rows:
            ns = best / updates * 1e9
            print(f"{shape_text:<34}{form:<30}{best:>10.4f}{median:>9.4f}{ns:>11.3f}"
                  f"{ns / limit_ns:>9.2f}{err:>10}")
            shape_text = ""
        numba_time = next(r[1] for r in rows if r[0] == "numba")
        chunked = [r[1] for r in rows if r[0].startswith("torch chunked")]
        if chunked:
            print(f"{'':<34}numba is {chunked[0] / numba_time:.1f}x faster than torch chunked")
        print()
    print(f"load average after: {os.getloadavg()[0]:.2f}   "
          "('err': max |y - y_numba| / max |y_numba|; 'x limit': ns/update over the machine limit)")


if __name__ == "__main__":
    main()
