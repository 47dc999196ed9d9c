"""The GPU path's kernels and DeviceTensor, one by one, against the NumPy layers (the reference).

All checks run in one subprocess on numba's CUDA simulator (the simulator is chosen when numba.cuda
is first imported, so it cannot be switched on inside this test process); each test reads its
result. Shapes are small and deliberately not multiples of the GEMM tile or the thread block.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("numba.cuda")

SCRIPT = textwrap.dedent("""
    import json
    import numpy as np
    from eamamba_ref import layers, scans
    from eamamba_ref.gpu import DeviceTensor
    from eamamba_ref.gpu import kernels as K, tensor as T

    rng = np.random.default_rng(0)
    def r(*shape):
        return rng.standard_normal(shape).astype(np.float32)
    def dev(a):
        return DeviceTensor.from_host(a)
    def rel(got, want):
        got = got.to_host() if isinstance(got, DeviceTensor) else got
        assert got.shape == want.shape, (got.shape, want.shape)
        return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))
    out = {}

    # both GEMM kernels, a shared over b's batch and a per-direction a
    for name, tiled in (("gemm_tiled", True), ("gemm_simple", False)):
        errs = []
        for a, b in ((r(1, 5, 7), r(3, 7, 9)), (r(2, 6, 5), r(4, 5, 3)), (r(1, 9, 1), r(1, 1, 6))):
            c = DeviceTensor.empty((b.shape[0], a.shape[1], b.shape[2]))
            K.matmul_kernel(*c.shape, tiled=tiled)(dev(a).data, dev(b).data, c.data)
            errs.append(rel(c, np.matmul(np.tile(a, (b.shape[0] // a.shape[0], 1, 1)), b)))
        out[name] = max(errs)
    a, x = r(3, 4, 5), r(2, 3, 5, 6)
    out["matmul_broadcast"] = rel(T.matmul(dev(a), dev(x)), np.matmul(a, x))

    # convolutions: dense 3x3, 1 x k with asymmetric padding, 1x1 + bias, depthwise 3x3 + bias
    x = r(2, 5, 7, 6)
    cases = [(r(4, 5, 3, 3), None, 1, 1), (r(3, 5, 1, 4), r(3), (0, 3), 1),
             (r(6, 5, 1, 1), r(6), 0, 1), (r(5, 1, 3, 3), r(5), 1, 5)]
    out["conv2d"] = max(rel(T.conv2d(dev(x), dev(w), None if b is None else dev(b), p, g),
                            layers.conv2d(x, w, b, p, g)) for w, b, p, g in cases)

    # element-wise functions (GELU far into the negative tail, where 1 + erf would cancel)
    v = np.concatenate([r(50) * 4, np.float32([-12, -9, 0, 9, 30])])
    out["unary"] = max(rel(getattr(T, f)(dev(v)), getattr(layers, f)(v))
                       for f in ("silu", "gelu", "sigmoid", "relu", "leaky_relu"))
    out["gelu_tail"] = float(np.abs(T.gelu(dev(v)).to_host()[50:52] / layers.gelu(v)[50:52] - 1).max())
    out["exp"] = rel(T.exp(dev(v[:40])), np.exp(v[:40]))

    # DeviceTensor: slicing, None axes, broadcasting arithmetic, negation, concatenation
    h = r(2, 6, 3, 4)
    out["slice"] = max(rel(dev(h)[:, 2:5], h[:, 2:5]), rel(dev(h)[:, :, 1:3], h[:, :, 1:3]),
                       rel(dev(h)[:, :, :, :2], h[:, :, :, :2]))
    b6 = r(6)
    out["none_axes"] = rel(dev(b6)[:, None], b6[:, None])
    out["broadcast"] = max(rel(dev(h) * dev(r1 := r(2, 6, 1, 1)), h * r1), rel(dev(h) + dev(b4 := r(4)), h + b4),
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

    # norms, pooling, shuffles, all-around transforms
    g, bb = r(6), r(6)
    out["layer_norm"] = max(rel(T.layer_norm_channels(dev(h), dev(g), dev(bb)), layers.layer_norm_channels(h, g, bb)),
                            rel(T.layer_norm_channels(dev(h), dev(g)), layers.layer_norm_channels(h, g)),
                            rel(T.layer_norm(dev(h), dev(g[:4]), dev(bb[:4]), axis=-1),
                                layers.layer_norm(h, g[:4], bb[:4], axis=-1)))
    out["pool"] = rel(T.adaptive_avg_pool_1(dev(h)), layers.adaptive_avg_pool_1(h))
    s = r(1, 8, 3, 5)
    out["shuffle"] = max(rel(T.pixel_shuffle(dev(s), 2), layers.pixel_shuffle(s, 2)),
                         rel(T.pixel_unshuffle(dev(layers.pixel_shuffle(s, 2)), 2), s))
    seq = r(2, 8, 15)
    worst = 0.0
    for kind in (("diagonal", 8, "concate"), ("zorder", 4, "add"), ("zigzag", 2, "concate")):
        fwd = T.all_around(dev(seq), (3, 5), *kind)
        worst = max(worst, rel(fwd, scans.all_around(seq, (3, 5), *kind)))
        y = r(*fwd.shape)
        worst = max(worst, rel(T.restore(dev(y), (3, 5), *kind), scans.restore(y, (3, 5), *kind)))
    out["all_around"] = worst
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def results():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("check", ["gemm_tiled", "gemm_simple", "matmul_broadcast", "conv2d", "unary", "exp",
                                   "gelu_tail", "layer_norm", "pool", "all_around"])
def test_numeric_kernels_match_numpy(results, check):
    assert results[check] < 1e-5, results[check]


@pytest.mark.parametrize("check", ["slice", "none_axes", "broadcast", "concatenate", "shuffle"])
def test_data_movement_is_exact(results, check):
    assert results[check] == 0.0


def test_unsupported_indexing_is_a_clear_error(results):
    assert results["index_errors"] == 4


def test_ops_looks_up_cpu_functions_at_call_time(monkeypatch):
    """bench_model.py's per-stage profile wraps `layers.conv2d` & co.; the dispatcher must see that."""
    import numpy as np

    from eamamba_ref import layers, ops

    calls = []
    original = layers.conv2d
    monkeypatch.setattr(layers, "conv2d", lambda *a, **k: calls.append(1) or original(*a, **k))
    ops.conv2d(np.ones((1, 2, 3, 3), np.float32), np.ones((1, 2, 1, 1), np.float32))
    assert calls == [1]
    with pytest.raises(TypeError, match="NumPy array or a DeviceTensor"):
        ops.conv2d([[1.0]], np.ones((1, 1, 1, 1), np.float32))
