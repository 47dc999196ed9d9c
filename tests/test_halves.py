"""The blocks' two halves fused with their LayerNorm and residual (`kernels.cpu.halves`) and the
projection with a LayerNorm before it and adds after it (`kernels.cpu.gemm.project`): against the
plain composition on the same backend (bit for bit: same blocks, same arithmetic), against the
NumPy reference and against float64."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eamamba_ref.io.config import MambaConfig, ModelConfig
from eamamba_ref.kernels.cpu import gemm, halves
from eamamba_ref.kernels.cpu.norms import layer_norm_channels
from eamamba_ref.reference import model
from eamamba_ref.reference.ops import NUMPY
from eamamba_ref.reference.parameters import init_params
from eamamba_ref.runtime import backends, threads


def block_params(mixer, norm, bias, merge, seed):
    """A block's parameters (official names, `encoder_level1.0.` stripped) and its config, C = 8."""
    cfg = ModelConfig(dim=8, num_blocks=(1, 1, 1, 1), num_refinement_blocks=0, channel_mixer_type=mixer,
                      layernorm_type=norm, bias=bias,
                      mamba=MambaConfig(scan_type="diagonal", scan_count=4, scan_merge_method=merge,
                                        conv_2d=True, d_conv=3, bias=bias)).validate()
    params = init_params(cfg, seed=seed)
    rng = np.random.default_rng(seed)
    p = model.sub(params, "encoder_level1.0")
    for k in p:                    # LayerNorm weights and biases away from their 1 / 0 start
        if k.startswith("norm"):
            p[k] = (p[k] + rng.standard_normal(p[k].shape)).astype(np.float32)
    return p, cfg


def rel(a, b):
    return np.abs(np.asarray(a, np.float64) - b).max() / (np.abs(b).max() + 1e-12)


@settings(max_examples=20, deadline=None)
@given(B=st.integers(1, 2), H=st.integers(1, 40), W=st.integers(1, 40),
       mixer=st.sampled_from(["simple", "ffn", "gdfn"]), norm=st.sampled_from(["WithBias", "BiasFree"]),
       bias=st.booleans(), offset=st.floats(-4, 4), seed=st.integers(0, 2**16))
def test_block_ffn_is_the_plain_composition_bit_for_bit(B, H, W, mixer, norm, bias, offset, seed):
    """Maps above and below the size that fuses (512 pixels), ragged last blocks, both norms, the
    per-pixel kinds (fused) and one with a 3x3 conv (plain)."""
    p, cfg = block_params(mixer, norm, bias, "concate", seed)
    x = (np.random.default_rng(seed + 1).standard_normal((B, 8, H, W)) + offset).astype(np.float32)
    ops = backends.table("numba")
    got = ops.block_ffn(p, x, cfg, ops)
    plain = model.block_ffn(p, x, cfg, ops)
    reference = model.block_ffn(p, x, cfg, NUMPY)
    assert got.dtype == np.float32 and got.shape == x.shape
    assert np.array_equal(got, plain)
    assert rel(got, reference.astype(np.float64)) < 1e-5


@settings(max_examples=10, deadline=None)
@given(B=st.integers(1, 2), H=st.integers(2, 24), W=st.integers(2, 24),
       norm=st.sampled_from(["WithBias", "BiasFree"]), bias=st.booleans(), merge=st.sampled_from(["concate", "add"]),
       seed=st.integers(0, 2**16))
def test_block_mhssm_is_the_plain_composition_bit_for_bit(B, H, W, norm, bias, merge, seed):
    """The fused configurations ('concate') and one that is not ('add'), with and without biases."""
    p, cfg = block_params("simple", norm, bias, merge, seed)
    x = np.random.default_rng(seed + 1).standard_normal((B, 8, H, W)).astype(np.float32)
    ops = backends.table("numba")
    got = ops.block_mhssm(p, x, cfg, ops)
    plain = model.block_mhssm(p, x, cfg, ops)
    reference = model.block_mhssm(p, x, cfg, NUMPY)
    assert np.array_equal(got, plain)
    assert rel(got, reference.astype(np.float64)) < 1e-5


def test_the_halves_are_bound_and_the_fused_paths_really_run(monkeypatch):
    """The 'numba' table binds the fused halves to the runtime's pool, and a forward reaches them
    (not the plain composition) when nothing is recorded."""
    ops = backends.table("numba")
    assert ops.block_mhssm.func is halves.block_mhssm and ops.block_ffn.func is halves.block_ffn
    assert ops.block_mhssm.keywords["parallel_for"] is threads.parallel_for
    assert NUMPY.block_mhssm is model.block_mhssm and NUMPY.block_ffn is model.block_ffn

    def plain(*a, **k):
        raise AssertionError("the plain composition ran")
    monkeypatch.setattr(halves, "reference_block_mhssm", plain)
    monkeypatch.setattr(halves, "reference_block_ffn", plain)
    p, cfg = block_params("simple", "WithBias", False, "concate", 0)
    x = np.random.default_rng(0).standard_normal((1, 8, 24, 24)).astype(np.float32)
    ops.block_ffn(p, ops.block_mhssm(p, x, cfg, ops), cfg, ops)


@settings(max_examples=30, deadline=None)
@given(B=st.integers(1, 2), K=st.integers(1, 40), M=st.integers(1, 150), L=st.integers(1, 1500),
       with_norm=st.booleans(), norm_bias=st.booleans(), with_bias=st.booleans(), residual=st.booleans(),
       layout=st.sampled_from(["channels", "pixels in", "pixels out"]), seed=st.integers(0, 2**16))
