"""The hardware flush-to-zero switch of the scan kernels (`kernels.cpu.fpenv`): on while a task
runs, off again afterwards on every thread, and the scan's decayed states are never denormal."""
import numpy as np
import pytest
from numba import njit, prange

from eamamba_ref.kernels.cpu import fused, scan
from eamamba_ref.kernels.cpu.fpenv import HARDWARE_FTZ, flush_denormals, restore_fpenv
from eamamba_ref.reference import scans
from eamamba_ref.reference.ssm import selective_scan as reference_scan

TINY_NORMAL = np.finfo(np.float32).tiny          # 2**-126
DENORMAL = np.float32(1e-40)


@njit
def _product_inside_and_after(v, out):
    # v = [denormal, 1, 1]: two products of different operands (LLVM would merge equal ones,
    # since it does not know that MXCSR changed in between)
    saved = flush_denormals()
    out[0] = v[0] * v[1]
    restore_fpenv(saved)
    out[1] = v[0] * v[2]


@njit(parallel=True)
def _products_on_every_thread(x, one, out):
    for i in prange(out.size):
        out[i] = x * one


def _denormals_survive_everywhere():
    out = np.zeros(64, np.float32)
    _products_on_every_thread(DENORMAL, np.float32(1.0), out)
    return DENORMAL * np.float32(1.0) != 0 and bool(np.all(out != 0))


def test_the_switch_flushes_inside_and_is_put_back():
    out = np.full(2, -1, np.float32)
    _product_inside_and_after(np.array([DENORMAL, 1, 1], np.float32), out)
    inside, after = out
    assert after == DENORMAL
    assert inside == (0 if HARDWARE_FTZ else DENORMAL)


def _decaying_inputs(rng, batch=1, channels=8, n=16, length=700):
    """u is zero after step 50 and A is strongly negative: every state decays through the
    denormal range to 0 within the sequence."""
    u = rng.standard_normal((batch, channels, length)).astype(np.float32)
    u[..., 50:] = 0
    delta = np.full((batch, channels, length), 0.5, np.float32)
    A = -np.linspace(1.0, 4.0, channels * n, dtype=np.float32).reshape(channels, n)
    B = rng.standard_normal((batch, n, length)).astype(np.float32)
    C = rng.standard_normal((batch, n, length)).astype(np.float32)
    return u, delta, A, B, C


def test_selective_scan_kernel_keeps_no_denormals_and_leaves_threads_as_they_were():
    u, delta, A, B, C = _decaying_inputs(np.random.default_rng(0))
    y, last = scan.selective_scan_numba(u, delta, A, B[:, None], C[:, None])
    ref = reference_scan(u.astype(np.float64), delta.astype(np.float64), A.astype(np.float64),
                         B[:, None].astype(np.float64), C[:, None].astype(np.float64))
    assert np.max(np.abs(y - ref)) <= 1e-5 * np.max(np.abs(ref))
    assert np.all((last == 0) | (np.abs(last) >= TINY_NORMAL))
    assert np.all((y == 0) | (np.abs(y) >= TINY_NORMAL))
    assert _denormals_survive_everywhere()


def test_fused_directional_scan_leaves_threads_as_they_were():
    rng = np.random.default_rng(1)
    H = W = 16
    K, Cp, R, N = 4, 4, 2, 16
    L = H * W
    u = rng.standard_normal((1, L, K * Cp)).astype(np.float32)
    xdbl = rng.standard_normal((1, K, L, R + 2 * N)).astype(np.float32)
    table = scans.direction_indices("diagonal", K, (H, W))
    w_dt = rng.standard_normal((K, Cp, R)).astype(np.float32)
    y = fused.directional_scan(u, xdbl, table, w_dt, np.zeros(K * Cp, np.float32),
                               -np.ones((K * Cp, N), np.float32), np.ones(K * Cp, np.float32))
    assert np.all(np.isfinite(y))
    assert _denormals_survive_everywhere()


@pytest.mark.skipif(not HARDWARE_FTZ, reason="the switch exists on x86 only; elsewhere the loop flushes")
def test_x86_kernels_rely_on_the_switch():
    # With the switch the loop's own flush is compiled out: states below 2**-63 are kept (and
    # flushed by the hardware only below 2**-126).
    assert HARDWARE_FTZ
    u, delta, A, B, C = _decaying_inputs(np.random.default_rng(2), length=120)
    _, last = scan.selective_scan_numba(u, delta, A, B[:, None], C[:, None])
    small = np.abs(last)[(last != 0)]
    assert small.size and small.min() < 2.0 ** -63
