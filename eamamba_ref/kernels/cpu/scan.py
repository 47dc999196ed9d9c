"""The selective scan as a parallel Numba kernel for the CPU.

Work split: tasks of a few channels of one batch item that read the same group of B and C;
``prange`` runs the tasks on all cores. Each channel's state h (N numbers) is private to
its task, and time is walked once, in chunks of CHUNK steps.

Vectorisation: the N state updates of one time step are independent, so the SIMD lanes run over
the state index n. N is padded to a multiple of BLOCK = 16 and the innermost loop is a
``for k in range(BLOCK)`` over one block (``_recurrence_block``), whose operands are contiguous
1-D / 2-D slices indexed [k] or [t, k]. These details matter to LLVM: a compile-time trip count
of at least 16 is what its loop vectoriser accepts (shorter loops that need run-time alias
checks are left scalar), and indices that are plain loop counters let it prove them
non-negative, removing NumPy-style wraparound code that otherwise hides the access pattern. With the exp of ``fastexp`` inlined, one block is a handful
of 8-wide AVX2 instructions per state update. The padding lanes have A = B = C = 0, so their
state stays 0 and adds nothing to y.

Memory: per chunk, each task copies B and C into [block, time, k] order (so that one step's B_t
is contiguous within a block) in buffers of CHUNK x N_pad floats that stay in L1 and serve every
channel of the task. Nothing of size L * N is stored.

Denormals: decayed states do underflow in real models (zero padding, or any stretch where u is
0), and arithmetic on denormals is slow (~100 cycles per operation on Intel cores). On x86 every
task sets the hardware's flush-to-zero switches while it runs (``fpenv.flush_denormals``), so a
state that would become denormal is 0. Elsewhere decay factors are kept at or above 2**-63 and
states below 2**-63 are flushed to zero in the loop (see ``fastexp.TINY``), so that no product
in the recurrence is denormal; that compare and select costs ~13 % of the fused scan on x86.

Accuracy: exp, softplus and SiLU of ``fastexp`` are within ~3e-7 relative. Against the float32
NumPy reference the output agrees to better than 1e-6 of its scale (max |difference| / max |y|)
in the tests, which check 1e-5; states are summed in a different order, so not bit for bit.
Only inputs where the reference overflows (delta * A > 88) or where values fall into the denormal
range (below 2**-126; below 2**-63 for states without the hardware switch) give different values,
by less than that bound.
"""

import math

import numpy as np
from numba import njit, prange

import numba
from eamamba_ref.kernels.cpu.fastexp import FASTMATH_REASSOC, TINY, decay_exp2, silu, softplus
from eamamba_ref.kernels.cpu.fpenv import HARDWARE_FTZ, flush_denormals, restore_fpenv

f32 = np.float32
LOG2E = f32(1.4426950408889634)

BLOCK = 16  # SIMD block of state indices (see the module docstring)
CHUNK = 128  # time steps per chunk: B and C chunks of CHUNK x 16 floats each stay in L1
MAX_TASK_CHANNELS = 8  # channels per task, at most (16 measured slower here than 8)
TASKS_PER_THREAD = 4  # ... but at least this many tasks per thread where possible, for balance


def num_threads():
    """Numba's thread count for the calling thread: the task layouts of the scans follow it (the
    results do not: every channel runs the same instructions in whichever task holds it)."""
    return numba.get_num_threads()


