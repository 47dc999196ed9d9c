"""The GPU path's kernels and DeviceTensor, one by one, against the NumPy layers (the reference).

All checks run in one subprocess on numba's CUDA simulator (the simulator is chosen when numba.cuda
is first imported, so it cannot be switched on inside this test process); each test reads its
result. The simulator is slow (every simulated thread is a Python thread), so the arrays are small,
but every launch spans several blocks, at the sizes the GPU uses:

* the grid-stride kernels run twice, at the GPU's own launch configuration (256-thread blocks, one
  block per 256 items: arrays of 300 to 5000 items make 2 to 20 blocks) and at the simulator's
  (4 blocks of 32 threads, so that every array larger than 128 items wraps around the grid);
* the tiled GEMM runs at its real 16 x 16 tile, one block per output tile (matrices of 2 to 3
  tiles in each direction, none a multiple of 16, K over several tile steps), and with fewer
  blocks than tiles, so that the blocks' stride over the tiles is exercised too;
* the selective scan runs at its real 128-thread blocks with several blocks in each of its three
  launches (chunk end states, carries, outputs), with its real chunking and with forced short
  chunks.

A kernel that ignored its block index, or read a wrong tile, fails here (the grids' sizes are
checked too, so that a later shrinking of the shapes cannot hide that). What the simulator cannot
check is the GPU's float32 arithmetic (fast math, fused multiply-adds): benchmarks/gpu_check.py
measures that on a real GPU.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("numba.cuda")

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import json
    import numpy as np
    from eamamba_ref.reference import layers, scans
    from eamamba_ref.runtime import backends as ssm
    from eamamba_ref.kernels.cuda import DeviceTensor
    from eamamba_ref.kernels.cuda import kernels as K, tensor as T
    from eamamba_ref.kernels.cuda import scan as gpu_scan
    from tests.test_selective_scan import make_problem, scaled_error

    gpu_scan.POISON_OUTPUTS = True      # outputs start as NaN: an element left unwritten fails

    # Record every grid the grid-stride kernels get: how many blocks, and whether the array was
    # larger than the grid (the stride wraps around).
    grids = {"blocks": 0, "wrapped": False}
    _launch = K.launch
    def recording_launch(n):
        blocks, threads = _launch(n)
        grids["blocks"] = max(grids["blocks"], blocks)
        grids["wrapped"] = grids["wrapped"] or n > blocks * threads
        return blocks, threads
    K.launch = recording_launch

    rng = np.random.default_rng(0)
    def r(*shape):
        return rng.standard_normal(shape).astype(np.float32)
    def dev(a):
        return DeviceTensor.from_host(a)
    def rel(got, want):
        got = got.to_host() if isinstance(got, DeviceTensor) else got
        assert got.shape == want.shape, (got.shape, want.shape)
        err = float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))
        return err if err == err else float("inf")       # NaN (unwritten output): fails, even in max()
    def gemm_ref(a, b):
        return np.matmul(np.tile(a, (b.shape[0] // a.shape[0], 1, 1)), b)

    # ---- the tiled GEMM at its real tile (launch-independent: one block per 16 x 16 tile)
    # (M, K, N) = (37, 19, 21): 3 x 2 tiles, K over 2 steps; 2 items in b's batch, a shared;
    # a per-item a (2 of them, like the per-direction projections) over 2 x 2 tiles and 3 K steps
    # (2 row tiles and 2 items: not coprime, so mixing up the item and row-tile indices shows).
    gemm_cases = [(r(1, 37, 19), r(2, 19, 21)), (r(2, 20, 40), r(2, 40, 18)), (r(1, 9, 1), r(1, 1, 6))]
    tiled = {"gemm_tiled": 0.0, "gemm_tiled_strided": 0.0, "gemm_blocks": 0}
    for a, b in gemm_cases:
        shape = (b.shape[0], a.shape[1], b.shape[2])
        c = DeviceTensor.empty(shape)
        blocks, threads = K.gemm_launch(*shape)
        assert threads == (16, 16), threads
        tiled["gemm_blocks"] = max(tiled["gemm_blocks"], blocks)
        K.matmul_kernel(*shape)(dev(a).data, dev(b).data, c.data)
        tiled["gemm_tiled"] = max(tiled["gemm_tiled"], rel(c, gemm_ref(a, b)))
    a, b = gemm_cases[0]                     # 12 tiles over 5 blocks: blocks stride over tiles
    c = DeviceTensor.empty((2, 37, 21))
    K.gemm[5, (K.TILE, K.TILE)](dev(a).data, dev(b).data, c.data)
    tiled["gemm_tiled_strided"] = rel(c, gemm_ref(a, b))

    # ---- the selective scan: several 128-thread blocks in every launch
    def scan_err(case):
        problem = make_problem(**case)
        want = ssm.selective_scan(**problem, return_last_state=True, backend="numpy")
        got = ssm.selective_scan(**problem, return_last_state=True, backend="cuda")
        errs = [scaled_error(g, w) for g, w in zip(got, want)]
        return float("inf") if any(e != e for e in errs) else max(errs)
    def scan_blocks(case):   # blocks of chunk_scan and of chunk_carries (0: carries not run)
        b, d, l, n = case["batch"], case["dim"], case["length"], case["n_state"]
        chunks = -(-l // gpu_scan.chunk_length(b, d, l))
        per = gpu_scan.THREADS_PER_BLOCK
        return -(-b * d * chunks // per), (-(-b * d * n // per) if chunks > 1 else 0)
    scan = {}
    # real chunking: 3 chunks of 34 steps, 288 scan threads (3 blocks), 480 carries (4 blocks)
    real = dict(seed=1, batch=2, dim=48, length=100, n_state=5, b_form="grouped", c_form="grouped",
                groups_b=8, groups_c=4)
    # one chunk (the plain scan): 150 threads, 2 blocks; z gate, B shared over time, C per batch
    plain = dict(seed=2, batch=3, dim=50, length=20, n_state=3, b_form="dn", c_form="bnl", with_z=True)
    # forced chunks of 3 steps: 5 chunks, 200 scan threads and 160 carries, 2 blocks each
    short = dict(seed=3, batch=1, dim=40, length=13, n_state=4, b_form="bnl", c_form="grouped",
                 groups_c=2, softplus=False, with_bias=False)
    scan["scan_real_chunks"] = scan_err(real)
    scan["scan_real_chunks_blocks"] = scan_blocks(real)
    scan["scan_one_chunk"] = scan_err(plain)
    scan["scan_one_chunk_blocks"] = scan_blocks(plain)
    gpu_scan.TARGET_THREADS, gpu_scan.MIN_CHUNK = 10**6, 3
    scan["scan_short_chunks"] = scan_err(short)
    scan["scan_short_chunks_blocks"] = scan_blocks(short)
    gpu_scan.TARGET_THREADS, gpu_scan.MIN_CHUNK = 16384, 32

    # ---- every grid-stride kernel, at a given launch configuration
    def grid_stride_checks():
        grids.update(blocks=0, wrapped=False)
        out = {}
        errs = []
        for a, b in gemm_cases:
            c = DeviceTensor.empty((b.shape[0], a.shape[1], b.shape[2]))
            K.matmul_kernel(*c.shape, tiled=False)(dev(a).data, dev(b).data, c.data)
            errs.append(rel(c, gemm_ref(a, b)))
        out["gemm_simple"] = max(errs)
        a, x = r(3, 4, 5), r(2, 3, 5, 26)          # a per-direction weight, broadcast over batch
        out["matmul_broadcast"] = rel(T.matmul(dev(a), dev(x)), np.matmul(a, x))

        # convolutions: dense 3x3, 1 x k with asymmetric padding, 1x1 + bias, depthwise 3x3 + bias
        x = r(2, 5, 7, 6)
        cases = [(r(4, 5, 3, 3), None, 1, 1), (r(3, 5, 1, 4), r(3), (0, 3), 1),
                 (r(6, 5, 1, 1), r(6), 0, 1), (r(5, 1, 3, 3), r(5), 1, 5)]
        out["conv2d"] = max(rel(T.conv2d(dev(x), dev(w), None if b is None else dev(b), p, g),
                                layers.conv2d(x, w, b, p, g)) for w, b, p, g in cases)

        # element-wise functions (GELU far into the negative tail, where 1 + erf would cancel)
        v = np.concatenate([r(595) * 4, np.float32([-12, -9, 0, 9, 30])])
        out["unary"] = max(rel(getattr(T, f)(dev(v)), getattr(layers, f)(v))
                           for f in ("silu", "gelu", "sigmoid", "relu", "leaky_relu"))
        out["gelu_tail"] = float(np.abs(T.gelu(dev(v)).to_host()[595:597] / layers.gelu(v)[595:597] - 1).max())
        out["exp"] = rel(T.exp(dev(v[:300])), np.exp(v[:300]))

        # DeviceTensor: slicing, None axes, broadcasting arithmetic, negation, concatenation
        h = r(2, 6, 5, 9)
        out["slice"] = max(rel(dev(h)[:, 2:5], h[:, 2:5]), rel(dev(h)[:, :, 1:4], h[:, :, 1:4]),
                           rel(dev(h)[:, :, :, :7], h[:, :, :, :7]))
        b6 = r(300)
        out["none_axes"] = rel(dev(b6)[:, None], b6[:, None])
        r1, b9 = r(2, 6, 1, 1), r(9)
        out["broadcast"] = max(rel(dev(h) * dev(r1), h * r1), rel(dev(h) + dev(b9), h + b9),
                               rel(-dev(h), -h), rel(dev(h[:, :3]) * dev(h)[:, 3:], h[:, :3] * h[:, 3:]))
        out["concatenate"] = max(rel(T.concatenate([dev(h), dev(h[:, :2])], axis=1), np.concatenate([h, h[:, :2]], 1)),
                                 rel(T.concatenate([dev(h), dev(h)], axis=3), np.concatenate([h, h], 3)))
        errors = []
        for key in ((slice(None, None, 2),), (slice(1, 2), slice(0, 2)), (Ellipsis, slice(0, 1)), (0,)):
            try:
                dev(h)[key]
            except IndexError as e:
                errors.append(str(e))
        out["index_errors"] = len(errors)

        # norms (429 pixels over channels, 234 rows over the last axis), pooling (300 rows),
        # shuffles, all-around transforms on a 5 x 7 grid
        hl, g, bb = r(3, 6, 13, 11), r(6), r(6)
        out["layer_norm"] = max(rel(T.layer_norm_channels(dev(hl), dev(g), dev(bb)), layers.layer_norm_channels(hl, g, bb)),
                                rel(T.layer_norm_channels(dev(hl), dev(g)), layers.layer_norm_channels(hl, g)),
                                rel(T.layer_norm(dev(hl), dev(r11 := r(11)), dev(q11 := r(11)), axis=-1),
                                    layers.layer_norm(hl, r11, q11, axis=-1)))
        hp = r(3, 100, 2, 3)
        out["pool"] = rel(T.adaptive_avg_pool_1(dev(hp)), layers.adaptive_avg_pool_1(hp))
        s = r(2, 8, 5, 7)
        out["shuffle"] = max(rel(T.pixel_shuffle(dev(s), 2), layers.pixel_shuffle(s, 2)),
                             rel(T.pixel_unshuffle(dev(layers.pixel_shuffle(s, 2)), 2), s))
        seq = r(2, 16, 35)
        worst = 0.0
        for kind in (("diagonal", 8, "concate"), ("zorder", 4, "add"), ("zigzag", 2, "concate")):
            fwd = T.all_around(dev(seq), (5, 7), *kind)
            worst = max(worst, rel(fwd, scans.all_around(seq, (5, 7), *kind)))
            y = r(*fwd.shape)
            worst = max(worst, rel(T.restore(dev(y), (5, 7), *kind), scans.restore(y, (5, 7), *kind)))
        out["all_around"] = worst
        out["max_blocks"], out["wrapped"] = grids["blocks"], grids["wrapped"]
        return out

    results = {"simulator_threads": K.THREADS, "simulator_max_blocks": K.MAX_BLOCKS}
    results["sim"] = grid_stride_checks()             # 4 blocks of 32 threads: arrays wrap
    K.THREADS, K.MAX_BLOCKS = 256, 4096               # the GPU's configuration
    results["gpu"] = grid_stride_checks()
    results.update(tiled, **scan)
    print(json.dumps(results))
""")


