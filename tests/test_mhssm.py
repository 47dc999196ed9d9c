"""MHSSM (eamamba_ref.reference.mhssm) against independent evaluations.

1. A float64 NumPy composition written here from the official ExtendedMamba.forward: tokens
   `(B, L, C)`, the official einsums, the official tensor_reorder steps (split / transpose or flip /
   reverse / index) done literally, and a sequential float64 selective scan.
2. When torch is installed, the PyTorch reference module (eamamba_ref.pytorch, itself checked
   against the official code) with its own random initialisation.

Tolerance: relative error max|a - b| / max|b| <= 2e-5 against float64 (float32 accumulation over
L <= 100 steps and matmuls of <= 64 terms gives ~1e-6; 2e-5 leaves headroom without hiding a
wrong index, which shows up as O(1) errors).
"""
import dataclasses
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from eamamba_ref.reference import scans
from eamamba_ref.io.config import RELEASED_MAMBA, MambaConfig
from eamamba_ref.reference.mhssm import mhssm
from eamamba_ref.reference.ops import NUMPY
from eamamba_ref.runtime.backends import table
from eamamba_ref.reference.parameters import mhssm_parameter_shapes


def rel_err(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / max(np.max(np.abs(b)), 1e-30))


def random_params(d_model, cfg, rng):
    p = {}
    for name, shape in mhssm_parameter_shapes(d_model, cfg).items():
        scale = 0.5 if name != "A_logs" else 1.0
        p[name] = (rng.standard_normal(shape) * scale).astype(np.float32)
    p["A_logs"] = np.log(rng.uniform(0.5, 4.0, p["A_logs"].shape)).astype(np.float32)
    return p


# ------------------------------------------------------------- float64 composition (oracle)
def official_reorder(x, size, scan_type, K, merge):
    """Literal float64 transcription of the official tensor_reorder + index. x: (B, C, L)."""
    H, W = size
    if K == 1:
        sections = [x]
    else:
        if merge == "add":
            x = np.concatenate([x] * K, axis=1)
        B, C, L = x.shape
        sections = np.split(x, K, axis=1)
    out = []
    for i, s in enumerate(sections):
        B, c, L = s.shape
        if K > 1 and i % 4 in (2, 3):
            if scan_type is None or i >= 4:
                s = s.reshape(B, c, H, W).transpose(0, 1, 3, 2).reshape(B, c, L)
            else:
                s = s.reshape(B, c, H, W)[..., ::-1].reshape(B, c, L)
        if i % 2 == 1:
            s = s[..., ::-1]
        if scan_type is not None and (K < 8 or i < 4):
            s = s[..., scans.scan_order(scan_type, H, W)]
        out.append(s)
    return np.stack(out, axis=1)


def official_restore(y, size, scan_type, K, merge):
    """Literal inverse: undo index, reverse, transpose/flip; then sum ('add') or concatenate."""
    H, W = size
    B, K, c, L = y.shape
    out = []
    for i in range(K):
        s = y[:, i]
        if scan_type is not None and (K < 8 or i < 4):
            s = s[..., np.argsort(scans.scan_order(scan_type, H, W))]
        if i % 2 == 1:
            s = s[..., ::-1]
        if K > 1 and i % 4 in (2, 3):
            if scan_type is None or i >= 4:
                s = s.reshape(B, c, W, H).transpose(0, 1, 3, 2).reshape(B, c, L)
            else:
                s = s.reshape(B, c, H, W)[..., ::-1].reshape(B, c, L)
        out.append(s)
    return np.sum(out, axis=0) if merge == "add" else np.concatenate(out, axis=1)


def scan64(u, delta, A, Bs, Cs, D, bias):
    """Sequential float64 selective scan, grouped B/C (one group per direction), softplus on."""
    Bsz, Dch, L = u.shape
    G = Bs.shape[1]
    delta = delta + bias[None, :, None]
    delta = np.where(delta > 20, delta, np.log1p(np.exp(np.minimum(delta, 20))))
    group = np.arange(Dch) // (Dch // G)
    h = np.zeros((Bsz, Dch, A.shape[1]))
    y = np.empty((Bsz, Dch, L))
    for t in range(L):
        dA = np.exp(delta[:, :, t, None] * A[None])
        h = dA * h + delta[:, :, t, None] * Bs[..., t][:, group] * u[:, :, t, None]
        y[:, :, t] = np.einsum("bdn,bdn->bd", h, Cs[..., t][:, group]) + D[None] * u[:, :, t]
    return y


def silu64(v):
    return v / (1 + np.exp(-v))


