"""Numba CPU kernels for the selective scan and its gradient (the engine of the autograd Function).

Recurrence (per batch item b and channel d, state index n; see ``torch_ref.selective_scan``):

    dt_t  = softplus(delta_t + bias)           (or delta_t + bias without softplus)
    h_t   = exp(dt_t A) * h_{t-1} + dt_t B_t u_t                      h_{-1} = 0
    y_t   = sum_n C_t h_t + D u_t,     out_t = y_t * silu(z_t)       (gate only if z is given)

Backward (reverse time), with gy_t = dL/dy_t and g_t = dL/dh_t (carried backwards):

    g_t       = exp(dt_{t+1} A) g_{t+1} + gy_t C_t            (g after the last step = dL/dh_last)
    dL/dC_t  += gy_t h_t            dL/dB_t += g_t dt_t u_t
    e_t       = g_t * h_{t-1} * exp(dt_t A)      (dL/d(dt_t A), per state)
    dL/dA    += e_t dt_t            dL/ddt_t = sum_n e_t A + sum_n g_t B_t u_t
    dL/du_t   = dt_t sum_n g_t B_t + D gy_t      dL/dD += gy_t u_t
    dL/ddelta_t = dL/ddt_t * sigmoid(delta_t + bias)   (1 above the softplus threshold 20)

Work split: a *task* is up to TASK_CHANNELS channels of one batch item that share one group of B
and one group of C; ``prange`` runs the tasks on all cores and every task owns its state (no
shared writes). Gradients of B and C are summed over the channels of a task straight into that
task's slot of a partial result ``(b, g, slots, n, l)``; the caller sums the slots (no races, and
no (b, d, n, l) tensor).

Layout: a task works on one channel and one chunk of time at a time, with buffers ``[state,
time]`` like B and C themselves (no transposes). Everything that is not a recurrence (the exps,
the readout sum_n C h, all gradient products and reductions) is then a loop over contiguous time
steps, which LLVM vectorises; only the two recurrences (states forwards, their gradients
backwards) step through time, several states at once (see ``_states``).

Memory: the forward pass saves the state at the start of every chunk of ``chunk`` steps,
``(b, d, ceil(l / chunk), n)``. The backward pass walks the chunks from last to first and, per
channel, recomputes that chunk's states and decay factors from the saved state into two small
buffers before the reverse sweep: one extra exp per state update, nothing of size (b, d, n, l).

Denormals: decayed states and gradients underflow; on x86 every denormal operand or result costs
~100 cycles. Each task sets the FTZ and DAZ bits of its thread's MXCSR (flush denormals to zero)
and restores the previous value when it ends (``kernels.cpu.fpenv``, which the forward model's
scans use too), so other code on Numba's worker threads is not affected. The change to results is below 1e-38 absolute.

Dtypes: every array of one call has the same dtype. float32 uses the vectorisable exp of
``ssm.fastexp`` (~3e-7 relative); float64 uses libm (for ``gradcheck``).
"""

import math

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from eamamba_ref.kernels.cpu.fastexp import FASTMATH_REASSOC, fexp
from eamamba_ref.kernels.cpu.fastexp import silu as silu32
from eamamba_ref.kernels.cpu.fastexp import softplus as softplus32
from eamamba_ref.kernels.cpu.fpenv import flush_denormals, restore_fpenv

__all__ = ["TASK_CHANNELS", "DEFAULT_CHUNK", "task_layout", "slots_per_group", "scan_forward",
           "scan_backward"]

TASK_CHANNELS = 8  # channels per task: few dL/dB, dL/dC slots to sum, enough tasks to balance
DEFAULT_CHUNK = 64  # steps between saved states: memory (b, d, l/64, n), buffers stay in L1
SOFTPLUS_THRESHOLD = 20.0  # above it softplus(x) = x (as the CUDA kernel and torch)

# --------------------------------------------------- scalar functions, one version per dtype
# The plain-Python bodies state the maths; inside Numba code the overloads below are used
# instead: the vectorisable float32 versions of ssm.fastexp, or libm for float64.

def _exp(x):
    return math.exp(x)


def _softplus(x):
    return x if x > SOFTPLUS_THRESHOLD else math.log1p(math.exp(x))


def _silu(x):
    return x / (1.0 + math.exp(-x))


@overload(_exp)
def _exp_impl(x):
    if x == types.float32:
        return lambda x: fexp(x)
    return lambda x: math.exp(x)


