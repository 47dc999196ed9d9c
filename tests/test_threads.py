"""Threads (eamamba_ref/runtime/threads.py): the same bits for any thread count and import order, and an
import that changes nothing in the process.

The bitwise checks run the bundled demo denoiser in child processes, each with its own
OPENBLAS_NUM_THREADS / OMP_NUM_THREADS / NUMBA_NUM_THREADS and its own import order (eamamba_ref
first, NumPy first, torch imported and used first), and compare SHA-256 hashes of the outputs:
the 'numba' backend whole and over tiles, and the 'numpy' backend.
"""
import importlib.metadata
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eamamba_ref.runtime.backends import table
from eamamba_ref.runtime import threads as runtime
from eamamba_ref.kernels.cpu import fused

ROOT = pathlib.Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "eamamba_ref" / "weights" / "denoise_demo.npz"

_PREFIX = {
    "eamamba_ref": "import eamamba_ref\n",
    "numpy": "import numpy\nnumpy.ones((300, 300), numpy.float32) @ numpy.ones((300, 300), numpy.float32)\n",
    "torch": "import torch\n(torch.ones(300, 300) @ torch.ones(300, 300)).sum().item()\n",
}

_FORWARDS = """
import hashlib, json, os, warnings
before = dict(os.environ)
import numpy as np
import numba
from eamamba_ref.apps import inference
from eamamba_ref.runtime import threads as runtime
from eamamba_ref.io.loading import load

def digest(a):
    return hashlib.sha256(np.ascontiguousarray(a, np.float32).tobytes()).hexdigest()

rng = np.random.default_rng(0)
x = rng.random((1, 3, 96, 128), dtype=np.float32)
small = np.ascontiguousarray(x[:, :, :32, :48])      # the 'numpy' backend's Python scan is slow
out = {}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    model = load(WEIGHTS, backend="numba")
    out["numba"] = digest(model(x))
    out["tiled"] = digest(inference.tiled(model, x, tile=64, overlap=16))
    out["numpy"] = digest(load(WEIGHTS, backend="numpy")(small))
out["warnings"] = [str(w.message)[:200] for w in caught if issubclass(w.category, RuntimeWarning)]
out["environ_changed"] = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))
out["layer"] = numba.threading_layer()
out["threads"] = runtime.num_threads()
print("RESULT " + json.dumps(out))
"""


def _run(order, threads, cache=None):
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
               NUMBA_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if cache is not None:                     # an empty Numba cache: this run compiles every kernel
        env["NUMBA_CACHE_DIR"] = str(cache)
    for name in ("OPENBLAS_THREAD_TIMEOUT", "OMP_WAIT_POLICY", "NUMBA_THREADING_LAYER"):
        env.pop(name, None)
    script = _PREFIX[order] + f"WEIGHTS = {str(WEIGHTS)!r}\n" + _FORWARDS
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=1800, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    line = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