def mhssm64(p, tokens, size, cfg):
    """float64 ExtendedMamba.forward. tokens: (B, L, C) -> (B, L, C)."""
    p = {k: v.astype(np.float64) for k, v in p.items()}
    B, L, C = tokens.shape
    H, W = size
    d = int(cfg.expand * C)
    N = cfg.d_state
    R = math.ceil(C / 16) if cfg.dt_rank == "auto" else cfg.dt_rank
    K = cfg.scan_count
    xz = np.einsum("oc,blc->bol", p["in_proj.weight"], tokens)
    if "in_proj.bias" in p:
        xz += p["in_proj.bias"][:, None]
    x, z = (xz, None) if cfg.disable_z_branch else (xz[:, :d], xz[:, d:])
    k = cfg.d_conv
    if cfg.conv_2d:
        xp = np.pad(x.reshape(B, d, H, W), ((0, 0), (0, 0), ((k - 1) // 2,) * 2, ((k - 1) // 2,) * 2))
        conv = np.zeros((B, d, H, W))
        for i in range(k):
            for j in range(k):
                conv += p["conv.weight"][None, :, 0, i, j, None, None] * xp[:, :, i:i + H, j:j + W]
        conv = conv.reshape(B, d, L)
    else:   # nn.Conv1d(padding=k-1) keeps the first L outputs
        xp = np.pad(x, ((0, 0), (0, 0), (k - 1, k - 1)))
        conv = np.zeros((B, d, L + k - 1))
        for j in range(k):
            conv += p["conv.weight"][None, :, 0, j, None] * xp[:, :, j:j + L + k - 1]
        conv = conv[..., :L]
    if "conv.bias" in p:
        conv += p["conv.bias"][None, :, None]
    x = official_reorder(silu64(conv), size, cfg.scan_type, K, cfg.scan_merge_method)
    x_dbl = np.einsum("bkdl,kcd->bkcl", x, p["x_proj_weight"])
    dts = np.einsum("bkrl,kdr->bkdl", x_dbl[:, :, :R], p["dt_projs_weight"])
    y = scan64(x.reshape(B, -1, L), dts.reshape(B, -1, L), -np.exp(p["A_logs"]),
               x_dbl[:, :, R:R + N], x_dbl[:, :, R + N:], p["Ds"], p["dt_projs_bias"].reshape(-1))
    y = official_restore(y.reshape(B, K, -1, L), size, cfg.scan_type, K, cfg.scan_merge_method)
    y = y.transpose(0, 2, 1)                                   # (B, L, d)
    mu = y.mean(-1, keepdims=True)
    y = (y - mu) / np.sqrt(y.var(-1, keepdims=True) + 1e-5) * p["out_norm.weight"] + p["out_norm.bias"]
    if z is not None:
        y = y * silu64(z.transpose(0, 2, 1))
    out = y @ p["out_proj.weight"].T
    if "out_proj.bias" in p:
        out += p["out_proj.bias"]
    return out


CONFIG_SPACE = dict(
    scan=st.sampled_from([(None, 1), (None, 2), (None, 4), ("diagonal", 2), ("diagonal", 8),
                          ("zigzag", 4), ("zorder", 8), ("hilbert", 4), ("hilbert", 8), ("diagonal", 1)]),
    merge=st.sampled_from(["add", "concate"]),
    expand=st.sampled_from([1, 2]),
    conv_2d=st.booleans(),
    disable_z=st.booleans(),
    d_state=st.sampled_from([1, 4, 10, 16]),
    dt_rank=st.sampled_from(["auto", 3]),
    proj_bias=st.booleans(),
    size=st.sampled_from([(1, 1), (2, 3), (4, 4), (5, 3), (8, 6)]),
    batch=st.integers(1, 2),
)


@settings(max_examples=40, deadline=None)
@given(**CONFIG_SPACE)
def test_mhssm_matches_float64_official_composition(scan, merge, expand, conv_2d, disable_z,
                                                    d_state, dt_rank, proj_bias, size, batch):
    scan_type, K = scan
    C = 16
    cfg = MambaConfig(scan_type=scan_type, scan_count=K, scan_merge_method=merge,
                      disable_z_branch=disable_z, d_state=d_state, d_conv=3 if conv_2d else 4,
                      expand=expand, conv_2d=conv_2d, dt_rank=dt_rank, bias=proj_bias)
    rng = np.random.default_rng(0)
    p = random_params(C, cfg, rng)
    H, W = size
    tokens = rng.standard_normal((batch, H * W, C)).astype(np.float32)
    expected = mhssm64(p, tokens.astype(np.float64), size, cfg)               # (B, L, C)
    got = mhssm(p, np.ascontiguousarray(tokens.transpose(0, 2, 1)), size, cfg, NUMPY)  # (B, C, L)
    assert got.dtype == np.float32 and got.shape == (batch, C, H * W)
    assert rel_err(got.transpose(0, 2, 1), expected) <= 2e-5


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_mhssm_backends_agree(backend):
    cfg = RELEASED_MAMBA                         # diagonal x8 concate, 2-D conv: numba's fused path
    rng = np.random.default_rng(3)
    p = random_params(32, cfg, rng)
    x = rng.standard_normal((1, 32, 48)).astype(np.float32)
    ref = mhssm(p, x, (6, 8), cfg, NUMPY)
    ops = table(backend)
    assert rel_err(ops.mhssm(p, x, (6, 8), cfg, ops), ref.astype(np.float64)) <= 1e-5


def test_mhssm_matches_pytorch_reference():
    torch = pytest.importorskip("torch")
    torch_ref = pytest.importorskip("eamamba_ref.pytorch")
    for scan_type, K, merge, conv_2d in [("diagonal", 8, "concate", True), ("hilbert", 4, "add", False),
                                         (None, 2, "concate", True), ("zigzag", 4, "concate", True)]:
        cfg = MambaConfig(scan_type=scan_type, scan_count=K, scan_merge_method=merge, d_state=16,
                          d_conv=3 if conv_2d else 4, conv_2d=conv_2d, expand=1)
        torch.manual_seed(0)
        module = torch_ref.ExtendedMamba(32, torch_ref.ScanTransform(scan_type, K, merge),
                                         d_state=16, d_conv=cfg.d_conv, expand=1, conv_2d=conv_2d)
        p = {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}
        assert {k: v.shape for k, v in p.items()} == mhssm_parameter_shapes(32, cfg)
        tokens = torch.randn(2, 6 * 10, 32)
        with torch.no_grad():
            expected = module(tokens, (6, 10)).numpy()
        got = mhssm(p, np.ascontiguousarray(tokens.numpy().transpose(0, 2, 1)), (6, 10), cfg, NUMPY)
        assert rel_err(got.transpose(0, 2, 1), expected.astype(np.float64)) <= 1e-4
