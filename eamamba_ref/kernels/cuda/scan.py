"""The selective scan as numba.cuda kernels, parallel over (batch, channel) and over time chunks.

The recurrence h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t is sequential in t, but it is
linear in h: over a chunk of steps, the state at its end is (the decays' product) x (the state at
its start) + (the chunk run from h = 0), and the decays' product is exp(A * sum of delta) per
state. So the time axis is cut into chunks and the scan runs in three launches:

  1. `chunk_scan`, one thread per (batch, channel, chunk): the chunk from h = 0, giving its end
     state and its sum of delta;
  2. `chunk_carries`, one thread per (batch, channel, state): walks the chunks in order and gives
     the true state entering each one (and the last state);
  3. `chunk_scan` again: the chunk from its true start, writing y (+ D u, gated by SiLU(z)).

Twice the recurrence's arithmetic for far more threads: at level 1 of the denoiser at 256x256 a
scan has 64 (batch, channel) pairs, which alone would leave a GPU almost idle; with chunks of ~32+
steps it has thousands of threads. When one chunk covers the sequence (short sequences, or many
channels), steps 1 and 2 are skipped and step 3 is the plain one-thread-per-channel scan. Each
thread keeps its N states in a local array of MAX_STATE floats (CUDA needs a compile-time size;
N <= MAX_STATE is checked before launch).

``fastmath=True`` (on the kernels and on `_walk`) makes CUDA use its fast exp (``__expf``, a few
ulp off), flush denormals to zero (so decayed states cost nothing) and fuse multiply-adds. numba's
CUDA simulator (NUMBA_ENABLE_CUDASIM=1, on the CPU, slowly) runs the kernels as Python and
emulates none of that: it checks the indexing, the chunking and the carries (the tests launch
several blocks at the real THREADS_PER_BLOCK and force several chunks on short sequences), while
the agreement of the fast-math arithmetic with the NumPy scan is measured on a real GPU by
benchmarks/gpu_check.py. This module imports numba.cuda; the package imports it only on demand,
so everything else works without numba-cuda.
"""

import math

import numpy as np
from numba import cuda, float32

MAX_STATE = 64  # largest N the kernels' local state arrays hold
THREADS_PER_BLOCK = 128
TARGET_THREADS = 16384  # chunks are cut so that a scan has about this many threads ...
MIN_CHUNK = 32  # ... but no chunk is shorter than this (the carries' walk is sequential)

# Set by the tests and benchmarks/gpu_check.py: every output array of the GPU path then starts as
# NaN instead of whatever the allocator hands out (which can be a stale copy of the right answer),
# so that an element a kernel fails to write cannot go unnoticed.
POISON_OUTPUTS = False


def device_empty(shape):
    """A float32 device array for a kernel to fill: uninitialised, or all NaN if POISON_OUTPUTS."""
    shape = tuple(int(s) for s in shape)
    if POISON_OUTPUTS:
        return cuda.to_device(np.full(shape, np.nan, dtype=np.float32))
    return cuda.device_array(shape, dtype=np.float32)


@cuda.jit(device=True, fastmath=True)
def _walk(u, delta, A, Bm, Cm, Dv, z, bias, softplus_delta, has_z, b, d, t0, t1, h, y, write_y):
    """Steps t0..t1-1 of channel d of batch item b from the state h (updated in place); writes y
    when write_y. Returns the sum of delta over the steps."""
    n_channels = u.shape[1]
    n_state = A.shape[1]
    gb = d // (n_channels // Bm.shape[1])
    gc = d // (n_channels // Cm.shape[1])
    bb = b if Bm.shape[0] > 1 else 0  # size-1 axes of B and C are broadcast
    bc = b if Cm.shape[0] > 1 else 0
    b_varies = Bm.shape[3] > 1
    c_varies = Cm.shape[3] > 1
    total = float32(0.0)
    for t in range(t0, t1):
        dt = delta[b, d, t] + bias[d]
        if softplus_delta and dt <= float32(20.0):
            dt = math.log1p(math.exp(dt))
        total += dt
        du = dt * u[b, d, t]
        tb = t if b_varies else 0
        tc = t if c_varies else 0
        acc = float32(0.0)
        for n in range(n_state):
            h[n] = math.exp(dt * A[d, n]) * h[n] + du * Bm[bb, gb, n, tb]
            acc += Cm[bc, gc, n, tc] * h[n]
        if write_y:
            out = acc + Dv[d] * u[b, d, t]
            if has_z:
                zt = z[b, d, t]
                out *= zt / (float32(1.0) + math.exp(-zt))
            y[b, d, t] = out
    return total