# (import order, threads): every thread count with the package first, and the two other import
# orders at thread counts that differ from each other and from the first run; and a run that
# compiles every kernel afresh (the others load them from Numba's cache: a kernel whose compiled
# code depended on that, as one with reassociated float sums did, would give other bits).
_CASES = [("eamamba_ref", 1), ("eamamba_ref", 2), ("eamamba_ref", 4), ("numpy", 1), ("numpy", 4),
          ("torch", 2), ("torch", 4), ("numpy", 2, "compiling")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if not WEIGHTS.exists():
        pytest.fail(f"missing bundled weights {WEIGHTS}")
    try:
        import torch  # noqa: F401
        cases = _CASES
    except ImportError:                        # the torch-first order needs torch
        cases = [c for c in _CASES if c[0] != "torch"]
    return {case: _run(case[0], case[1], tmp_path_factory.mktemp("numba_cache") if len(case) > 2 else None)
            for case in cases}


@pytest.mark.parametrize("key", ["numba", "tiled", "numpy"])
def test_output_bits_do_not_depend_on_threads_or_import_order(runs, key):
    first = next(iter(runs.values()))[key]
    hashes = {f"{case[0]} first, {case[1]} threads{', compiling' if len(case) > 2 else ''}": r[key]
              for case, r in runs.items()}
    assert set(hashes.values()) == {first}, hashes


def _first_layer_that_loads():
    """The first of the runtime's preferred layers that Numba can start in a fresh process; where
    the tbb package is installed (a dependency on x86-64) that must be 'tbb'."""
    for layer in runtime.PREFERRED_THREADING_LAYERS:
        done = subprocess.run([sys.executable, "-c", "import numba\n"
                               f"numba.config.THREADING_LAYER = {layer!r}\nnumba.get_num_threads()"],
                              capture_output=True, text=True, timeout=300)
        if done.returncode == 0:
            return layer
        try:
            importlib.metadata.version(layer)
        except importlib.metadata.PackageNotFoundError:
            continue
        raise AssertionError(f"the {layer} package is installed but Numba cannot start it: "
                             + done.stderr[-1000:])
    raise AssertionError("no preferred threading layer loads")


def test_each_run_used_its_thread_count_and_the_preferred_layer(runs):
    expected = _first_layer_that_loads()
    for (order, threads, *_), r in runs.items():
        assert r["threads"] == threads, (order, threads, r["threads"])
        assert r["layer"] == expected, (order, threads, r["layer"])


def test_without_tbb_the_runtime_falls_back_to_workqueue():
    # tbbpool made unimportable: Numba cannot start 'tbb', and the next preferred layer starts
    env = dict(os.environ, NUMBA_NUM_THREADS="2",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("NUMBA_THREADING_LAYER", None)
    script = ("import sys\nsys.modules['numba.np.ufunc.tbbpool'] = None\n"
              "import numba\nfrom eamamba_ref.runtime import threads as runtime\n"
              "print(runtime.start_numba_threads(), numba.threading_layer(), numba.config.THREADING_LAYER)")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["workqueue", "workqueue", "default"], done.stdout


def test_import_and_forward_leave_the_environment_alone_without_warnings(runs):
    for case, r in runs.items():
        assert r["environ_changed"] == [], (case, r["environ_changed"])
        assert r["warnings"] == [], (case, r["warnings"])


def test_a_layer_the_user_chose_is_kept():
    env = dict(os.environ, NUMBA_THREADING_LAYER="omp", NUMBA_NUM_THREADS="2",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    script = ("import numba\nfrom eamamba_ref.runtime import threads as runtime\n"
              "print(runtime.start_numba_threads(), numba.threading_layer())")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["omp", "omp"]


def test_blas_gets_its_thread_count_back_after_a_forward():
    from threadpoolctl import threadpool_info, threadpool_limits
    from eamamba_ref.io.config import ModelConfig
    from eamamba_ref.runtime.model import EAMamba
    from eamamba_ref.reference.parameters import init_params
    cfg = ModelConfig.from_args("eamamba", dict(dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=0))
    model = EAMamba(cfg, init_params(cfg, 0))
    blas = [i for i in threadpool_info() if i["user_api"] == "blas"]
    if not blas:
        pytest.skip("no BLAS library that threadpoolctl can see")
    with threadpool_limits(2, user_api="blas"):
        seen = []
        original = model.ops.conv2d               # (the 3x3 convs: im2col blocks through BLAS)

        def spy(*args, **kwargs):
            seen.append({i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"})
            return original(*args, **kwargs)
        model.ops = model.ops._replace(conv2d=spy)
        model(np.zeros((1, 3, 16, 16), np.float32))
        after = {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}
    assert seen and all(s == {1} for s in seen), seen          # one BLAS thread inside the forward
    assert after == {2}                                          # and the user's count back after


# ------------------------------------------------------------------ in-process partition checks
def _with_threads(n, fn):
    """fn() with the runtime's pool and the scan kernels seeing n threads (the task layouts follow it)."""
    from eamamba_ref.kernels.cpu import scan
    originals = runtime.num_threads, scan.num_threads
    runtime.num_threads = scan.num_threads = lambda: n
    try:
        return fn()
    finally:
        runtime.num_threads, scan.num_threads = originals


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.integers(1, 40), st.integers(1, 3000), st.integers(1, 300),
       st.sampled_from(["columns", "rows"]), st.integers(0, 2**31 - 1))
def test_blocked_matmul_same_bits_for_any_pool_size_and_close_to_float64(batch, k, pixels, m, axis, seed):
    """Blocks of pixels, and on small maps also of the weight's other axis (m up to 300 makes
    those cuts): the same bits with 1, 2, 3 or 5 threads, and float64 accuracy."""
    rng = np.random.default_rng(seed)
    if axis == "columns":
        a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((batch, k, pixels), np.float32)
    else:
        a, b = rng.standard_normal((batch, pixels, k), np.float32), rng.standard_normal((k, m), np.float32)
    matmul = table("numba").matmul
    results = [_with_threads(n, lambda: matmul(a, b, axis)) for n in (1, 2, 3, 5)]
    for r in results[1:]:
        assert r.tobytes() == results[0].tobytes()
    want = np.matmul(a.astype(np.float64), b.astype(np.float64))
    scale = np.matmul(np.abs(a).astype(np.float64), np.abs(b).astype(np.float64)).max()
    assert np.abs(results[0] - want).max() <= 1e-5 * scale


def test_fused_scan_same_bits_for_any_channels_per_task():
    # The scan's task size follows the thread count (channels_per_task); every channel must still
    # be computed by the same instructions, whichever task holds it.
    rng = np.random.default_rng(3)
    B, L, K, Cp, R, N = 2, 200, 4, 12, 3, 16
    d = K * Cp
    u = rng.standard_normal((B, L, d), np.float32)
    xdbl = rng.standard_normal((B, K, L, R + 2 * N), np.float32)
    table = np.stack([rng.permutation(L) for _ in range(K)]).astype(np.int64)
    w = rng.standard_normal((K, Cp, R), np.float32)
    bias, D = rng.standard_normal(d, np.float32), rng.standard_normal(d, np.float32)
    A = -rng.uniform(0.1, 2, (d, N)).astype(np.float32)
    outs = [_with_threads(n, lambda: fused.directional_scan(u, xdbl, table, w, bias, A, D)) for n in (1, 2, 3, 16)]
    per_task = [fused.channels_per_task(B, K, Cp, n) for n in (1, 2, 3, 16)]
    assert len(set(per_task)) > 1, per_task                      # the layouts really differ
    for o in outs[1:]:
        assert o.tobytes() == outs[0].tobytes()
    # x_proj inside the kernel (one task per head, whatever the thread count)
    w_x = rng.standard_normal((K, R + 2 * N, Cp), np.float32)
    outs = [_with_threads(n, lambda: fused.directional_scan(u, None, table, w, bias, A, D, x_proj_weight=w_x))
            for n in (1, 2, 3, 16)]
    for o in outs[1:]:
        assert o.tobytes() == outs[0].tobytes()


def test_plain_scan_same_bits_for_any_task_layout():
    from eamamba_ref.kernels.cpu import scan as cpu
    rng = np.random.default_rng(4)
    b, d, n, l, g = 2, 24, 16, 150, 3
    args = (rng.standard_normal((b, d, l), np.float32), rng.standard_normal((b, d, l), np.float32),
            -rng.uniform(0.1, 2, (d, n)).astype(np.float32), rng.standard_normal((b, g, n, l), np.float32),
            rng.standard_normal((b, g, n, l), np.float32), rng.standard_normal(d, np.float32), None,
            rng.standard_normal(d, np.float32), True)
    layouts = {cpu.task_layout(b, d, g, g, n) for n in (1, 2, 3, 16)}
    assert len(layouts) > 1, layouts
    outs = [_with_threads(n, lambda: cpu.selective_scan_numba(*args)) for n in (1, 2, 3, 16)]
    for y, s in outs[1:]:
        assert y.tobytes() == outs[0][0].tobytes() and s.tobytes() == outs[0][1].tobytes()


def test_gemm_pool_and_numba_kernels_work_in_a_forked_child():
    # The parent's pool threads do not exist in a forked child; the runtime must make a new pool
    # there instead of queueing blocks for threads that will never run them (a hang). The Numba
    # layer the runtime chose must run a parallel kernel there too (GNU OpenMP's would hang).
    script = (
        "import multiprocessing as mp, numpy as np\n"
        "from eamamba_ref.runtime import threads as runtime\nfrom eamamba_ref.runtime.backends import table\n"
        "a, b = np.ones((8, 16), np.float32), np.ones((16, 5000), np.float32)\n"
        "x = np.random.default_rng(0).standard_normal((1, 16, 64, 64)).astype(np.float32)\n"
        "w = np.ones(16, np.float32)\n"
        "runtime.num_threads = lambda: 2\n"
        "table('numba').matmul(a, b)\n"
        "normed = table('numba').layer_norm_channels(x, w, w)\n"
        "def child(q):\n"
        "    same = np.array_equal(table('numba').layer_norm_channels(x, w, w), normed)\n"
        "    q.put(float(table('numba').matmul(a, b).sum()) if same else -1.0)\n"
        "q = mp.get_context('fork').Queue()\n"
        "p = mp.get_context('fork').Process(target=child, args=(q,))\n"
        "p.start()\n"
        "try:\n"
        "    print(q.get(timeout=120))\n"
        "finally:\n"
        "    p.kill()\n"
        "    p.join()\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.split()[-1]) == 8 * 16 * 5000
