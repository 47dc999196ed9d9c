"""The 'numba' backend's parallel layers against their NumPy specification in `layers`, and against
float64 (an independent reference: the same formula evaluated exactly enough)."""
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from eamamba_ref.kernels.cpu import norms as cpu_kernels
from eamamba_ref.reference import layers


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 2), C=st.integers(1, 40), H=st.integers(1, 19), W=st.integers(1, 37),
       with_bias=st.booleans(), offset=st.floats(-3, 3), seed=st.integers(0, 2**16))
def test_layer_norm_channels_matches_numpy_and_float64(B, C, H, W, with_bias, offset, seed):
    # H*W up to 703 pixels: strips of 256 with a ragged last one; C = 1 normalises to 0 (WithBias).
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((B, C, H, W)) + offset).astype(np.float32)
    w = rng.standard_normal(C).astype(np.float32)
    b = rng.standard_normal(C).astype(np.float32) if with_bias else None
    got = cpu_kernels.layer_norm_channels(x, w, b)
    ref = layers.layer_norm_channels(x, w, b)
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=1, keepdims=True)
    rstd = 1 / np.sqrt(((x64 - mean) ** 2).mean(axis=1, keepdims=True) + 1e-5)
    exact = ((x64 - mean) * rstd * w[:, None, None] + b[:, None, None]) if with_bias \
        else x64 * rstd * w[:, None, None]
    scale = np.abs(exact).max() + 1e-6
    assert got.shape == x.shape and got.dtype == np.float32
    assert np.abs(got - exact).max() / scale < 1e-5
    assert np.abs(got - ref).max() / scale < 1e-5


def test_the_numba_table_binds_it_and_the_numpy_table_the_reference():
    from eamamba_ref.runtime.backends import table
    assert table("numba").layer_norm_channels is cpu_kernels.layer_norm_channels
    assert table("numpy").layer_norm_channels is layers.layer_norm_channels


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 2), C=st.integers(1, 6), H=st.integers(1, 13), W=st.integers(1, 9),
       pixels=st.integers(1, 120), mixer=st.sampled_from(["simple", "ffn"]), seed=st.integers(0, 2**16))
def test_ffn_in_row_strips_equals_the_whole_map(B, C, H, W, pixels, mixer, seed):
    """kernels.cpu.strips (the FFN's memory bound) gives the whole-map FFN: ragged last strips, one-row strips
    (pixels < W), no strips at all (pixels >= H*W), channel counts that change. Not bit for bit:
    BLAS sums in a different order for a different number of columns."""
    from eamamba_ref.kernels.cpu import strips
    from eamamba_ref.reference.ops import NUMPY
    rng = np.random.default_rng(seed)
    hidden = 2 * C
    p = {"project_in.weight": rng.standard_normal((hidden, C, 1, 1)).astype(np.float32),
         "project_in.bias": rng.standard_normal(hidden).astype(np.float32),
         "project_out.weight": rng.standard_normal((C + 1, hidden // (2 if mixer == "simple" else 1), 1, 1)).astype(np.float32)}
    x = rng.standard_normal((B, C, H, W)).astype(np.float32)
    whole = strips.channel_mixer(p, x, mixer, NUMPY, pixels=H * W)
    in_strips = strips.channel_mixer(p, x, mixer, NUMPY, pixels=pixels)
    # the mixer itself strips at its default size; compare with a plain per-pixel evaluation too
    flat = x.transpose(0, 2, 3, 1).reshape(-1, C)
    h = flat @ p["project_in.weight"][:, :, 0, 0].T + p["project_in.bias"]
    h = h[:, :C] * h[:, C:] if mixer == "simple" else layers.gelu(h)
    exact = (h @ p["project_out.weight"][:, :, 0, 0].T).reshape(B, H, W, C + 1).transpose(0, 3, 1, 2)
    assert in_strips.shape == (B, C + 1, H, W)
    scale = np.abs(exact).max() + 1e-6
    assert np.abs(in_strips - whole).max() / scale < 1e-5
    assert np.abs(in_strips - exact).max() / scale < 1e-5
