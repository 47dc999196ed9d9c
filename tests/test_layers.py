"""Tests of eamamba_ref.reference.layers.

Golden values come from PyTorch (CPU, float32) or from the official formulas evaluated in float64
NumPy. Error measure unless stated otherwise: ``max|ours - ref| / max|ref|`` (relative to the
largest reference value, so it is meaningful for outputs that cross zero).
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eamamba_ref.reference import layers
from eamamba_ref.reference.layers import (adaptive_avg_pool_1, bicubic_upsample, conv2d, gelu,
                                          layer_norm, layer_norm_channels, leaky_relu, linear,
                                          pixel_shuffle, pixel_unshuffle, relu, sigmoid, silu,
                                          softplus)

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # the torch-free tests still run
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="needs torch (the reference implementation)")

FAST = settings(max_examples=40, deadline=None)

# Documented bounds (max|a-b| / max|b|). Measured: conv and linear <= 3e-7 (float32 sums in a
# different order), bicubic <= 6e-7 (PyTorch's kernel fuses multiply-adds), layer norms <= 3e-7.
CONV_TOL = 1e-5
BICUBIC_TOL = 1e-5
# Layer norms of inputs offset far from zero with only 2 channels centre in float32 with
# cancellation (x ~ 5 +- 0.2): 1.4e-5 was measured there, ~3e-7 elsewhere; hence 1e-4.
NORM_TOL = 1e-4


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-30))


def randn(seed, *shape, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def t(a):
    return torch.from_numpy(np.ascontiguousarray(a))


def check_f32_contiguous(out):
    assert out.dtype == np.float32
    assert out.flags.c_contiguous


# ---------------------------------------------------------------------------------------------
# conv2d


@st.composite
def conv_cases(draw):
    """A conv problem: groups dense / depthwise / another divisor; kernel 1, 3, 5; tiny maps."""
    kind = draw(st.sampled_from(["dense", "depthwise", "grouped"]))
    if kind == "dense":
        groups, c_in, c_out = 1, draw(st.integers(1, 8)), draw(st.integers(1, 8))
    elif kind == "depthwise":
        c_in = c_out = groups = draw(st.integers(1, 8))
    else:  # groups a proper divisor, with different in and out widths per group
        groups = draw(st.integers(2, 4))
        c_in = groups * draw(st.integers(1, 2))
        c_out = groups * draw(st.integers(1, 3))
    k = draw(st.sampled_from([1, 3, 5]))
    ph, pw = draw(st.integers(0, k // 2)), draw(st.integers(0, k // 2))
    # the padded map must hold the kernel
    H = draw(st.integers(max(1, k - 2 * ph), 12))
    W = draw(st.integers(max(1, k - 2 * pw), 12))
    B = draw(st.integers(1, 2))
    bias = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return B, c_in, c_out, H, W, k, (ph, pw), groups, bias, seed


def _torch_conv(x, w, b, padding, groups):
    return F.conv2d(t(x), t(w), None if b is None else t(b), padding=padding, groups=groups).numpy()


@needs_torch
@FAST
@given(conv_cases())
def test_conv2d_matches_torch(case):
    B, c_in, c_out, H, W, k, padding, groups, has_bias, seed = case
    x = randn(seed, B, c_in, H, W)
    w = randn(seed + 1, c_out, c_in // groups, k, k)
    b = randn(seed + 2, c_out) if has_bias else None
    # an int padding where the pair is square exercises both accepted forms
    pad = padding[0] if padding[0] == padding[1] else padding
    out = conv2d(x, w, b, padding=pad, groups=groups)
    check_f32_contiguous(out)
    assert rel_err(out, _torch_conv(x, w, b, padding, groups)) <= CONV_TOL


@needs_torch
@pytest.mark.parametrize(
    "c_in, c_out, k, groups",
    [(5, 7, 3, 1), (6, 4, 3, 2), (6, 6, 3, 6), (6, 6, 5, 6), (4, 4, 1, 1), (3, 6, 3, 3)],
)
def test_conv2d_blocked_paths_match_torch(monkeypatch, c_in, c_out, k, groups):
    """Tiny cache blocks force many im2col row blocks (with a short last one) and many depthwise
    channel blocks, which the realistic block sizes only reach on big maps."""
    from eamamba_ref.kernels.cpu import gemm
    from eamamba_ref.runtime.backends import table
    monkeypatch.setattr(gemm, "GEMM_BLOCK_PIXELS", 30)  # 3 rows of W=10 per block -> 4 blocks for 11 rows
    monkeypatch.setattr(gemm, "MIN_BLOCK_PIXELS", 1)
    monkeypatch.setattr(gemm, "DEPTHWISE_BLOCK", 2 * 2 * 11 * 10)  # 2 channels per block at B=2
    x, w, b = randn(0, 2, c_in, 11, 10), randn(1, c_out, c_in // groups, k, k), randn(2, c_out)
    out = table("numba").conv2d(x, w, b, padding=k // 2, groups=groups)
    assert rel_err(out, _torch_conv(x, w, b, k // 2, groups)) <= CONV_TOL


def test_conv2d_hand_worked():
    """A 3x3 box filter with padding 1 sums each pixel's in-image neighbours; 1x1 conv mixes channels."""
    x = np.arange(9, dtype=np.float32).reshape(1, 1, 3, 3)
    box = np.ones((1, 1, 3, 3), np.float32)
    expected = np.array([[8, 15, 12], [21, 36, 27], [20, 33, 24]], np.float32)
    np.testing.assert_array_equal(conv2d(x, box, padding=1)[0, 0], expected)
    np.testing.assert_array_equal(conv2d(x, box, padding=1, groups=1)[0, 0], expected)
    # channel mixing: out0 = x0 + 2 x1 + 1, out1 = -x1
    x2 = np.stack([x[0, 0], 10 * x[0, 0]])[None]
    w = np.array([[1, 2], [0, -1]], np.float32)[:, :, None, None]
    out = conv2d(x2, w, np.array([1, 0], np.float32))
    np.testing.assert_array_equal(out[0, 0], 21 * x[0, 0] + 1)
    np.testing.assert_array_equal(out[0, 1], -10 * x[0, 0])