@cuda.jit(fastmath=True)
def chunk_scan(u, delta, A, Bm, Cm, Dv, z, bias, softplus_delta, has_z, chunk, from_zero, h_start,
               h_end, dt_sum, write_y, y, last_state):
    """Steps 1 and 3, one thread per (batch, channel, chunk) of chunk steps each.

    Starts from h = 0 (from_zero) or from h_start (batch, D, chunks, N). Step 1 (write_y False)
    stores the end state in h_end (batch, D, chunks, N) and the chunk's sum of delta in dt_sum
    (batch, D, chunks); step 3 (write_y True) writes y (batch, D, L), and the last chunk last_state.
    """
    i = cuda.grid(1)
    batch, n_channels, length = u.shape
    n_chunks = (length + chunk - 1) // chunk
    n_state = A.shape[1]
    if i >= batch * n_channels * n_chunks:
        return
    b, d, c = i // (n_channels * n_chunks), (i // n_chunks) % n_channels, i % n_chunks
    h = cuda.local.array(MAX_STATE, float32)
    for n in range(n_state):
        h[n] = float32(0.0) if from_zero else h_start[b, d, c, n]
    t0 = c * chunk
    total = _walk(u, delta, A, Bm, Cm, Dv, z, bias, softplus_delta, has_z, b, d,
                  t0, min(t0 + chunk, length), h, y, write_y)
    if not write_y:
        dt_sum[b, d, c] = total
        for n in range(n_state):
            h_end[b, d, c, n] = h[n]
    elif c == n_chunks - 1:
        for n in range(n_state):
            last_state[b, d, n] = h[n]


@cuda.jit(fastmath=True)
def chunk_carries(A, h_end, dt_sum, h_start):
    """Step 2, one thread per (batch, channel, state): h_start, the true state entering each chunk."""
    i = cuda.grid(1)
    batch, n_channels, n_chunks, n_state = h_end.shape
    if i >= batch * n_channels * n_state:
        return
    b, d, n = i // (n_channels * n_state), (i // n_state) % n_channels, i % n_state
    carry = float32(0.0)
    for c in range(n_chunks):
        h_start[b, d, c, n] = carry
        carry = math.exp(A[d, n] * dt_sum[b, d, c]) * carry + h_end[b, d, c, n]


def chunk_length(batch, n_channels, length):
    """Steps per chunk: enough chunks for ~TARGET_THREADS threads, none shorter than MIN_CHUNK."""
    wanted = -(-TARGET_THREADS // (batch * n_channels))
    n_chunks = max(1, min(wanted, length // MIN_CHUNK))
    return -(-length // n_chunks)


def is_device_array(x):
    """A CUDA array (numba's, or any with __cuda_array_interface__, or the simulator's)."""
    if isinstance(x, np.ndarray):
        return False
    return hasattr(x, "__cuda_array_interface__") or hasattr(x, "copy_to_host")


def _on_device(x):
    return x if is_device_array(x) else cuda.to_device(np.ascontiguousarray(x))


def selective_scan_cuda(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                        delta_softplus=False):
    """Selective scan with the CUDA kernels; same contract as ``reference.ssm.selective_scan``.

    Inputs are float32 NumPy or CUDA device arrays already validated by the dispatcher. Returns
    (y, last_state) as NumPy arrays, or as device arrays when u is a device array. The time
    chunks are `chunk_length`'s (the tests force short ones through TARGET_THREADS / MIN_CHUNK).
    """
    batch, n_channels, length = u.shape
    n_state = A.shape[1]
    if n_state > MAX_STATE:
        raise ValueError(f"the cuda backend supports N <= {MAX_STATE} states, got N = {n_state}")
    return_device = is_device_array(u)

    def as_4d(M):  # (D, N) -> (1, D, N, 1): one group per channel, constant in time
        return M.reshape(1, n_channels, n_state, 1) if M.ndim == 2 else M

    zeros = np.zeros(n_channels, dtype=np.float32)
    args = [u, delta, A, as_4d(B), as_4d(C),
            zeros if D is None else D,
            np.zeros((1, 1, 1), dtype=np.float32) if z is None else z,
            zeros if delta_bias is None else delta_bias]
    args = [_on_device(x) for x in args] + [bool(delta_softplus), z is not None]
    chunk = chunk_length(batch, n_channels, length)
    n_chunks = -(-length // chunk)
    y = device_empty((batch, n_channels, length))
    last_state = device_empty((batch, n_channels, n_state))

    def grid(threads):
        return (threads + THREADS_PER_BLOCK - 1) // THREADS_PER_BLOCK, THREADS_PER_BLOCK

    threads = grid(batch * n_channels * n_chunks)
    if n_chunks == 1:                      # the plain scan: one thread per (batch, channel)
        unused4 = cuda.device_array((1, 1, 1, 1), dtype=np.float32)   # h_start, h_end
        unused3 = cuda.device_array((1, 1, 1), dtype=np.float32)      # dt_sum
        chunk_scan[threads](*args, chunk, True, unused4, unused4, unused3, True, y, last_state)
    else:
        h_end = device_empty((batch, n_channels, n_chunks, n_state))
        h_start = device_empty((batch, n_channels, n_chunks, n_state))
        dt_sum = device_empty((batch, n_channels, n_chunks))
        chunk_scan[threads](*args, chunk, True, h_start, h_end, dt_sum, False, y, last_state)
        chunk_carries[grid(batch * n_channels * n_state)](args[2], h_end, dt_sum, h_start)
        chunk_scan[threads](*args, chunk, False, h_start, h_end, dt_sum, True, y, last_state)
    if return_device:
        return y, last_state
    return y.copy_to_host(), last_state.copy_to_host()