@pytest.fixture(scope="module")
def results():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True,
                          env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


CONFIGS = ["sim", "gpu"]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("check", ["gemm_simple", "matmul_broadcast", "conv2d", "unary", "exp", "gelu_tail",
                                   "layer_norm", "pool", "all_around"])
def test_numeric_kernels_match_numpy(results, config, check):
    assert results[config][check] < 1e-5, results[config][check]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("check", ["slice", "none_axes", "broadcast", "concatenate", "shuffle"])
def test_data_movement_is_exact(results, config, check):
    assert results[config][check] == 0.0


def test_grid_stride_launches_span_several_blocks(results):
    """The checks above ran multi-block grids in both configurations, and wrapped around the
    simulator's (so a kernel reading threadIdx for cuda.grid(1), or dropping the stride, fails)."""
    assert results["simulator_max_blocks"] >= 2
    assert results["sim"]["max_blocks"] == results["simulator_max_blocks"] and results["sim"]["wrapped"]
    assert results["gpu"]["max_blocks"] >= 10


@pytest.mark.parametrize("check", ["gemm_tiled", "gemm_tiled_strided"])
def test_tiled_gemm_at_its_real_tile(results, check):
    assert results["gemm_blocks"] >= 12          # 3 x 2 tiles per batch item, 2 items
    assert results[check] < 1e-5, results[check]


