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
shared writes). B and C of a group are copied chunk by chunk into ``[time, state]`` buffers so that
the state loop of one step reads contiguous memory. Gradients of B and C are summed over the
channels of a task in such buffers and written to a per-task slot of a partial result
``(b, g, slots, n, l)``; the caller sums the slots (no races, and no (b, d, n, l) tensor).

Memory: the forward pass saves the state at the start of every chunk of ``chunk`` steps,
``(b, d, ceil(l / chunk), n)``. The backward pass walks the chunks from last to first and, per
channel, recomputes that chunk's states and decay factors from the saved state into two small
buffers before the reverse sweep: one extra exp per state update, nothing of size (b, d, n, l).

Denormals: decayed states and gradients underflow; on x86 every denormal operand or result costs
~100 cycles. Each task sets the FTZ and DAZ bits of its thread's MXCSR (flush denormals to zero)
and restores the previous value when it ends, so other code on Numba's worker threads is not
affected. The change to results is below 1e-38 absolute.

Dtypes: every array of one call has the same dtype. float32 uses the vectorisable exp of
``ssm.fastexp`` (~3e-7 relative); float64 uses libm (for ``gradcheck``).
"""

import math
import platform

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from ..ssm.fastexp import FASTMATH_REASSOC, fexp
from ..ssm.fastexp import silu as silu32
from ..ssm.fastexp import softplus as softplus32

__all__ = ["TASK_CHANNELS", "DEFAULT_CHUNK", "task_layout", "scan_forward", "scan_backward"]

TASK_CHANNELS = 8  # channels per task: amortises the B/C copies, leaves enough tasks to balance
DEFAULT_CHUNK = 64  # steps between saved states: memory (b, d, l/64, n), buffers stay in L1
SOFTPLUS_THRESHOLD = 20.0  # above it softplus(x) = x (as the CUDA kernel and torch)

# ------------------------------------------------------------------------- denormal flushing

_MXCSR_FTZ_DAZ = 0x8040  # bit 15 flush-to-zero, bit 6 denormals-are-zero
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


@intrinsic
def _enter_ftz(typingctx):
    """Set FTZ/DAZ in this thread's MXCSR; return the previous MXCSR (0 and no-op off x86)."""

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        if not _X86:
            return ir.Constant(i32, 0)
        slot = cgutils.alloca_once(builder, i32)
        fnty = ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer()])
        stmxcsr = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.sse.stmxcsr")
        ldmxcsr = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.sse.ldmxcsr")
        ptr = builder.bitcast(slot, ir.IntType(8).as_pointer())
        builder.call(stmxcsr, [ptr])
        old = builder.load(slot)
        builder.store(builder.or_(old, ir.Constant(i32, _MXCSR_FTZ_DAZ)), slot)
        builder.call(ldmxcsr, [ptr])
        return old

    return types.uint32(), codegen


@intrinsic
def _leave_ftz(typingctx, old):
    """Restore an MXCSR value returned by ``_enter_ftz``."""

    def codegen(context, builder, signature, args):
        if _X86:
            slot = cgutils.alloca_once_value(builder, args[0])
            fnty = ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer()])
            ldmxcsr = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.sse.ldmxcsr")
            builder.call(ldmxcsr, [builder.bitcast(slot, ir.IntType(8).as_pointer())])
        return context.get_dummy_value()

    return types.void(types.uint32), codegen


# --------------------------------------------------- scalar functions, one version per dtype

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


# ---------------------------------------------------------------------------------- forward