def test_conv2d_accepts_float64_and_strided_input():
    x = randn(3, 1, 4, 6, 5).astype(np.float64).transpose(0, 1, 3, 2)  # (1, 4, 5, 6), not contiguous
    w = randn(4, 3, 4, 3, 3)
    out = conv2d(x, w, padding=1)
    check_f32_contiguous(out)
    expected = conv2d(np.ascontiguousarray(x, np.float32), w, padding=1)
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize(
    "x_shape, w_shape, kwargs, match",
    [
        ((1, 4, 5, 5), (2, 3, 3, 3), {}, "input channels per group"),
        ((1, 4, 5, 5), (4, 4, 3, 3), {"groups": 2}, "input channels per group"),
        ((1, 4, 5, 5), (3, 2, 3, 3), {"groups": 2}, "must divide"),
        ((1, 6, 5, 5), (4, 2, 3, 3), {"groups": 4}, "must divide"),
        ((4, 5, 5), (2, 4, 3, 3), {}, "rank 4"),
        ((1, 4, 5, 5), (2, 4, 3), {}, "rank 4"),
        ((1, 4, 2, 2), (2, 4, 3, 3), {}, "larger than the padded input"),
        ((1, 4, 5, 5), (2, 4, 3, 3), {"groups": 0}, "positive integer"),
        ((1, 4, 5, 5), (2, 4, 3, 3), {"padding": -1}, "non-negative"),
        ((1, 4, 5, 5), (2, 4, 3, 3), {"padding": (1, 1, 1)}, "non-negative"),
        ((1, 4, 5, 5), (2, 4, 3, 3), {"bias": np.zeros(3)}, r"conv bias must have shape \(2,\)"),
    ],
)
def test_conv2d_rejects_bad_input(x_shape, w_shape, kwargs, match):
    with pytest.raises(ValueError, match=match):
        conv2d(np.zeros(x_shape, np.float32), np.zeros(w_shape, np.float32), **kwargs)