def task_layout(batch, n_channels, groups_b, groups_c, threads):
    """How channels are cut into tasks: (run, channels per task, tasks per run).

    A run is a stretch of consecutive channels that read the same B group and the same C group;
    a task takes up to `channels per task` channels of one run of one batch item. Larger tasks
    amortise the B/C copies over more channels, smaller ones keep all threads busy.
    """
    run = math.gcd(n_channels // groups_b, n_channels // groups_c)
    wanted = -(-batch * n_channels // (TASKS_PER_THREAD * threads))
    per_task = max(1, min(run, MAX_TASK_CHANNELS, wanted))
    return run, per_task, -(-run // per_task)


@njit(fastmath=FASTMATH_REASSOC, error_model="numpy", cache=True)
def _recurrence_block(h, a, b, c, steps, dt, du, y):
    """One block of BLOCK states of one channel over `steps` steps, y[t] += C_t . h_t.

    h, a: (BLOCK,) state (updated) and A log2(e); b, c: (CHUNK, BLOCK) the block's B and C;
    dt, du: (CHUNK,) delta and delta * u; y: (steps,) accumulated.
    Every operand is a contiguous 1-D or 2-D array here: with 3-D [channel, block, k] indexing
    in the same loop LLVM kept its constants in memory and recomputed strides every step
    (measured 1.4 vs 0.8 ns per state update).
    """
    for t in range(steps):
        dt_t = dt[t]
        du_t = du[t]
        acc = f32(0.0)
        for k in range(BLOCK):
            decay = decay_exp2(dt_t * a[k])
            h_new = decay * h[k] + du_t * b[t, k]
            if not HARDWARE_FTZ:        # (a constant: with the hardware switch this is compiled out)
                h_new = f32(0.0) if abs(h_new) < TINY else h_new   # no denormals (see above)
            h[k] = h_new
            acc += c[t, k] * h_new
        y[t] += acc


@njit(fastmath=FASTMATH_REASSOC, error_model="numpy", cache=True)
def recurrence(h, a, b_chunk, c_chunk, steps, dt, du, y):
    """The recurrence of one channel over one chunk: h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t,
    y[t] = C_t . h_t (the D skip is the caller's).

    h, a: (n_blocks, BLOCK) the channel's state (updated) and A log2(e), zero-padded;
    b_chunk, c_chunk: (n_blocks, CHUNK, BLOCK) the chunk's B and C, block-major so that each
    block's rows are contiguous; dt, du: (CHUNK,); y: (steps,) written.
    Sequential in t, vectorised over the state index (the k loop of `_recurrence_block`).
    """
    for t in range(steps):
        y[t] = f32(0.0)
    for nb in range(h.shape[0]):
        _recurrence_block(h[nb], a[nb], b_chunk[nb], c_chunk[nb], steps, dt, du, y)


@njit(parallel=True, fastmath=FASTMATH_REASSOC, error_model="numpy", cache=True)
def scan_kernel(u, delta, A, Bm, Cm, Dv, z, bias, softplus_delta, has_z, run, per_task,
                tasks_per_run, y, last_state):
    """Fill y (batch, D, L) and last_state (batch, D, N).

    u, delta, z: (batch, D, L) float32 (z is a (1, 1, 1) dummy when has_z is False);
    A: (D, N); Bm, Cm: (batch or 1, G, N, L or 1), a (D, N) matrix being passed as (1, D, N, 1);
    Dv, bias: (D,) (zeros stand for "not given"). Every array is float32 and C-contiguous, so
    this compiles to a single specialisation.
    """
    batch, n_channels, length = u.shape
    n_state = A.shape[1]
    n_blocks = (n_state + BLOCK - 1) // BLOCK
    per_group_b = n_channels // Bm.shape[1]
    per_group_c = n_channels // Cm.shape[1]
    # An axis of size 1 in B or C is broadcast: index it through a step of 0.
    batch_step_b = 1 if Bm.shape[0] > 1 else 0
    time_step_b = 1 if Bm.shape[3] > 1 else 0
    batch_step_c = 1 if Cm.shape[0] > 1 else 0
    time_step_c = 1 if Cm.shape[3] > 1 else 0
    runs = n_channels // run
    n_tasks = batch * runs * tasks_per_run

    for task in prange(n_tasks):
        fpenv = flush_denormals()                        # this thread, for this task (see above)
        b = task // (runs * tasks_per_run)
        r = (task // tasks_per_run) % runs
        d0 = r * run + (task % tasks_per_run) * per_task
        n_ch = min(per_task, (r + 1) * run - d0)
        b_src = Bm[b * batch_step_b, d0 // per_group_b]  # (N, L or 1): this task's B group
        c_src = Cm[b * batch_step_c, d0 // per_group_c]

        # Task-private buffers, [channel or time, block, k]; zeros in the padding lanes.
        a_pad = np.zeros((n_ch, n_blocks, BLOCK), dtype=f32)
        h = np.zeros((n_ch, n_blocks, BLOCK), dtype=f32)
        b_chunk = np.zeros((n_blocks, CHUNK, BLOCK), dtype=f32)
        c_chunk = np.zeros((n_blocks, CHUNK, BLOCK), dtype=f32)
        dt = np.empty(CHUNK, dtype=f32)
        du = np.empty(CHUNK, dtype=f32)
        for j in range(n_ch):
            for n in range(n_state):
                a_pad[j, n // BLOCK, n % BLOCK] = A[d0 + j, n] * LOG2E  # exp(x) = 2**(x log2 e)

        for t0 in range(0, length, CHUNK):
            steps = min(CHUNK, length - t0)
            for n in range(n_state):
                nb, k = n // BLOCK, n % BLOCK
                for t in range(steps):
                    b_chunk[nb, t, k] = b_src[n, (t0 + t) * time_step_b]
                    c_chunk[nb, t, k] = c_src[n, (t0 + t) * time_step_c]

            for j in range(n_ch):
                d = d0 + j
                u_row = u[b, d, t0:t0 + steps]
                delta_row = delta[b, d, t0:t0 + steps]
                y_row = y[b, d, t0:t0 + steps]
                for t in range(steps):
                    dt[t] = delta_row[t] + bias[d]
                if softplus_delta:
                    for t in range(steps):
                        dt[t] = softplus(dt[t])
                for t in range(steps):
                    du[t] = dt[t] * u_row[t]

                recurrence(h[j], a_pad[j], b_chunk, c_chunk, steps, dt, du, y_row)
                for t in range(steps):
                    y_row[t] += Dv[d] * u_row[t]

                if has_z:
                    z_row = z[b, d, t0:t0 + steps]
                    for t in range(steps):
                        y_row[t] *= silu(z_row[t])

        for j in range(n_ch):
            for n in range(n_state):
                last_state[b, d0 + j, n] = h[j, n // BLOCK, n % BLOCK]
        restore_fpenv(fpenv)


def selective_scan_numba(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                         delta_softplus=False):
    """Selective scan with the Numba kernel; same contract as ``reference.ssm.selective_scan``.

    Inputs are float32 arrays already validated by the dispatcher. Returns (y, last_state).
    """
    batch, n_channels, length = u.shape
    n_state = A.shape[1]

    def as_4d(M):  # (D, N) -> (1, D, N, 1): one group per channel, constant in time
        return M.reshape(1, n_channels, n_state, 1) if M.ndim == 2 else M

    Bm = np.ascontiguousarray(as_4d(B))
    Cm = np.ascontiguousarray(as_4d(C))
    zeros = np.zeros(n_channels, dtype=f32)
    Dv = zeros if D is None else np.ascontiguousarray(D)
    bias = zeros if delta_bias is None else np.ascontiguousarray(delta_bias)
    zz = np.zeros((1, 1, 1), dtype=f32) if z is None else np.ascontiguousarray(z)
    run, per_task, tasks_per_run = task_layout(batch, n_channels, Bm.shape[1], Cm.shape[1],
                                               num_threads())

    y = np.empty((batch, n_channels, length), dtype=f32)
    last_state = np.empty((batch, n_channels, n_state), dtype=f32)
    scan_kernel(np.ascontiguousarray(u), np.ascontiguousarray(delta), np.ascontiguousarray(A),
                Bm, Cm, Dv, zz, bias, bool(delta_softplus), z is not None, run, per_task,
                tasks_per_run, y, last_state)
    return y, last_state


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False):
    """`reference.ssm.selective_scan` (same signature and result to float32 rounding) with the
    kernel above; float32 inputs of the shapes the reference takes."""
    y, last_state = selective_scan_numba(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return (y, last_state) if return_last_state else y