@pytest.mark.parametrize("case", ["real_chunks", "one_chunk", "short_chunks"])
def test_selective_scan_over_several_blocks(results, case):
    scan_blocks, carry_blocks = results[f"scan_{case}_blocks"]
    assert scan_blocks >= 2 and (carry_blocks >= 2 or case == "one_chunk"), (scan_blocks, carry_blocks)
    assert results[f"scan_{case}"] < 1e-5, results[f"scan_{case}"]


def test_unsupported_indexing_is_a_clear_error(results):
    assert results["sim"]["index_errors"] == results["gpu"]["index_errors"] == 4


def test_the_cuda_table_has_a_device_function_for_every_operation():
    """Every entry of the 'cuda' backend is a DeviceTensor function that takes the reference
    function's required arguments positionally (as the model passes them), except the MHSSM, the
    FFN and the blocks' halves, which the reference composes from the other entries."""
    import inspect

    from eamamba_ref.kernels.cuda import tensor
    from eamamba_ref.reference.ops import NUMPY, Ops
    from eamamba_ref.runtime import backends

    cuda_ops = backends._table("cuda")            # built without a GPU: nothing runs here
    for name in Ops._fields:
        device_fn, reference_fn = getattr(cuda_ops, name), getattr(NUMPY, name)
        if name in ("mhssm", "channel_mixer", "block_mhssm", "block_ffn"):
            assert device_fn is reference_fn
            continue
        assert device_fn is getattr(tensor, name), name
        try:
            wanted = [q.name for q in inspect.signature(reference_fn).parameters.values()
                      if q.default is q.empty and q.kind in (q.POSITIONAL_ONLY, q.POSITIONAL_OR_KEYWORD)]
        except ValueError:                         # a NumPy builtin (np.exp): no signature to compare
            continue
        inspect.signature(device_fn).bind(*wanted)     # raises TypeError if it cannot take them