@overload(_softplus)
def _softplus_impl(x):
    if x == types.float32:
        return lambda x: softplus32(x)
    return lambda x: x if x > SOFTPLUS_THRESHOLD else math.log1p(math.exp(x))


@overload(_silu)
def _silu_impl(x):
    if x == types.float32:
        return lambda x: silu32(x)
    return lambda x: x / (1.0 + math.exp(-x))


# ------------------------------------------------------------------------------ work split

def task_layout(n_channels, groups_b, groups_c, task_channels=TASK_CHANNELS):
    """``(run, tasks_per_run)``: channels in a run share both B and C groups; tasks per run."""
    run = math.gcd(n_channels // groups_b, n_channels // groups_c)
    return run, -(-run // task_channels)


def slots_per_group(n_channels, groups, run, tasks_per_run):
    """Tasks that share one group of B (or C): the slot count of its partial gradient."""
    return (n_channels // groups // run) * tasks_per_run


@njit(cache=True)
def _task_channels(task, runs, run, tasks_per_run, task_channels):
    """``(b, d0, n_ch, s)``: batch item, first channel, channel count and index within its run."""
    b = task // (runs * tasks_per_run)
    r = (task // tasks_per_run) % runs
    s = task % tasks_per_run
    d0 = r * run + s * task_channels
    return b, d0, min(task_channels, (r + 1) * run - d0), s


@njit(cache=True)
def _slot(d0, s, per_group, run, tasks_per_run):
    """Index of a task among the tasks sharing its group (runs of a group, then tasks of a run)."""
    return ((d0 % per_group) // run) * tasks_per_run + s


# ------------------------------------------------------------------ per-channel chunk helpers
# Buffers are time-inner, ``[state, time]``, like B and C themselves: loops over time are then
# contiguous and LLVM vectorises them (exp included). Only the two recurrences step through time.

@njit(fastmath=FASTMATH_REASSOC, error_model="numpy", cache=True)
def _step_sizes(delta_row, u_row, bias_d, softplus_delta, dt, du):
    """dt = softplus(delta + bias) (or delta + bias), du = dt * u, over one channel's chunk."""
    for t in range(delta_row.shape[0]):
        x = delta_row[t] + bias_d
        dt[t] = _softplus(x) if softplus_delta else x
        du[t] = dt[t] * u_row[t]


@njit(fastmath=FASTMATH_REASSOC, error_model="numpy", cache=True)
def _decays(dt, a_row, steps, decay):
    """decay[k, t] = exp(dt_t A_k)."""
    for k in range(a_row.shape[0]):
        a_k = a_row[k]
        for t in range(steps):
            decay[k, t] = _exp(dt[t] * a_k)


@njit(fastmath=FASTMATH_REASSOC, error_model="numpy", cache=True)
def _states(decay, du, B_group, steps, t0, hs):
    """hs[k, t + 1] = decay[k, t] hs[k, t] + du_t B[k, t0 + t], from hs[:, 0].

    Four chains (states) at a time with their values in local variables: every step of a chain
    waits for its previous multiply-add, so independent chains are interleaved to fill the
    pipeline, and registers avoid a store-to-load round trip per step.
    """
    n_state = decay.shape[0]
    k = 0
    while k + 4 <= n_state:
        h0, h1, h2, h3 = hs[k, 0], hs[k + 1, 0], hs[k + 2, 0], hs[k + 3, 0]
        for t in range(steps):
            du_t = du[t]
            h0 = decay[k, t] * h0 + du_t * B_group[k, t0 + t]
            h1 = decay[k + 1, t] * h1 + du_t * B_group[k + 1, t0 + t]
            h2 = decay[k + 2, t] * h2 + du_t * B_group[k + 2, t0 + t]
            h3 = decay[k + 3, t] * h3 + du_t * B_group[k + 3, t0 + t]
            hs[k, t + 1] = h0
            hs[k + 1, t + 1] = h1
            hs[k + 2, t + 1] = h2
            hs[k + 3, t + 1] = h3
        k += 4
    for k in range(k, n_state):
        h = hs[k, 0]
        for t in range(steps):
            h = decay[k, t] * h + du[t] * B_group[k, t0 + t]
            hs[k, t + 1] = h


@njit(fastmath=FASTMATH_REASSOC, error_model="numpy", cache=True)
def _state_grads(decay, gy, C_group, g_carry, steps, t0, g_h):
    """g_h[k, t] = dL/dh_t = gy_t C[k, t0 + t] + decay[k, t + 1] g_h[k, t + 1], backwards in time.

    ``g_carry[k]`` is what the following chunk passes back (dL/dh of its first step times its
    decay); on return it holds ``decay[k, 0] g_h[k, 0]`` for the previous chunk. Four chains at
    a time, as in :func:`_states`.
    """
    n_state = decay.shape[0]
    last = steps - 1
    k = 0
    while k + 4 <= n_state:
        g0 = g_carry[k] + gy[last] * C_group[k, t0 + last]
        g1 = g_carry[k + 1] + gy[last] * C_group[k + 1, t0 + last]
        g2 = g_carry[k + 2] + gy[last] * C_group[k + 2, t0 + last]
        g3 = g_carry[k + 3] + gy[last] * C_group[k + 3, t0 + last]
        g_h[k, last], g_h[k + 1, last], g_h[k + 2, last], g_h[k + 3, last] = g0, g1, g2, g3
        for t in range(last - 1, -1, -1):
            gy_t = gy[t]
            g0 = decay[k, t + 1] * g0 + gy_t * C_group[k, t0 + t]
            g1 = decay[k + 1, t + 1] * g1 + gy_t * C_group[k + 1, t0 + t]
            g2 = decay[k + 2, t + 1] * g2 + gy_t * C_group[k + 2, t0 + t]
            g3 = decay[k + 3, t + 1] * g3 + gy_t * C_group[k + 3, t0 + t]
            g_h[k, t] = g0
            g_h[k + 1, t] = g1
            g_h[k + 2, t] = g2
            g_h[k + 3, t] = g3
        k += 4
    for k in range(k, n_state):
        g = g_carry[k] + gy[last] * C_group[k, t0 + last]
        g_h[k, last] = g
        for t in range(last - 1, -1, -1):
            g = decay[k, t + 1] * g + gy[t] * C_group[k, t0 + t]
            g_h[k, t] = g
    for k in range(n_state):
        g_carry[k] = decay[k, 0] * g_h[k, 0]


# ---------------------------------------------------------------------------------- forward

@njit(fastmath=FASTMATH_REASSOC, error_model="numpy", cache=True)
def _forward_task(b, d0, n_ch, gb, gc, u, delta, A, Bm, Cm, Dv, z, bias, softplus_delta, has_z,
                  chunk, out, y_gate_in, h_saved, h_last):
    """Forward scan of channels ``d0 .. d0 + n_ch - 1`` of batch item b (B group gb, C group gc)."""
    length = u.shape[2]
    n_state = A.shape[1]
    n_chunks = h_saved.shape[2]
    dtype = u.dtype
    B_group = Bm[b, gb]                                # (n, l)
    C_group = Cm[b, gc]
    h = np.zeros((n_ch, n_state), dtype)               # each channel's state between chunks
    hs = np.empty((n_state, chunk + 1), dtype)         # hs[:, t + 1] = h_t; hs[:, 0] before chunk
    decay = np.empty((n_state, chunk), dtype)
    dt = np.empty(chunk, dtype)
    du = np.empty(chunk, dtype)
    y = np.empty(chunk, dtype)

    for c in range(n_chunks):
        t0 = c * chunk
        steps = min(chunk, length - t0)
        for j in range(n_ch):
            d = d0 + j
            _step_sizes(delta[b, d, t0:t0 + steps], u[b, d, t0:t0 + steps], bias[d],
                        softplus_delta, dt, du)
            for k in range(n_state):
                h_saved[b, d, c, k] = h[j, k]
                hs[k, 0] = h[j, k]
            _decays(dt, A[d], steps, decay)
            _states(decay, du, B_group, steps, t0, hs)
            for k in range(n_state):
                h[j, k] = hs[k, steps]

            # y_t = D u_t + sum_n C_t h_t
            dv = Dv[d]
            for t in range(steps):
                y[t] = dv * u[b, d, t0 + t]
            for k in range(n_state):
                for t in range(steps):
                    y[t] += C_group[k, t0 + t] * hs[k, t + 1]
            if has_z:
                for t in range(steps):
                    y_gate_in[b, d, t0 + t] = y[t]
                    out[b, d, t0 + t] = y[t] * _silu(z[b, d, t0 + t])
            else:
                for t in range(steps):
                    out[b, d, t0 + t] = y[t]

    for j in range(n_ch):
        for k in range(n_state):
            h_last[b, d0 + j, k] = h[j, k]


@njit(parallel=True, fastmath=FASTMATH_REASSOC, error_model="numpy", cache=True)
def scan_forward(u, delta, A, Bm, Cm, Dv, z, bias, softplus_delta, has_z, chunk,
                 run, tasks_per_run, task_channels, out, y_gate_in, h_saved, h_last):
    """Fill ``out``, ``y_gate_in``, ``h_saved`` and ``h_last``; tasks run in parallel.

    u, delta, z: ``(b, d, l)`` (z is ``(1, 1, 1)`` when has_z is False); A ``(d, n)``;
    Bm ``(b, gB, n, l)``, Cm ``(b, gC, n, l)``; Dv, bias ``(d,)`` (zeros mean "not given").
    out ``(b, d, l)``; y_gate_in ``(b, d, l)`` the output before the z gate (``(1, 1, 1)`` and
    untouched without z); h_saved ``(b, d, ceil(l / chunk), n)`` the state *before* each chunk;
    h_last ``(b, d, n)``.
    """
    n_channels = u.shape[1]
    runs = n_channels // run
    for task in prange(u.shape[0] * runs * tasks_per_run):
        mxcsr = flush_denormals()
        b, d0, n_ch, _ = _task_channels(task, runs, run, tasks_per_run, task_channels)
        _forward_task(b, d0, n_ch, d0 // (n_channels // Bm.shape[1]),
                      d0 // (n_channels // Cm.shape[1]), u, delta, A, Bm, Cm, Dv, z, bias,
                      softplus_delta, has_z, chunk, out, y_gate_in, h_saved, h_last)
        restore_fpenv(mxcsr)


# --------------------------------------------------------------------------------- backward

@njit(fastmath=FASTMATH_REASSOC, error_model="numpy", cache=True)
def _backward_task(b, d0, n_ch, gb, gc, slot_b, slot_c, u, delta, A, Bm, Cm, Dv, z, bias,
                   softplus_delta, has_z, chunk, y_gate_in, h_saved, g_out, g_last, has_g_last,
                   g_u, g_delta, g_z, g_A, g_D, g_bias, g_Bp, g_Cp):
    """Backward scan of channels ``d0 .. d0 + n_ch - 1`` of batch item b, last chunk first."""
    length = u.shape[2]
    n_state = A.shape[1]
    n_chunks = h_saved.shape[2]
    dtype = u.dtype
    B_group = Bm[b, gb]                                # (n, l)
    C_group = Cm[b, gc]
    gB_rows = g_Bp[b, gb, slot_b]                      # (n, l): this task's partial dL/dB
    gC_rows = g_Cp[b, gc, slot_c]
    g_carry = np.zeros((n_ch, n_state), dtype)         # dL/dh * decay handed to the earlier chunk
    g_a = np.zeros((n_ch, n_state), dtype)
    hs = np.empty((n_state, chunk + 1), dtype)         # hs[:, t + 1] = h_t; hs[:, 0] before chunk
    decay = np.empty((n_state, chunk), dtype)          # exp(dt A), then dL/d(dt A)
    g_h = np.empty((n_state, chunk), dtype)            # dL/dh_t
    dt = np.empty(chunk, dtype)
    du = np.empty(chunk, dtype)
    gy = np.empty(chunk, dtype)                        # dL/dy (y before the gate)
    g_bu = np.empty(chunk, dtype)                      # sum_n dL/dh_t B_t
    g_da = np.empty(chunk, dtype)                      # sum_n dL/d(dt A) A
    one = np.ones(1, dtype)[0]
    if has_g_last:
        for j in range(n_ch):
            for k in range(n_state):
                g_carry[j, k] = g_last[b, d0 + j, k]

    for c in range(n_chunks - 1, -1, -1):
        t0 = c * chunk
        steps = min(chunk, length - t0)
        for j in range(n_ch):
            d = d0 + j
            a_row = A[d]
            _step_sizes(delta[b, d, t0:t0 + steps], u[b, d, t0:t0 + steps], bias[d],
                        softplus_delta, dt, du)
            if has_z:
                for t in range(steps):
                    zt = z[b, d, t0 + t]
                    sig = one / (one + _exp(-zt))
                    go = g_out[b, d, t0 + t]
                    g_z[b, d, t0 + t] = go * y_gate_in[b, d, t0 + t] * sig * (one + zt * (one - sig))
                    gy[t] = go * zt * sig
            else:
                for t in range(steps):
                    gy[t] = g_out[b, d, t0 + t]

            # The chunk's decays and states, recomputed from the saved state; then dL/dh.
            for k in range(n_state):
                hs[k, 0] = h_saved[b, d, c, k]
            _decays(dt, a_row, steps, decay)
            _states(decay, du, B_group, steps, t0, hs)
            _state_grads(decay, gy, C_group, g_carry[j], steps, t0, g_h)

            # The rest has no recurrence: loops over time, one output array each.
            for t in range(steps):
                g_bu[t] = 0.0
                g_da[t] = 0.0
            for k in range(n_state):
                for t in range(steps):
                    gC_rows[k, t0 + t] += gy[t] * hs[k, t + 1]
                for t in range(steps):
                    gB_rows[k, t0 + t] += du[t] * g_h[k, t]
                for t in range(steps):
                    g_bu[t] += g_h[k, t] * B_group[k, t0 + t]
                for t in range(steps):                 # e = dL/d(dt_t A_k), in place of decay
                    decay[k, t] = decay[k, t] * hs[k, t] * g_h[k, t]
                a_k = a_row[k]
                acc = g_a[j, k]
                for t in range(steps):
                    acc += dt[t] * decay[k, t]
                    g_da[t] += a_k * decay[k, t]
                g_a[j, k] = acc

            dv = Dv[d]
            g_dv = 0.0
            g_bv = 0.0
            for t in range(steps):
                u_t = u[b, d, t0 + t]
                g_u[b, d, t0 + t] = g_bu[t] * dt[t] + gy[t] * dv
                g_dv += gy[t] * u_t
                g_dt = g_da[t] + g_bu[t] * u_t
                if softplus_delta:
                    # softplus' = sigmoid, exactly 1 above the threshold (softplus = x there)
                    x = delta[b, d, t0 + t] + bias[d]
                    if x <= SOFTPLUS_THRESHOLD:
                        g_dt = g_dt / (one + _exp(-x))
                g_delta[b, d, t0 + t] = g_dt
                g_bv += g_dt
            g_D[b, d] += g_dv
            g_bias[b, d] += g_bv

    for j in range(n_ch):
        for k in range(n_state):
            g_A[b, d0 + j, k] = g_a[j, k]


@njit(parallel=True, fastmath=FASTMATH_REASSOC, error_model="numpy", cache=True)
def scan_backward(u, delta, A, Bm, Cm, Dv, z, bias, softplus_delta, has_z, chunk,
                  run, tasks_per_run, task_channels, y_gate_in, h_saved, g_out, g_last,
                  has_g_last, g_u, g_delta, g_z, g_A, g_D, g_bias, g_Bp, g_Cp):
    """Gradients of the scan (see the module docstring); tasks run in parallel.

    Inputs as :func:`scan_forward`, plus ``y_gate_in`` and ``h_saved`` from it, ``g_out (b, d, l)``
    and ``g_last (b, d, n)`` (``(1, 1, 1)`` when has_g_last is False). Outputs: g_u, g_delta,
    g_z ``(b, d, l)`` (g_z ``(1, 1, 1)`` without z); per batch item g_A ``(b, d, n)``, g_D and
    g_bias ``(b, d)``; per task slot g_Bp ``(b, gB, slots_B, n, l)`` and g_Cp
    ``(b, gC, slots_C, n, l)`` (see :func:`slots_per_group`). g_D, g_bias, g_Bp and g_Cp are
    accumulated into and must be zero on entry.
    """
    n_channels = u.shape[1]
    per_group_b = n_channels // Bm.shape[1]
    per_group_c = n_channels // Cm.shape[1]
    runs = n_channels // run
    for task in prange(u.shape[0] * runs * tasks_per_run):
        mxcsr = flush_denormals()
        b, d0, n_ch, s = _task_channels(task, runs, run, tasks_per_run, task_channels)
        _backward_task(b, d0, n_ch, d0 // per_group_b, d0 // per_group_c,
                       _slot(d0, s, per_group_b, run, tasks_per_run),
                       _slot(d0, s, per_group_c, run, tasks_per_run),
                       u, delta, A, Bm, Cm, Dv, z, bias, softplus_delta, has_z, chunk,
                       y_gate_in, h_saved, g_out, g_last, has_g_last,
                       g_u, g_delta, g_z, g_A, g_D, g_bias, g_Bp, g_Cp)
        restore_fpenv(mxcsr)
