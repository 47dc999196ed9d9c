"""The fused Numba path of the MHSSM (eamamba_ref.kernels.cpu.fused) against the plain NumPy composition.

Golden values: the 'numpy' backend (the readable specification: all_around -> projections ->
reference scan -> restore), which test_mhssm.py checks against float64 and torch. Tolerance
1e-5 relative to the output's scale: both are float32 and differ in summation order and in the
vectorised exp (~3e-7 relative).
"""
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from eamamba_ref.reference import layers
from eamamba_ref.reference.ops import NUMPY
from eamamba_ref.runtime.backends import table
from eamamba_ref.io.config import MambaConfig, ModelConfig
from eamamba_ref.reference.mhssm import mhssm
from eamamba_ref.reference.parameters import mhssm_parameter_shapes
from eamamba_ref.runtime.model import EAMamba
from eamamba_ref.reference.parameters import init_params
from eamamba_ref.kernels.cpu import fused


def rel_err(a, b):
    return float(np.max(np.abs(a.astype(np.float64) - b)) / np.max(np.abs(b)))


def random_params(C, cfg, rng):
    p = {}
    for name, shape in mhssm_parameter_shapes(C, cfg).items():
        if name == "A_logs":
            v = np.log(np.arange(1, shape[1] + 1) * np.exp(0.2 * rng.standard_normal(shape)))
        elif name == "dt_projs_bias":
            v = rng.uniform(-5.0, -1.0, shape)
        elif name.startswith("out_norm"):
            v = (1.0 if name.endswith("weight") else 0.0) + 0.1 * rng.standard_normal(shape)
        else:
            v = rng.standard_normal(shape) / np.sqrt(max(1, np.prod(shape[1:])))
        p[name] = np.asarray(v, np.float32)
    return p


@settings(max_examples=25, deadline=None)
@given(scan=st.sampled_from([(None, 1), (None, 4), ("diagonal", 8), ("zigzag", 2), ("hilbert", 4),
                             ("zorder", 8), ("diagonal", 1)]),
       C=st.sampled_from([16, 24, 64]), expand=st.sampled_from([1, 2]), d_state=st.sampled_from([1, 10, 16, 20]),
       disable_z=st.booleans(), proj_bias=st.booleans(), dt_rank=st.sampled_from(["auto", 3]),
       size=st.sampled_from([(1, 1), (3, 5), (8, 8), (7, 12)]), batch=st.integers(1, 2))
def test_fused_mhssm_matches_numpy_backend(scan, C, expand, d_state, disable_z, proj_bias, dt_rank, size, batch):
    scan_type, K = scan
    cfg = MambaConfig(scan_type=scan_type, scan_count=K, scan_merge_method="concate", d_state=d_state,
                      d_conv=3, conv_2d=True, expand=expand, disable_z_branch=disable_z, bias=proj_bias, dt_rank=dt_rank)
    rng = np.random.default_rng(C + d_state)
    p = random_params(C, cfg, rng)
    x = rng.standard_normal((batch, C, size[0] * size[1])).astype(np.float32)
    ref = mhssm(p, x, size, cfg, NUMPY)
    got = fused.mhssm(p, x, size, cfg, table("numba"))
    assert got.dtype == np.float32 and got.shape == ref.shape
    assert rel_err(got, ref.astype(np.float64)) <= 1e-5


def test_numba_backend_runs_the_fused_kernels_only_where_they_apply(monkeypatch):
    """The 'numba' table's mhssm fuses 'concate' heads with the 2-D conv and runs the reference
    composition otherwise; the 'numpy' table never reaches the kernels."""
    assert table("numba").mhssm.func is fused.mhssm and table("numpy").mhssm is mhssm
    calls = []
    original = fused.fused_mhssm
    monkeypatch.setattr(fused, "fused_mhssm", lambda *a: calls.append(a) or original(*a))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 16, 12)).astype(np.float32)
    for merge, conv_2d, backend, expected in [("concate", True, "numba", 1), ("add", True, "numba", 0),
                                              ("concate", False, "numba", 0), ("concate", True, "numpy", 0)]:
        cfg = MambaConfig(scan_type="diagonal", scan_count=4, scan_merge_method=merge, conv_2d=conv_2d,
                          d_conv=3 if conv_2d else 4, expand=1)
        calls.clear()
        ops = table(backend)
        ops.mhssm(random_params(16, cfg, rng), x, (3, 4), cfg, ops)
        assert len(calls) == expected, (merge, conv_2d, backend)