def test_uploads_have_canonical_strides_so_real_device_reshapes_work():
    """A real device array reshapes only when its strides are the canonical C strides of its shape
    (numba-cuda's extent check); NumPy leaves length-1 axes with other strides, e.g. (4, 0, 0)
    for g[:, None, None]. Found on an H200: broadcasting such an operand failed there, never in
    the simulator, so the upload itself must give canonical strides. (Simulator subprocess: the
    upload only; the extent check is numba-cuda's own host-side code.)"""
    script = textwrap.dedent("""
        import json
        import numpy as np
        from eamamba_ref.kernels.cuda.tensor import DeviceTensor
        g = np.arange(24, dtype=np.float32)
        uploads = (g[:, None, None], g[None, :, None, None], g.reshape(4, 6)[:, :1], np.float32(3.0)[None])
        print(json.dumps([[DeviceTensor.from_host(h).data.shape, DeviceTensor.from_host(h).data.strides]
                          for h in uploads]))
    """)
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    from numba.cuda.cudadrv import dummyarray              # host-side code: no GPU needed

    for shape, strides in json.loads(run.stdout.strip().splitlines()[-1]):
        shape, strides = tuple(shape), tuple(strides)
        assert strides == tuple(int(np.prod(shape[i + 1:], dtype=np.int64)) * 4 for i in range(len(shape)))
        d = dummyarray.Array.from_desc(0, shape, strides, 4)
        _, extents = d.reshape(*((1,) + shape))
        assert extents == [d.extent]                 # what a real DeviceNDArray.reshape requires
