"""The selective scan (S6) in plain NumPy: the readable specification and the oracle for the kernels.

Semantics of ``selective_scan_ref`` in mamba-ssm 2.2 (state-spaces/mamba), for real A:

    delta <- softplus(delta + delta_bias)                  (each step, if asked)
    h_t    = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t,     h_{-1} = 0
    y_t    = sum_n C_t[n] h_t[n] + D * u_t
    y      = y * silu(z)                                   (if z is given)

with one state h of N numbers per (batch, channel). Everything is computed in float32, one time
step at a time, vectorised over batch, channel and state.
"""

import numpy as np

f32 = np.float32


def softplus(x):
    """log(1 + exp(x)), returning x itself above 20 as the CUDA kernel of mamba-ssm does."""
    return np.where(x > 20, x, np.log1p(np.exp(np.minimum(x, f32(20.0)))))


def silu(x):
    """x * sigmoid(x), written with tanh so that it never overflows."""
    return x * (f32(0.5) + f32(0.5) * np.tanh(f32(0.5) * x))


def _at_step(M, t, n_channels):
    """B or C at time step t, one row per channel: shape (batch or 1, D, N).

    M is (D, N) (the same for every step) or (batch, G, N, L), where channel d reads group
    d // (D / G): repeating each group D / G times lines the groups up with the channels.
    """
    if M.ndim == 2:
        return M[None]
    step = M[:, :, :, t]
    return np.repeat(step, n_channels // M.shape[1], axis=1)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False):
    """Selective scan of float32 arrays (mamba-ssm's ``selective_scan_ref``, checked arguments:
    `eamamba_ref.selective_scan` checks user input, then calls this or a kernel).

    u, delta: (batch, D, L); A: (D, N); B, C: (D, N) or (batch, G, N, L); D, delta_bias: (D,);
    z: (batch, D, L). Returns y (batch, D, L), or (y, last state h (batch, D, N)) if
    return_last_state.
    """
    batch, n_channels, length = u.shape
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = softplus(delta)

    h = np.zeros((batch, n_channels, A.shape[1]), dtype=f32)
    y = np.empty((batch, n_channels, length), dtype=f32)
    for t in range(length):
        dt = delta[:, :, t, None]  # (batch, D, 1): one step size per channel
        h = np.exp(dt * A) * h + dt * _at_step(B, t, n_channels) * u[:, :, t, None]
        y[:, :, t] = np.sum(_at_step(C, t, n_channels) * h, axis=-1)

    if D is not None:
        y = y + D[:, None] * u
    if z is not None:
        y = y * silu(z)
    y = y.astype(f32, copy=False)
    return (y, h) if return_last_state else y