def test_dwconv_silu_pixel_major_matches_layers():
    rng = np.random.default_rng(1)
    # rows wider than DWCONV_PIXELS are cut into several tasks: the taps at the cuts must still see
    # their neighbours (70 = 32 + 32 + 6; 33 = 32 + 1)
    assert fused.DWCONV_PIXELS < 33
    for k, (H, W) in [(3, (9, 7)), (5, (4, 11)), (1, (2, 2)), (3, (1, 1)), (3, (5, 70)), (5, (3, 33))]:
        x = rng.standard_normal((2, 6, H, W)).astype(np.float32)
        w = rng.standard_normal((6, 1, k, k)).astype(np.float32)
        b = rng.standard_normal(6).astype(np.float32)
        ref = layers.silu(layers.conv2d(x, w, b, padding=(k - 1) // 2, groups=6))
        got = fused.dwconv_silu_pixel_major(x.transpose(0, 2, 3, 1), w, b)
        assert got.shape == (2, H * W, 6)
        np.testing.assert_allclose(got, ref.reshape(2, 6, H * W).transpose(0, 2, 1), rtol=1e-5, atol=1e-5)


def test_layer_norm_gate_matches_layers():
    rng = np.random.default_rng(2)
    y = (3.0 + rng.standard_normal((2, 17, 40))).astype(np.float32)
    z = rng.standard_normal((2, 17, 40)).astype(np.float32)
    w, b = rng.standard_normal(40).astype(np.float32), rng.standard_normal(40).astype(np.float32)
    ref = layers.layer_norm(y, w, b, axis=-1) * layers.silu(z)
    np.testing.assert_allclose(fused.layer_norm_gate(y.copy(), z, w, b), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fused.layer_norm_gate(y.copy(), None, w, b), layers.layer_norm(y, w, b, axis=-1),
                               rtol=1e-5, atol=1e-5)


def test_whole_model_numba_matches_numpy_backend():
    args = dict(dim=16, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1,
                mamba_cfg=dict(scan_type="diagonal", scan_count=8, scan_merge_method="concate", d_state=16,
                               d_conv=3, expand=1, conv_2d=True))
    cfg = ModelConfig.from_args("eamamba", args)
    params = init_params(cfg, seed=3)
    x = np.random.default_rng(4).random((1, 3, 24, 16), dtype=np.float32)
    assert fused.fusable(cfg.mamba)
    ref = EAMamba(cfg, params, backend="numpy")(x)
    got = EAMamba(cfg, params, backend="numba")(x)
    assert rel_err(got, ref.astype(np.float64)) <= 1e-5


def test_x_proj_inside_the_scan_matches_x_proj_before_it():
    # Heads of up to MAX_TASK_CHANNELS channels are projected inside the scan kernel, chunk by
    # chunk (four channels per pass, then the rest one by one); it must give what x_proj before
    # the scan gives. Heads of 1, 3, 6 and 16 channels; two directions; sequences longer than a
    # chunk; N = 20 (a second, partly padded block of states).
    rng = np.random.default_rng(5)
    B, L, K, R, N = 2, 300, 2, 3, 20
    for Cp in (1, 3, 6, 16):
        assert fused.projects_in_scan(Cp)
        d = K * Cp
        u = rng.standard_normal((B, L, d)).astype(np.float32)
        w_x = (rng.standard_normal((K, R + 2 * N, Cp)) / np.sqrt(Cp)).astype(np.float32)
        table_ = np.stack([rng.permutation(L) for _ in range(K)]).astype(np.int64)
        w_dt = rng.standard_normal((K, Cp, R)).astype(np.float32)
        bias, D = rng.uniform(-4, -1, d).astype(np.float32), rng.standard_normal(d).astype(np.float32)
        A = -rng.uniform(0.1, 2, (d, N)).astype(np.float32)
        heads = u.reshape(B, L, K, Cp).transpose(0, 2, 1, 3).astype(np.float64)
        xdbl = np.matmul(heads, w_x.transpose(0, 2, 1).astype(np.float64)).astype(np.float32)
        want = fused.directional_scan(u, xdbl, table_, w_dt, bias, A, D)
        got = fused.directional_scan(u, None, table_, w_dt, bias, A, D, x_proj_weight=w_x)
        assert rel_err(got, want.astype(np.float64)) <= 1e-5, Cp
    assert not fused.projects_in_scan(fused.MAX_TASK_CHANNELS + 1)


def test_the_mhssm_leaves_x_proj_to_the_scan_only_for_narrow_heads():
    rng = np.random.default_rng(6)
    for C, K, projected in [(16, 8, True), (64, 2, False)]:      # 2 and 32 channels per head
        cfg = MambaConfig(scan_type="diagonal", scan_count=K, scan_merge_method="concate", d_conv=3,
                          conv_2d=True, expand=1)
        ops = table("numba")
        products = []
        counted = ops._replace(matmul=lambda *a, **k: products.append(1) or ops.matmul(*a, **k))
        x = rng.standard_normal((1, C, 6 * 5)).astype(np.float32)
        p = random_params(C, cfg, rng)
        got = fused.mhssm(p, x, (6, 5), cfg, counted)
        assert (len(products) == 0) == projected, (C, K)
        assert rel_err(got, mhssm(p, x, (6, 5), cfg, NUMPY).astype(np.float64)) <= 1e-5