# ---------------------------------------------------------------------------------------------
# linear


@needs_torch
@FAST
@given(
    lead=st.lists(st.integers(1, 4), min_size=0, max_size=3),
    n_in=st.integers(1, 12),
    n_out=st.integers(1, 12),
    has_bias=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_linear_matches_torch(lead, n_in, n_out, has_bias, seed):
    x, w = randn(seed, *lead, n_in), randn(seed + 1, n_out, n_in)
    b = randn(seed + 2, n_out) if has_bias else None
    out = linear(x, w, b)
    check_f32_contiguous(out)
    ref = F.linear(t(x), t(w), None if b is None else t(b)).numpy()
    assert rel_err(out, ref) <= CONV_TOL


def test_linear_rejects_bad_input():
    with pytest.raises(ValueError, match="expects 3 input features, x has 4"):
        linear(np.zeros((2, 4)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="rank 2"):
        linear(np.zeros((2, 3)), np.zeros(3))
    with pytest.raises(ValueError, match=r"linear bias must have shape \(5,\)"):
        linear(np.zeros((2, 3)), np.zeros((5, 3)), np.zeros(4))


# ---------------------------------------------------------------------------------------------
# pixel (un)shuffle


@FAST
@given(
    B=st.integers(1, 2), C=st.integers(1, 4), h=st.integers(1, 5), w=st.integers(1, 5), r=st.integers(1, 3),
    seed=st.integers(0, 2**31 - 1),
)
def test_pixel_shuffle_and_unshuffle_are_inverse(B, C, h, w, r, seed):
    small = randn(seed, B, C * r * r, h, w)
    big = pixel_shuffle(small, r)
    assert big.shape == (B, C, h * r, w * r)
    check_f32_contiguous(big)
    np.testing.assert_array_equal(pixel_unshuffle(big, r), small)
    large = randn(seed + 1, B, C, h * r, w * r)
    np.testing.assert_array_equal(pixel_shuffle(pixel_unshuffle(large, r), r), large)


def test_pixel_shuffle_layout_hand_worked():
    # r = 2: channel i*2 + j of a 1x1 map lands at (i, j) of the 2x2 output
    x = np.arange(4, dtype=np.float32).reshape(1, 4, 1, 1)
    np.testing.assert_array_equal(pixel_shuffle(x, 2)[0, 0], [[0, 1], [2, 3]])


@needs_torch
@FAST
@given(
    B=st.integers(1, 2), C=st.integers(1, 4), h=st.integers(1, 5), w=st.integers(1, 5), r=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
)
def test_pixel_shuffle_and_unshuffle_match_torch(B, C, h, w, r, seed):
    small, large = randn(seed, B, C * r * r, h, w), randn(seed + 1, B, C, h * r, w * r)
    np.testing.assert_array_equal(pixel_shuffle(small, r), F.pixel_shuffle(t(small), r).numpy())
    np.testing.assert_array_equal(pixel_unshuffle(large, r), F.pixel_unshuffle(t(large), r).numpy())


def test_pixel_shuffle_rejects_bad_input():
    with pytest.raises(ValueError, match="divisible by r\\*r = 4"):
        pixel_shuffle(np.zeros((1, 6, 2, 2)), 2)
    with pytest.raises(ValueError, match="divisible by r = 2"):
        pixel_unshuffle(np.zeros((1, 1, 4, 3)), 2)
    with pytest.raises(ValueError, match="positive integer"):
        pixel_shuffle(np.zeros((1, 4, 2, 2)), 0)
    with pytest.raises(ValueError, match="rank 4"):
        pixel_unshuffle(np.zeros((4, 2, 2)), 2)


# ---------------------------------------------------------------------------------------------
# layer norms, against the official formulas in float64


def official_layer_norm_f64(x, weight, bias, axis):
    """WithBias (bias given) / BiasFree (bias None) LayerNorm of the official code, in float64."""
    x = np.moveaxis(np.asarray(x, np.float64), axis, -1)
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)  # unbiased=False
    if bias is None:
        y = x / np.sqrt(var + 1e-5) * weight
    else:
        y = (x - mu) / np.sqrt(var + 1e-5) * weight + bias
    return np.moveaxis(y, -1, axis)


@FAST
@given(
    shape=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    data=st.data(),
    has_bias=st.booleans(),
    offset=st.sampled_from([0.0, 5.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_layer_norm_matches_official_formula(shape, data, has_bias, offset, seed):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    n = shape[axis]
    x = randn(seed, *shape) + np.float32(offset)  # an offset makes centring matter
    w, b = randn(seed + 1, n), (randn(seed + 2, n) if has_bias else None)
    out = layer_norm(x, w, b, axis=axis)
    check_f32_contiguous(out)
    assert rel_err(out, official_layer_norm_f64(x, w, b, axis)) <= NORM_TOL


@FAST
@given(
    B=st.integers(1, 2), C=st.integers(1, 8), H=st.integers(1, 6), W=st.integers(1, 6),
    has_bias=st.booleans(), seed=st.integers(0, 2**31 - 1),
)
def test_layer_norm_channels_matches_official_to3d_norm_to4d(B, C, H, W, has_bias, seed):
    x = randn(seed, B, C, H, W) + np.float32(2.0)
    w, b = randn(seed + 1, C), (randn(seed + 2, C) if has_bias else None)
    # the official route: (B, C, H, W) -> (B, H*W, C) -> norm over the last axis -> back
    tokens = x.reshape(B, C, H * W).transpose(0, 2, 1)
    ref = official_layer_norm_f64(tokens, w, b, axis=-1).transpose(0, 2, 1).reshape(B, C, H, W)
    out = layer_norm_channels(x, w, b)
    check_f32_contiguous(out)
    assert rel_err(out, ref) <= NORM_TOL


def test_bias_free_layer_norm_does_not_centre():
    """BiasFree keeps the mean: x = [1, 3] has var 1, so the output is x / sqrt(1 + eps)."""
    out = layer_norm(np.array([1.0, 3.0]), np.ones(2), None)
    np.testing.assert_allclose(out, np.array([1.0, 3.0]) / np.sqrt(1 + 1e-5), rtol=1e-6)
    out = layer_norm(np.array([1.0, 3.0]), np.ones(2), np.zeros(2))
    np.testing.assert_allclose(out, np.array([-1.0, 1.0]) / np.sqrt(1 + 1e-5), rtol=1e-6)


@needs_torch
def test_layer_norm_with_bias_matches_torch():
    x, w, b = randn(0, 2, 5, 16), randn(1, 16), randn(2, 16)
    ref = F.layer_norm(t(x), (16,), t(w), t(b), eps=1e-5).numpy()
    assert rel_err(layer_norm(x, w, b), ref) <= NORM_TOL


def test_layer_norm_rejects_bad_input():
    with pytest.raises(ValueError, match=r"layer_norm weight must have shape \(4,\)"):
        layer_norm(np.zeros((2, 4)), np.ones(3))
    with pytest.raises(ValueError, match=r"layer_norm bias must have shape \(4,\)"):
        layer_norm(np.zeros((2, 4)), np.ones(4), np.ones(2))
    with pytest.raises(ValueError, match="out of range"):
        layer_norm(np.zeros((2, 4)), np.ones(4), axis=2)
    with pytest.raises(ValueError, match="rank 4"):
        layer_norm_channels(np.zeros((2, 4, 3)), np.ones(2), np.zeros(2))
    with pytest.raises(ValueError, match=r"\(4,\)"):
        layer_norm_channels(np.zeros((1, 4, 3, 3)), np.ones(3), np.zeros(3))


# ---------------------------------------------------------------------------------------------
# activations and pooling


def activation_inputs():
    """Random values plus the awkward ones: large magnitudes, zero, both sides of threshold 20."""
    special = np.array([0.0, -0.0, 1e-8, -1e-8, 19.9, 20.0, 20.1, -20.0, 50.0, -50.0, 88.0, -88.0, 100.0, -100.0])
    return np.concatenate([randn(0, 500, scale=4.0), special.astype(np.float32)])


@needs_torch
@pytest.mark.parametrize(
    "ours, theirs",
    [
        (silu, lambda x: F.silu(x)),
        (sigmoid, lambda x: torch.sigmoid(x)),
        (relu, lambda x: F.relu(x)),
        (leaky_relu, lambda x: F.leaky_relu(x)),  # default slope 0.01 on both sides
        (lambda x: leaky_relu(x, 0.2), lambda x: F.leaky_relu(x, 0.2)),
        (softplus, lambda x: F.softplus(x)),  # beta 1, threshold 20
        (lambda x: softplus(x, beta=2.0, threshold=10.0), lambda x: F.softplus(x, beta=2.0, threshold=10.0)),
    ],
    ids=["silu", "sigmoid", "relu", "leaky_relu", "leaky_relu_0.2", "softplus", "softplus_beta2"],
)
def test_activations_match_torch(ours, theirs):
    x = activation_inputs()
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # no overflow on extreme inputs
        out = ours(x)
    check_f32_contiguous(out)
    np.testing.assert_allclose(out, theirs(t(x)).numpy(), rtol=1e-6, atol=1e-7)


@needs_torch
def test_gelu_matches_torch_and_float64():
    """Against torch only to its own accuracy: its float32 GELU forms 1 + erf(x/sqrt 2), which
    cancels for x << 0 (absolute error up to ~1e-6, relative up to 100%). Ours must also be
    accurate *relative* to the float64 value there."""
    from scipy.special import erfc as erfc64

    x = activation_inputs()
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        out = gelu(x)
    check_f32_contiguous(out)
    np.testing.assert_allclose(out, F.gelu(t(x)).numpy(), rtol=1e-6, atol=2e-6)
    x64 = x.astype(np.float64)
    exact = 0.5 * x64 * erfc64(-x64 / np.sqrt(2.0))
    np.testing.assert_allclose(out, exact, rtol=2e-5, atol=1e-37)


def test_activations_keep_shape_and_hand_values():
    x = randn(1, 2, 3, 4, 5)
    for f in (gelu, silu, sigmoid, relu, leaky_relu, softplus):
        assert f(x).shape == x.shape
    np.testing.assert_allclose(gelu(np.array([1.0])), [0.8413447460685429], rtol=1e-6)  # Phi(1)
    np.testing.assert_allclose(softplus(np.array([0.0, 30.0])), [np.log(2.0), 30.0], rtol=1e-6)
    np.testing.assert_array_equal(leaky_relu(np.array([-2.0, 3.0])), np.array([-0.02, 3.0], np.float32))


@needs_torch
@FAST
@given(B=st.integers(1, 2), C=st.integers(1, 8), H=st.integers(1, 12), W=st.integers(1, 12), seed=st.integers(0, 99))
def test_adaptive_avg_pool_matches_torch(B, C, H, W, seed):
    x = randn(seed, B, C, H, W) + np.float32(1.0)
    out = adaptive_avg_pool_1(x)
    assert out.shape == (B, C, 1, 1)
    assert rel_err(out, F.adaptive_avg_pool2d(t(x), 1).numpy()) <= 1e-6


def test_adaptive_avg_pool_rejects_wrong_rank():
    with pytest.raises(ValueError, match="rank 4"):
        adaptive_avg_pool_1(np.zeros((2, 3, 4)))


# ---------------------------------------------------------------------------------------------
# bicubic upsampling


def _torch_bicubic(x, scale):
    return F.interpolate(t(x), scale_factor=scale, mode="bicubic", align_corners=False).numpy()


@needs_torch
@FAST
@given(
    B=st.integers(1, 2), C=st.integers(1, 3), H=st.integers(1, 12), W=st.integers(1, 12),
    scale=st.sampled_from([2, 3, 4]), seed=st.integers(0, 2**31 - 1),
)
def test_bicubic_matches_torch(B, C, H, W, scale, seed):
    x = randn(seed, B, C, H, W)
    out = bicubic_upsample(x, scale)
    assert out.shape == (B, C, H * scale, W * scale)
    check_f32_contiguous(out)
    assert rel_err(out, _torch_bicubic(x, scale)) <= BICUBIC_TOL


@needs_torch
@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize("hw", [(1, 1), (1, 7), (7, 1), (2, 2), (1, 2)])
def test_bicubic_degenerate_maps_match_torch(hw, scale):
    x = randn(7, 2, 3, *hw)
    assert rel_err(bicubic_upsample(x, scale), _torch_bicubic(x, scale)) <= BICUBIC_TOL


@needs_torch
@pytest.mark.parametrize("scale", [1, 1.5, 2.5, 0.5])
def test_bicubic_non_integer_scales_match_torch(scale):
    # floor(H * scale) output size and the 1/scale step (not H_in/H_out) must both agree
    x = randn(8, 1, 2, 7, 9)
    assert rel_err(bicubic_upsample(x, scale), _torch_bicubic(x, scale)) <= BICUBIC_TOL


def test_bicubic_preserves_constants_and_samples():
    """Independent of torch: the cubic weights sum to 1, so constants stay constant; at an odd
    scale every middle output pixel of a block sits exactly on an input pixel."""
    const = np.full((1, 2, 3, 4), 2.5, np.float32)
    np.testing.assert_allclose(bicubic_upsample(const, 4), 2.5, rtol=1e-6)
    x = randn(9, 1, 1, 5, 6)
    out = bicubic_upsample(x, 3)
    np.testing.assert_allclose(out[:, :, 1::3, 1::3], x, rtol=1e-6, atol=1e-6)


def test_bicubic_taps_hand_worked():
    """Scale 2, first output pixel: src = 0.5/2 - 0.5 = -0.25, floor -1, t = 0.75, taps -2..1 clamped."""
    idx, w = layers._cubic_taps(4, 8, 2)
    np.testing.assert_array_equal(idx[0], [0, 0, 0, 1])
    a = -0.75
    expected = [
        ((a * 1.75 - 5 * a) * 1.75 + 8 * a) * 1.75 - 4 * a,
        ((a + 2) * 0.75 - (a + 3)) * 0.75**2 + 1,
        ((a + 2) * 0.25 - (a + 3)) * 0.25**2 + 1,
        ((a * 1.25 - 5 * a) * 1.25 + 8 * a) * 1.25 - 4 * a,
    ]
    np.testing.assert_allclose(w[0], expected, rtol=1e-6)
    assert abs(w.sum(axis=1) - 1).max() < 1e-6


@pytest.mark.parametrize(
    "shape, scale, match",
    [((3, 4, 4), 2, "rank 4"), ((1, 1, 4, 4), 0, "positive number"), ((1, 1, 4, 4), "x", "positive number"),
     ((1, 1, 4, 4), 0.1, "no output pixels")],
)
def test_bicubic_rejects_bad_input(shape, scale, match):
    with pytest.raises(ValueError, match=match):
        bicubic_upsample(np.zeros(shape, np.float32), scale)
