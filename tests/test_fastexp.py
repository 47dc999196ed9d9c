"""The vectorisable exp family of ssm/fastexp.py against float64 NumPy, and the prefetch intrinsics.

Tolerances are the ones the module documents (2.8e-7 for exp, 1.0e-7 for the base-2 decay, both
measured against float64 on a dense grid), rounded up to 3e-7 and 1.5e-7.
"""
import platform

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import njit
from numba.core.errors import TypingError

from eamamba_ref.kernels.cpu.fastexp import decay_exp2, fexp, silu, softplus
from eamamba_ref.kernels.cpu.prefetch import prefetch, prefetch_write

f32 = np.float32


@njit
def _apply(fn, x, out):
    for i in range(x.size):
        out[i] = fn(x[i])


def apply(fn, x):
    x = np.ascontiguousarray(x, dtype=f32)
    out = np.empty_like(x)
    _apply(fn, x, out)
    return out


def test_decay_exp2_matches_float64_with_its_clamp():
    x = np.linspace(-70.0, 130.0, 2_000_001, dtype=f32)
    ref = np.exp2(np.clip(x.astype(np.float64), -63.0, 127.0))
    rel = np.abs(apply(decay_exp2, x) / ref - 1.0)
    assert rel.max() < 1.5e-7


def test_decay_exp2_exact_at_integers():
    k = np.arange(-63, 128, dtype=f32)
    np.testing.assert_array_equal(apply(decay_exp2, k), np.exp2(k.astype(np.float64)).astype(f32))


def test_fexp_matches_float64_and_its_range_rules():
    x = np.linspace(-87.3, 88.0, 2_000_001, dtype=f32)
    rel = np.abs(apply(fexp, x) / np.exp(x.astype(np.float64)) - 1.0)
    assert rel.max() < 3e-7
    edge = apply(fexp, np.array([-88.0, -1000.0, 89.0, 1000.0, np.inf], f32))
    assert edge[0] == 0.0 and edge[1] == 0.0                      # no denormals: 0 instead
    assert np.all(edge[2:] == np.float32(np.exp(np.float64(88.0))))  # saturates, no inf


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-80.0, 80.0, width=32), min_size=1, max_size=64))
def test_softplus_and_silu_match_float64(values):
    x = np.array(values, f32)
    x64 = x.astype(np.float64)
    sp = np.logaddexp(0.0, x64)
    np.testing.assert_allclose(apply(softplus, x), sp, rtol=4e-7, atol=1e-30)
    np.testing.assert_allclose(apply(silu, x), x64 / (1.0 + np.exp(-x64)), rtol=4e-7, atol=1e-30)


@njit
def _sum_with_prefetch(a):
    total = 0.0
    for i in range(a.shape[0]):
        prefetch(a, min(i + 4, a.shape[0] - 1), 0)
        prefetch_write(a, i, a.shape[1] - 1)
        for j in range(a.shape[1]):
            total += a[i, j]
    return total


def test_prefetch_changes_no_values_and_accepts_strided_arrays():
    a = np.arange(60.0).reshape(6, 10)
    assert _sum_with_prefetch(a) == a.sum()
    assert _sum_with_prefetch(a[::2, 1:]) == a[::2, 1:].sum()
    if platform.machine().lower() in ("x86_64", "amd64"):      # the hints reach the machine code
        asm = "\n".join(_sum_with_prefetch.inspect_asm().values())
        assert "prefetcht0" in asm and asm.count("prefetch") >= 2   # (PREFETCHW where the CPU has it)


def test_prefetch_rejects_other_ranks():
    @njit
    def bad(v):
        prefetch(v, 0, 0)

    with pytest.raises(TypingError):
        bad(np.zeros(3))
