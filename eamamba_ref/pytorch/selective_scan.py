"""The selective scan (S6 recurrence) in pure PyTorch.

Semantics are those of ``selective_scan_ref`` in mamba_ssm 2.2.x (the function the CUDA kernel is
tested against), restricted to real-valued A:

    delta <- softplus(delta + delta_bias)          (softplus only if delta_softplus; threshold 20)
    h_t    = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t        h_0 = 0,  h: (b, d, n)
    y_t    = sum_n C_t * h_t + D * u_t
    out    = y * silu(z)                                             (only if z is given)

Shapes: u, delta, z ``(b, d, l)``; A ``(d, n)``; B and C each ``(d, n)`` (constant), ``(b, n, l)``
(one group) or ``(b, g, n, l)`` (g groups, channel i uses group ``i // (d // g)``); D, delta_bias
``(d,)``.

Two interchangeable evaluation orders:

* ``'sequential'``: one step of the recurrence per time step, exactly like the reference loop.
* ``'chunked'`` (default): the sequence is cut into chunks of T steps (time folded as ``(T, nc)``).
  (1) Every chunk runs the recurrence from a zero state *at the same time* (a loop of T steps over
  tensors that hold all chunks), giving the local outputs and the chunk's total decay product
  ``P = prod_t exp(delta_t A)``. (2) A loop of nc steps passes the true state across chunk borders:
  ``carry_c = P_{c-1} * carry_{c-1} + h_local_end_{c-1}``. (3) A second T-step loop adds each carry's
  contribution ``sum_n C_t * (prod_{s<=t} exp(delta_s A)) * carry_c`` (the partial decay products
  are rebuilt step by step instead of stored: no (l, b, d, n) tensor beyond decay and drive).
  Python-level iterations drop from l to about 2 T + l / T. Only exps of ``delta * A`` are taken,
  and every decay used is a product of those factors, so nothing can overflow that the plain
  recurrence would not overflow itself.

Both modes are written without in-place updates, so autograd can differentiate through them.

Differences from ``selective_scan_ref``, both deliberate: float64 inputs are computed in float64
(the reference always computes in float32), and complex A is not supported.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "SCAN_MODES",
    "selective_scan",
    "set_scan_mode",
    "get_scan_mode",
    "flush_denormals",
]

# 'numba' runs eamamba_ref.pytorch.scan_function.selective_scan_numba (Numba kernels for forward and backward),
# imported on first use so that this module itself needs only torch.
SCAN_MODES = ("sequential", "chunked", "numba")

# Steps per chunk in 'chunked' mode. The Python loops take about 2 T + l / T steps; 64 measured
# fastest on 2 CPU cores for l = 4096 .. 65536 (128 and 256 were 10-40 % slower).
DEFAULT_CHUNK_SIZE = 64

# Module-level default used when ``selective_scan(..., mode=None)``; change with set_scan_mode().
_scan_mode = "chunked"


def set_scan_mode(mode: str) -> None:
    """Set the default evaluation order of :func:`selective_scan` ('sequential', 'chunked', 'numba')."""
    global _scan_mode
    if mode not in SCAN_MODES:
        raise ValueError(f"scan mode must be one of {SCAN_MODES}, got {mode!r}")
    _scan_mode = mode


def get_scan_mode() -> str:
    """The current default evaluation order of :func:`selective_scan`."""
    return _scan_mode


def _denormals_are_flushed() -> bool:
    # There is no getter for torch.set_flush_denormal, so probe it: with DAZ/FTZ set, a denormal
    # times one comes out as zero.
    return (torch.tensor([1e-39], dtype=torch.float32) * 1.0).item() == 0.0


@contextlib.contextmanager
def flush_denormals():
    """Context manager: flush denormal floats to zero inside, restore the previous mode after.

    The decay factors exp(delta * A) multiply states down into the denormal range (below ~1e-38 in
    float32), where x86 arithmetic is 10-100x slower. Flushing them changes results by less than
    1e-38 absolute. The flag is per thread and also affects NumPy on the same thread, hence the
    restore on exit.
    """
    was_on = _denormals_are_flushed()
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if not was_on:
            torch.set_flush_denormal(False)


def _time_major_groups(M: torch.Tensor, name: str, b: int, d: int, n: int, l: int):
    """Bring B or C to a time-major, group-split layout.

    Returns ``(Mt, g)`` where ``Mt`` broadcasts against ``(l, b, g, d // g, n)``:
    ``(d, n) -> (1, 1, d, 1, n)`` with g = d; ``(b, n, l) -> (l, b, 1, 1, n)`` with g = 1;
    ``(b, g, n, l) -> (l, b, g, 1, n)``.
    """
    if M.dim() == 2:
        if tuple(M.shape) != (d, n):
            raise ValueError(f"{name} must be (d, n) = {(d, n)} when 2-D, got {tuple(M.shape)}")
        return M[None, None, :, None, :], d
    if M.dim() == 3:
        if tuple(M.shape) != (b, n, l):
            raise ValueError(f"{name} must be (b, n, l) = {(b, n, l)} when 3-D, got {tuple(M.shape)}")
        return M.permute(2, 0, 1)[:, :, None, None, :], 1
    if M.dim() == 4:
        g = M.shape[1]
        if g < 1 or d % g != 0 or tuple(M.shape) != (b, g, n, l):
            raise ValueError(
                f"{name} must be (b, g, n, l) = {(b, 'g', n, l)} with g dividing d={d}, got {tuple(M.shape)}"
            )
        return M.permute(3, 0, 1, 2)[:, :, :, None, :], g
    raise ValueError(f"{name} must have 2, 3 or 4 dimensions, got {M.dim()}")


def _times_grouped(x: torch.Tensor, Mt: torch.Tensor, g: int) -> torch.Tensor:
    """``x (..., d, n|1) * M`` with M shared by the d // g channels of each group -> (..., d, n)."""
    *lead, d, n = x.shape
    out = x.reshape(*lead, g, d // g, n) * Mt                     # (..., g, d // g, n)
    return out.reshape(*lead, d, out.shape[-1])


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    mode: str | None = None,
    chunk_size: int | None = None,
):
    """Run the selective scan; see the module docstring for the recurrence and shapes.

    Args:
        u, delta: ``(b, d, l)`` input and step size.
        A: ``(d, n)`` state matrix (diagonal per channel, real).
        B, C: ``(d, n)``, ``(b, n, l)`` or ``(b, g, n, l)``.
        D, delta_bias: ``(d,)`` or None.  z: ``(b, d, l)`` or None.
        delta_softplus: apply softplus (threshold 20) to ``delta + delta_bias``.
        return_last_state: also return the final state ``(b, d, n)``.
        mode: 'sequential', 'chunked' or 'numba'; None uses the module default (see
            :func:`set_scan_mode`).
        chunk_size: steps per chunk in 'chunked' mode (None: DEFAULT_CHUNK_SIZE); in 'numba' mode
            the steps between states saved for the backward pass.

    Returns:
        ``out (b, d, l)`` in u's dtype, or ``(out, last_state)``.
    """
    mode = _scan_mode if mode is None else mode
    if mode not in SCAN_MODES:
        raise ValueError(f"scan mode must be one of {SCAN_MODES}, got {mode!r}")
    if u.dim() != 3:
        raise ValueError(f"u must be (b, d, l), got shape {tuple(u.shape)}")
    b, d, l = u.shape
    if tuple(delta.shape) != (b, d, l):
        raise ValueError(f"delta must have u's shape {(b, d, l)}, got {tuple(delta.shape)}")
    if A.dim() != 2 or A.shape[0] != d:
        raise ValueError(f"A must be (d, n) with d={d}, got {tuple(A.shape)}")
    if A.is_complex():
        raise ValueError("complex A is not supported")
    n = A.shape[1]
    for name, v in (("D", D), ("delta_bias", delta_bias)):
        if v is not None and tuple(v.shape) != (d,):
            raise ValueError(f"{name} must be (d,) = ({d},), got {tuple(v.shape)}")
    if z is not None and tuple(z.shape) != (b, d, l):
        raise ValueError(f"z must have u's shape {(b, d, l)}, got {tuple(z.shape)}")
    if chunk_size is not None and (int(chunk_size) != chunk_size or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if mode == "numba":
        from eamamba_ref.pytorch.scan_function import selective_scan_numba

        return selective_scan_numba(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                    return_last_state, chunk_size=chunk_size)

    dtype_in = u.dtype
    # The reference computes in float32; we keep float64 as float64 so tests can use it as a golden.
    cdt = torch.float64 if dtype_in == torch.float64 else torch.float32
    u = u.to(cdt)
    delta = delta.to(cdt)
    A = A.to(cdt)
    if delta_bias is not None:
        delta = delta + delta_bias.to(cdt)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)  # beta 1, threshold 20: identity above 20, like the CUDA kernel

    Bt, gB = _time_major_groups(B.to(cdt), "B", b, d, n, l)
    Ct, gC = _time_major_groups(C.to(cdt), "C", b, d, n, l)
    dt = delta.permute(2, 0, 1)                                   # (l, b, d)
    ut = u.permute(2, 0, 1)                                       # (l, b, d)

    if mode == "chunked":
        # Fold time as (T, nc): step t of every chunk is then one contiguous block, and the big
        # (.., b, d, n) tensors below are born in that layout. Padded steps have delta = 0, so
        # decay 1 and drive 0: they leave the state alone and are cut off at the end.
        T = min(l, DEFAULT_CHUNK_SIZE if chunk_size is None else int(chunk_size))
        nc = -(-l // T) if l else 0
        dt, ut, Bt, Ct = (_fold(x, T, nc) for x in (dt, ut, Bt, Ct))   # (T, nc, ...)

    with flush_denormals():
        decay = torch.exp(dt[..., None] * A)                      # (.., b, d, n)  exp(delta A)
        drive = _times_grouped((dt * ut)[..., None], Bt, gB)      # (.., b, d, n)  delta B u
        if mode == "sequential":
            y, last = _scan_sequential(decay, drive, Ct, gC)      # (l, b, d)
        else:
            y, last = _scan_chunked(decay, drive, Ct, gC)         # (T, nc, b, d)

    if mode == "chunked":
        y = y.transpose(0, 1).reshape(-1, b, d)[:l]               # (l, b, d)
    y = y.permute(1, 2, 0)                                        # (b, d, l)
    if D is not None:
        y = y + u * D.to(cdt)[:, None]
    if z is not None:
        y = y * F.silu(z.to(cdt))
    out = y.to(dtype_in)
    return (out, last) if return_last_state else out


def _fold(x: torch.Tensor, T: int, nc: int) -> torch.Tensor:
    """Time-major ``(l, ...)`` -> ``(T, nc, ...)`` with ``[t, c] = x[c * T + t]``, zero padded.

    A tensor with a broadcast time axis (size 1) just gets a second broadcast axis.
    """
    if x.shape[0] == 1:
        return x[None]
    pad = nc * T - x.shape[0]
    if pad:
        x = torch.cat([x, x.new_zeros((pad,) + x.shape[1:])])
    return x.reshape(nc, T, *x.shape[1:]).transpose(0, 1).contiguous()


def _readout(h: torch.Tensor, Ct: torch.Tensor, g: int) -> torch.Tensor:
    """y = sum_n C * h for one step: ``h (.., b, d, n)``, ``Ct`` grouped (see _time_major_groups)."""
    return _times_grouped(h, Ct, g).sum(-1)                       # (.., b, d)


def _scan_sequential(decay, drive, Ct, gC):
    """h_t = decay_t * h_{t-1} + drive_t, one step at a time, reading y_t = sum_n C_t h_t.

    ``decay, drive (l, b, d, n)``, ``Ct (l|1, b|1, g, 1, n)`` -> ``y (l, b, d)``, last state.
    """
    if drive.shape[0] == 0:
        return drive.new_zeros(drive.shape[:-1]), drive.new_zeros(drive.shape[1:])
    # unbind once: indexing x[t] inside the loop would make autograd allocate a full-size zero
    # gradient per step (SelectBackward), turning the backward pass quadratic in l
    decay, drive, Cs = decay.unbind(0), drive.unbind(0), Ct.unbind(0)
    h = drive[0].new_zeros(drive[0].shape)                        # (b, d, n)
    ys = []
    for t in range(len(drive)):
        h = decay[t] * h + drive[t]
        ys.append(_readout(h, Cs[min(t, len(Cs) - 1)], gC))
    return torch.stack(ys), h


def _scan_chunked(decay, drive, Ct, gC):
    """The same recurrence on chunks (see module docstring).

    ``decay, drive (T, nc, b, d, n)``, ``Ct (T|1, nc|1, b|1, g, 1, n)`` -> ``y (T, nc, b, d)``,
    last state. Step t of chunk c is time ``c * T + t``.
    """
    T, nc = drive.shape[:2]
    tail = drive.shape[2:]                                        # (b, d, n)
    if T == 0 or nc == 0:
        return drive.new_zeros(drive.shape[:-1]), drive.new_zeros(tail)

    # unbind once: indexing x[t] inside the loops would make autograd allocate a full-size zero
    # gradient per step (SelectBackward), turning the backward pass quadratic in T
    Cs = Ct.unbind(0)
    decay, drive = decay.unbind(0), drive.unbind(0)

    def C_at(t):
        return Cs[min(t, len(Cs) - 1)]

    # 1) every chunk at once, each from a zero state: local states h and decay products p, with
    #    the local part of the output y_loc_t = sum_n C_t h_t.
    h, p = drive[0], decay[0]                                     # (nc, b, d, n)
    y_loc = [_readout(h, C_at(0), gC)]
    for t in range(1, T):
        h = decay[t] * h + drive[t]
        p = decay[t] * p
        y_loc.append(_readout(h, C_at(t), gC))                    # (nc, b, d)

    # 2) carry the true state over chunk borders: entering chunk c it is the end state of c - 1.
    p_c, h_c = p.unbind(0), h.unbind(0)
    carry = drive[0].new_zeros(tail)                              # (b, d, n)
    carries = [carry]
    for c in range(nc - 1):
        carry = p_c[c] * carry + h_c[c]
        carries.append(carry)
    last = p_c[-1] * carry + h_c[-1]
    carries = torch.stack(carries)                                # (nc, b, d, n)

    # 3) true output: add sum_n C_t P_t carry_c, where P_t is the decay since the chunk began
    #    (recomputed step by step rather than stored, to keep memory at the size of the inputs).
    p = carries
    y = []
    for t in range(T):
        p = decay[t] * p
        y.append(y_loc[t] + _readout(p, C_at(t), gC))
    return torch.stack(y), last