def test_project_against_float64_and_the_unfused_steps(B, K, M, L, with_norm, norm_bias, with_bias, residual,
                                                       layout, seed):
    """`project` = LayerNorm, `matmul`, + bias, + residual: to float64 within 1e-5, and bit for bit
    the same as those steps run one after the other (small maps cut along M too)."""
    rng = np.random.default_rng(seed)
    pixels_in, pixels_out = layout == "pixels in", layout == "pixels out"
    with_norm = with_norm and not pixels_in
    residual = residual and not pixels_out
    x = (rng.standard_normal((B, K, L)) + rng.uniform(-3, 3)).astype(np.float32)
    w = rng.standard_normal((M, K)).astype(np.float32)
    nw, nb = rng.standard_normal(K).astype(np.float32), rng.standard_normal(K).astype(np.float32)
    norm = (nw, nb if norm_bias else None, 1e-5) if with_norm else None
    bias = rng.standard_normal(M).astype(np.float32) if with_bias else None
    res = rng.standard_normal((B, M, L)).astype(np.float32) if residual else None
    src = np.ascontiguousarray(x.transpose(0, 2, 1)) if pixels_in else x
    got = gemm.project(w, src, norm=norm, bias=bias, residual=res, pixel_major_in=pixels_in,
                       pixel_major_out=pixels_out, parallel_for=threads.parallel_for)

    # the steps, unfused: the blocks' LayerNorm kernel on (B, K, L, 1), the blocked matmul, the adds
    t_numba = layer_norm_channels(x[..., None], nw, norm[1])[..., 0] if with_norm else x
    pool = threads.parallel_for
    steps = (gemm.matmul(t_numba.transpose(0, 2, 1), w.T, "rows", parallel_for=pool) if pixels_out
             else gemm.matmul(w, t_numba, parallel_for=pool))
    if bias is not None:
        steps += bias if pixels_out else bias[:, None]
    if res is not None:
        steps = steps + res

    x64 = x.astype(np.float64)
    if with_norm:
        mean = x64.mean(axis=1, keepdims=True)
        rstd = 1 / np.sqrt(((x64 - mean) ** 2).mean(axis=1, keepdims=True) + 1e-5)
        x64 = ((x64 - mean) if norm_bias else x64) * rstd * nw[:, None] + (nb[:, None] if norm_bias else 0)
    exact = np.einsum("mk,bkl->bml", w.astype(np.float64), x64)
    exact += 0 if bias is None else bias[:, None]
    exact += 0 if res is None else res
    if pixels_out:
        exact = exact.transpose(0, 2, 1)
    assert got.shape == exact.shape and got.dtype == np.float32
    assert rel(got, exact) < 1e-5
    assert np.array_equal(got, steps)


def test_project_refuses_what_it_cannot_do():
    x = np.zeros((1, 4, 8), np.float32)
    with pytest.raises(ValueError, match="channel-first"):
        gemm.project(np.zeros((2, 4), np.float32), x.transpose(0, 2, 1), norm=(np.ones(4), None, 1e-5),
                     pixel_major_in=True)
    with pytest.raises(ValueError, match="residual"):
        gemm.project(np.zeros((2, 4), np.float32), x, residual=np.zeros((1, 8, 2), np.float32),
                     pixel_major_out=True)


@settings(max_examples=15, deadline=None)
@given(B=st.integers(1, 2), L=st.integers(1, 1500), d=st.integers(1, 40), gated=st.booleans(),
       residual=st.booleans(), seed=st.integers(0, 2**16))
def test_gate_fused_into_out_proj_gives_the_bits_of_the_two_steps(B, L, d, gated, residual, seed):
    """LayerNorm * SiLU(z) done by out_proj's blocks (`prepare`) = the gate kernel, then out_proj."""
    from eamamba_ref.kernels.cpu import fused
    rng = np.random.default_rng(seed)
    C = 7
    y = (rng.standard_normal((B, L, d)) + 2).astype(np.float32)
    z = rng.standard_normal((B, L, d)).astype(np.float32) if gated else None
    res = rng.standard_normal((B, C, L)).astype(np.float32) if residual else None
    p = {"out_norm.weight": rng.standard_normal(d).astype(np.float32),
         "out_norm.bias": rng.standard_normal(d).astype(np.float32),
         "out_proj.weight": rng.standard_normal((C, d)).astype(np.float32)}
    got = fused._gate_and_project_out(p, y.copy(), z, res, threads.parallel_for)
    gated_y = fused.layer_norm_gate(y.copy(), z, p["out_norm.weight"], p["out_norm.bias"])
    want = gemm.project(p["out_proj.weight"], gated_y, residual=res, pixel_major_in=True,
                        parallel_for=threads.parallel_for)
    assert np.array_equal(got, want)


def test_project_prepares_each_block_once_before_its_gemm():
    """`prepare` runs once per block of pixels (no cut along M then), before that block's GEMM."""
    rng = np.random.default_rng(5)
    B, L, K, M = 2, 1100, 6, 300                     # M large enough that `matmul` would cut it
    x = rng.standard_normal((B, L, K)).astype(np.float32)
    w = rng.standard_normal((M, K)).astype(np.float32)
    seen = np.zeros((B, L), int)
    work = x.copy()

    def double(b, l0, l1):
        seen[b, l0:l1] += 1
        work[b, l0:l1] *= 2
    got = gemm.project(w, work, pixel_major_in=True, prepare=double, parallel_for=threads.parallel_for)
    assert (seen == 1).all()
    want = gemm.project(w, 2 * x, pixel_major_in=True, parallel_for=threads.parallel_for)
    assert np.array_equal(got, want)