@njit(parallel=True, fastmath=FASTMATH_REASSOC, error_model="numpy", cache=True)
def scan_forward(u, delta, A, Bm, Cm, Dv, z, bias, softplus_delta, has_z, chunk,
                 run, tasks_per_run, task_channels, out, y_gate_in, h_saved, h_last):
    """Fill ``out``, ``y_gate_in``, ``h_saved`` and ``h_last``.

    u, delta, z: ``(b, d, l)`` (z is ``(1, 1, 1)`` when has_z is False); A ``(d, n)``;
    Bm ``(b, gB, n, l)``, Cm ``(b, gC, n, l)``; Dv, bias ``(d,)`` (zeros mean "not given").
    out ``(b, d, l)``; y_gate_in ``(b, d, l)`` the output before the z gate (``(1, 1, 1)`` and
    untouched without z); h_saved ``(b, d, ceil(l / chunk), n)`` the state *before* each chunk;
    h_last ``(b, d, n)``.
    """
    batch, n_channels, length = u.shape
    n_state = A.shape[1]
    per_group_b = n_channels // Bm.shape[1]
    per_group_c = n_channels // Cm.shape[1]
    runs = n_channels // run
    n_chunks = h_saved.shape[2]
    dtype = u.dtype

    for task in prange(batch * runs * tasks_per_run):
        mxcsr = _enter_ftz()
        b, d0, n_ch, _ = _task_channels(task, runs, run, tasks_per_run, task_channels)
        gb = d0 // per_group_b
        gc = d0 // per_group_c

        a = np.empty((n_ch, n_state), dtype)
        h = np.zeros((n_ch, n_state), dtype)
        b_t = np.empty((chunk, n_state), dtype)   # B of the chunk, [time, state]
        c_t = np.empty((chunk, n_state), dtype)
        dt = np.empty(chunk, dtype)
        for j in range(n_ch):
            for k in range(n_state):
                a[j, k] = A[d0 + j, k]

        for c in range(n_chunks):
            t0 = c * chunk
            steps = min(chunk, length - t0)
            for k in range(n_state):
                for t in range(steps):
                    b_t[t, k] = Bm[b, gb, k, t0 + t]
                    c_t[t, k] = Cm[b, gc, k, t0 + t]
            for j in range(n_ch):
                d = d0 + j
                for k in range(n_state):
                    h_saved[b, d, c, k] = h[j, k]
                for t in range(steps):
                    x = delta[b, d, t0 + t] + bias[d]
                    dt[t] = _softplus(x) if softplus_delta else x
                for t in range(steps):
                    dt_t = dt[t]
                    u_t = u[b, d, t0 + t]
                    du_t = dt_t * u_t
                    acc = Dv[d] * u_t
                    for k in range(n_state):
                        hk = _exp(dt_t * a[j, k]) * h[j, k] + du_t * b_t[t, k]
                        h[j, k] = hk
                        acc += c_t[t, k] * hk
                    y = acc
                    if has_z:
                        y_gate_in[b, d, t0 + t] = y
                        y = y * _silu(z[b, d, t0 + t])
                    out[b, d, t0 + t] = y

        for j in range(n_ch):
            for k in range(n_state):
                h_last[b, d0 + j, k] = h[j, k]
        _leave_ftz(mxcsr)


# --------------------------------------------------------------------------------- backward

