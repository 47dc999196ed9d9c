"""Tiling: where the tiles go, how they are blended, and what that preserves.

The blend is checked with stand-in "models" whose output per tile is known in closed form (a
constant per tile), so seams can be measured exactly; determinism and the one-tile identity with
a small random EAMamba.
"""
import math

import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st

from eamamba_ref.apps import inference
from eamamba_ref import load
from eamamba_ref.io.checkpoint import save_converted
from eamamba_ref.io.config import ModelConfig
from eamamba_ref.reference.parameters import init_params

MAMBA = dict(scan_type="diagonal", scan_count=8, scan_merge_method="concate", d_state=4, d_conv=3,
             expand=1, conv_2d=True)


@pytest.fixture(scope="module")
def unet(tmp_path_factory):
    cfg = ModelConfig.from_args("eamamba", dict(dim=16, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1,
                                                mamba_cfg=MAMBA))
    path = tmp_path_factory.mktemp("w") / "unet.npz"
    save_converted(path, cfg.name, cfg.to_args(), init_params(cfg, seed=1))
    return load(str(path))


@settings(max_examples=200, deadline=None)
@given(size=st.integers(1, 600), tile=st.integers(8, 300), data=st.data())
def test_tiles_are_few_evenly_spread_and_overlap_enough(size, tile, data):
    overlap = data.draw(st.integers(0, tile - 1))
    starts = inference._starts(size, tile, overlap)
    if tile >= size:
        assert starts == [0]
        return
    assert starts[0] == 0 and starts[-1] == size - tile            # covers both ends
    overlaps = [a + tile - b for a, b in zip(starts, starts[1:])]
    assert min(overlaps) >= overlap                                 # at least what was asked
    assert max(overlaps) - min(overlaps) <= 1                       # evenly spread
    n = len(starts)                                                 # and no more tiles than needed:
    assert n == 1 or (n - 1) * tile - (n - 2) * overlap < size      # one fewer cannot cover it


def per_tile_constant(x):
    """A stand-in model whose output is one constant per tile (its input's mean): a worst case of
    tiles disagreeing, with every disagreement at a tile's edge."""
    return np.broadcast_to(x.mean(axis=(2, 3), keepdims=True), x.shape).astype(np.float32)


@settings(max_examples=60, deadline=None)
@given(h=st.integers(9, 90), w=st.integers(9, 90), tile=st.integers(8, 40), data=st.data())
def test_blend_has_no_seams(h, w, tile, data):
    """Across an overlap of n pixels two tiles' outputs a and b are mixed with weights rising as
    sin^2: no step between neighbouring pixels exceeds |a - b| * pi / (2n) (a hard seam: |a - b|),
    and the output stays between the tiles' values."""
    overlap = data.draw(st.integers(1, tile - 1))
    ys, xs = inference._starts(h, tile, overlap), inference._starts(w, tile, overlap)
    # the bound is for pixels covered by at most two tiles along each axis
    assume(all(c >= a + tile for starts in (ys, xs) for a, c in zip(starts, starts[2:])))
    x = np.random.default_rng(0).random((1, 1, h, w), dtype=np.float32)
    values = [inference.padded(per_tile_constant, x[:, :, a:a + tile, b:b + tile])[0, 0, 0, 0] for a in ys for b in xs]
    spread = max(values) - min(values)
    y = inference.tiled(per_tile_constant, x, tile, overlap)[0, 0].astype(np.float64)
    assert y.min() >= min(values) - 1e-6 and y.max() <= max(values) + 1e-6
    n_min = min([a + tile - b for starts in (ys, xs) for a, b in zip(starts, starts[1:])], default=1)
    step = max(np.abs(np.diff(y, axis=0)).max(initial=0), np.abs(np.diff(y, axis=1)).max(initial=0))
    assert step <= spread * math.pi / (2 * n_min) * (1 + 1e-5) + 1e-6


def test_overlapping_weights_sum_to_one():
    """Two neighbours' ramps over their shared pixels are complementary (sin^2 + cos^2)."""
    for n in (1, 2, 7, 32):
        rising = inference._ramp(40, n, 0)[:n]
        falling = inference._ramp(40, 0, n)[40 - n:]
        np.testing.assert_allclose(rising + falling, 1.0, rtol=1e-6)
        assert (rising > 0).all() and (np.diff(rising) > 0).all()


def test_tiled_is_deterministic_and_one_tile_is_the_untiled_result(unet):
    x = np.random.default_rng(3).random((1, 3, 40, 56), dtype=np.float32)
    first = inference.tiled(unet, x, tile=24, overlap=8)
    assert np.array_equal(first, inference.tiled(unet, x, tile=24, overlap=8))
    assert np.array_equal(inference.tiled(unet, x, tile=56, overlap=8), inference.padded(unet, x))
