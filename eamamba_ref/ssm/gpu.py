"""The selective scan as a numba.cuda kernel: one GPU thread per (batch item, channel).

The recurrence is sequential in time, and the (batch, channel) pairs are independent, so each
thread walks the whole sequence for one pair, keeping its N-number state in local memory (a
per-thread array of MAX_STATE floats, as CUDA needs a compile-time size; N <= MAX_STATE is
checked before launch). It is the direct transcription of the equations, meant to be easy to
check against the NumPy reference, not the fastest GPU scan: a production kernel would also
split the time axis (a chunked/parallel scan) and coalesce its loads.

``fastmath=True`` makes CUDA use its fast exp and flush denormals to zero, so decayed states
cost nothing on the GPU. This module imports numba.cuda; the package imports it only on demand,
so everything else works without numba-cuda. Under NUMBA_ENABLE_CUDASIM=1 the kernel runs in
numba's CUDA simulator (on the CPU, slowly).
"""

import math

import numpy as np
from numba import cuda, float32

MAX_STATE = 64  # largest N the kernel's local state array holds
THREADS_PER_BLOCK = 128


@cuda.jit(fastmath=True)
def scan_kernel(u, delta, A, Bm, Cm, Dv, z, bias, softplus_delta, has_z, y, last_state):
    """Same arguments as ``cpu.scan_kernel`` (B, C always 4-D, zeros for absent D / bias)."""
    i = cuda.grid(1)
    batch, n_channels, length = u.shape
    if i >= batch * n_channels:
        return
    b = i // n_channels
    d = i % n_channels
    n_state = A.shape[1]
    gb = d // (n_channels // Bm.shape[1])
    gc = d // (n_channels // Cm.shape[1])
    bb = b if Bm.shape[0] > 1 else 0  # size-1 axes of B and C are broadcast
    bc = b if Cm.shape[0] > 1 else 0
    b_varies = Bm.shape[3] > 1
    c_varies = Cm.shape[3] > 1

    h = cuda.local.array(MAX_STATE, float32)
    for n in range(n_state):
        h[n] = float32(0.0)

    for t in range(length):
        dt = delta[b, d, t] + bias[d]
        if softplus_delta and dt <= float32(20.0):
            dt = math.log1p(math.exp(dt))
        du = dt * u[b, d, t]
        tb = t if b_varies else 0
        tc = t if c_varies else 0
        acc = float32(0.0)
        for n in range(n_state):
            h[n] = math.exp(dt * A[d, n]) * h[n] + du * Bm[bb, gb, n, tb]
            acc += Cm[bc, gc, n, tc] * h[n]
        out = acc + Dv[d] * u[b, d, t]
        if has_z:
            zt = z[b, d, t]
            out *= zt / (float32(1.0) + math.exp(-zt))
        y[b, d, t] = out

    for n in range(n_state):
        last_state[b, d, n] = h[n]


def is_device_array(x):
    """A CUDA array (numba's, or any with __cuda_array_interface__, or the simulator's)."""
    if isinstance(x, np.ndarray):
        return False
    return hasattr(x, "__cuda_array_interface__") or hasattr(x, "copy_to_host")


def _on_device(x):
    return x if is_device_array(x) else cuda.to_device(np.ascontiguousarray(x))


def selective_scan_cuda(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                        delta_softplus=False):
    """Selective scan with the CUDA kernel; same contract as ``selective_scan_numpy``.

    Inputs are float32 NumPy or CUDA device arrays already validated by the dispatcher. Returns
    (y, last_state) as NumPy arrays, or as device arrays when u is a device array.
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
    args = [_on_device(x) for x in args]
    y = cuda.device_array((batch, n_channels, length), dtype=np.float32)
    last_state = cuda.device_array((batch, n_channels, n_state), dtype=np.float32)

    blocks = (batch * n_channels + THREADS_PER_BLOCK - 1) // THREADS_PER_BLOCK
    scan_kernel[blocks, THREADS_PER_BLOCK](*args, bool(delta_softplus), z is not None,
                                           y, last_state)
    if return_device:
        return y, last_state
    return y.copy_to_host(), last_state.copy_to_host()