@njit(parallel=True, fastmath=FASTMATH_REASSOC, error_model="numpy", cache=True)
def scan_backward(u, delta, A, Bm, Cm, Dv, z, bias, softplus_delta, has_z, chunk,
                  run, tasks_per_run, task_channels, y_gate_in, h_saved, g_out, g_last,
                  has_g_last, g_u, g_delta, g_z, g_A, g_D, g_bias, g_Bp, g_Cp):
    """Gradients of the scan (see the module docstring), one reverse pass per task.

    Inputs as :func:`scan_forward`, plus ``y_gate_in`` and ``h_saved`` from it, ``g_out (b, d, l)``
    and ``g_last (b, d, n)`` (``(1, 1, 1)`` when has_g_last is False). Outputs: g_u, g_delta,
    g_z ``(b, d, l)`` (g_z ``(1, 1, 1)`` without z); per batch item g_A ``(b, d, n)``, g_D and
    g_bias ``(b, d)``; per task slot g_Bp ``(b, gB, slots_B, n, l)`` and g_Cp
    ``(b, gC, slots_C, n, l)`` (see :func:`slots_per_group`).
    """
    batch, n_channels, length = u.shape
    n_state = A.shape[1]
    per_group_b = n_channels // Bm.shape[1]
    per_group_c = n_channels // Cm.shape[1]
    runs = n_channels // run
    n_chunks = h_saved.shape[2]
    dtype = u.dtype

    for task in prange(batch * runs * tasks_per_run):
        mxcsr = _enter_ftz()
        b, d0, n_ch, s = _task_channels(task, runs, run, tasks_per_run, task_channels)
        gb = d0 // per_group_b
        gc = d0 // per_group_c
        slot_b = _slot(d0, s, per_group_b, run, tasks_per_run)
        slot_c = _slot(d0, s, per_group_c, run, tasks_per_run)

        a = np.empty((n_ch, n_state), dtype)
        g_h = np.zeros((n_ch, n_state), dtype)     # dL/dh_t from later steps, carried backwards
        g_a = np.zeros((n_ch, n_state), dtype)
        g_dv = np.zeros(n_ch, dtype)
        g_bv = np.zeros(n_ch, dtype)
        b_t = np.empty((chunk, n_state), dtype)
        c_t = np.empty((chunk, n_state), dtype)
        gb_t = np.empty((chunk, n_state), dtype)   # dL/dB of the chunk, summed over the task
        gc_t = np.empty((chunk, n_state), dtype)
        hs = np.empty((chunk + 1, n_state), dtype)  # hs[t + 1] = h_t, hs[0] = state before chunk
        decay = np.empty((chunk, n_state), dtype)
        dt = np.empty(chunk, dtype)
        dsp = np.empty(chunk, dtype)                # softplus'(delta + bias)
        zero = np.zeros(1, dtype)[0]                # constants of the compute dtype
        one = np.ones(1, dtype)[0]
        for j in range(n_ch):
            for k in range(n_state):
                a[j, k] = A[d0 + j, k]
                if has_g_last:
                    g_h[j, k] = g_last[b, d0 + j, k]

        for c in range(n_chunks - 1, -1, -1):
            t0 = c * chunk
            steps = min(chunk, length - t0)
            for k in range(n_state):
                for t in range(steps):
                    b_t[t, k] = Bm[b, gb, k, t0 + t]
                    c_t[t, k] = Cm[b, gc, k, t0 + t]
            gb_t[:steps] = 0.0
            gc_t[:steps] = 0.0

            for j in range(n_ch):
                d = d0 + j
                for t in range(steps):
                    x = delta[b, d, t0 + t] + bias[d]
                    if softplus_delta:
                        dt[t] = _softplus(x)
                        # softplus' = sigmoid, exactly 1 above the threshold (softplus = x there)
                        dsp[t] = one if x > SOFTPLUS_THRESHOLD else one / (one + _exp(-x))
                    else:
                        dt[t] = x
                        dsp[t] = one

                # Recompute the chunk's states and decays from the saved state.
                for k in range(n_state):
                    hs[0, k] = h_saved[b, d, c, k]
                for t in range(steps):
                    dt_t = dt[t]
                    du_t = dt_t * u[b, d, t0 + t]
                    for k in range(n_state):
                        e = _exp(dt_t * a[j, k])
                        decay[t, k] = e
                        hs[t + 1, k] = e * hs[t, k] + du_t * b_t[t, k]

                # Reverse sweep.
                for t in range(steps - 1, -1, -1):
                    i = t0 + t
                    dt_t = dt[t]
                    u_t = u[b, d, i]
                    gy = g_out[b, d, i]
                    if has_z:
                        zt = z[b, d, i]
                        sig = one / (one + _exp(-zt))
                        g_z[b, d, i] = gy * y_gate_in[b, d, i] * sig * (one + zt * (one - sig))
                        gy = gy * zt * sig
                    du_t = dt_t * u_t
                    g_bu = zero   # sum_n g_t B_t
                    g_da = zero   # sum_n e_t A
                    for k in range(n_state):
                        gk = g_h[j, k] + gy * c_t[t, k]
                        gc_t[t, k] += gy * hs[t + 1, k]
                        gb_t[t, k] += gk * du_t
                        g_bu += gk * b_t[t, k]
                        e = gk * hs[t, k] * decay[t, k]
                        g_da += e * a[j, k]
                        g_a[j, k] += e * dt_t
                        g_h[j, k] = gk * decay[t, k]
                    g_dt = g_da + g_bu * u_t
                    g_u[b, d, i] = g_bu * dt_t + gy * Dv[d]
                    g_dv[j] += gy * u_t
                    g_d = g_dt * dsp[t]
                    g_delta[b, d, i] = g_d
                    g_bv[j] += g_d

            for k in range(n_state):
                for t in range(steps):
                    g_Bp[b, gb, slot_b, k, t0 + t] = gb_t[t, k]
                    g_Cp[b, gc, slot_c, k, t0 + t] = gc_t[t, k]

        for j in range(n_ch):
            for k in range(n_state):
                g_A[b, d0 + j, k] = g_a[j, k]
            g_D[b, d0 + j] = g_dv[j]
            g_bias[b, d0 + j] = g_bv[j]
        _leave_ftz(mxcsr)
