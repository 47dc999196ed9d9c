"""The selective scan as a ``torch.autograd.Function`` backed by the Numba kernels of scan_kernels.

``selective_scan_numba`` takes the arguments of ``torch_ref.selective_scan`` and returns the same
values, but the forward and backward passes are single parallel Numba kernels instead of graphs
of torch ops: no (b, d, n, l) tensor is built, and memory held for the backward is the inputs,
the states at chunk borders ``(b, d, ceil(l / chunk), n)`` and, with z, the output before the
gate ``(b, d, l)``.

Layout handled here, not in the kernels: B and C reach the kernels as ``(b, g, n, l)``;
``(b, n, l)`` becomes one group (a view) and a constant ``(d, n)`` is expanded to
``(b, d, n, l)`` (correct, with its gradient summed by autograd, but that costs (b, d, n, l)
memory, so the grouped forms are the fast path). Inputs are computed in float32, float64 inputs
in float64 (so that ``torch.autograd.gradcheck`` works); outputs and gradients are returned in
the inputs' dtypes. CPU tensors only.
"""

from __future__ import annotations

import numpy as np
import torch

from eamamba_ref.pytorch import scan_kernels as kern

__all__ = ["SelectiveScanFn", "selective_scan_numba"]


def _np(t: torch.Tensor) -> np.ndarray:
    """A C-contiguous NumPy view (a copy only if ``t`` is not contiguous)."""
    return t.detach().contiguous().numpy()


def _launch(kernel, *args):
    """Run a parallel Numba kernel without changing torch's intra-op thread count.

    Numba's 'omp' threading layer and torch share the GNU OpenMP runtime, and starting that layer
    (on the first parallel kernel of the process) sets the runtime's thread count to Numba's: a
    program that chose ``torch.set_num_threads(1)`` would silently run torch on every core from
    then on (measured: a 16x16 training step went from 0.2 s to 5.6 s on a loaded 2-core machine).
    """
    torch_threads = torch.get_num_threads()
    kernel(*args)
    if torch.get_num_threads() != torch_threads:
        torch.set_num_threads(torch_threads)


class SelectiveScanFn(torch.autograd.Function):
    """``(out, last_state) = SelectiveScanFn.apply(u, delta, A, B, C, D, z, delta_bias,
    delta_softplus, chunk)``.

    u, delta ``(b, d, l)``; A ``(d, n)``; B ``(b, gB, n, l)``; C ``(b, gC, n, l)`` (gB and gC
    divide d); D, delta_bias ``(d,)`` or None; z ``(b, d, l)`` or None; all of one dtype, float32
    or float64, on the CPU. chunk: steps between the states saved for the backward pass.
    Returns out ``(b, d, l)`` and the final state ``(b, d, n)``; both are differentiable.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk):
        b, d, l = u.shape
        n = A.shape[1]
        dtype = u.dtype
        run, tasks = kern.task_layout(d, B.shape[1], C.shape[1])
        # Contiguous copies (of e.g. B and C sliced out of one projection) are made once and
        # saved, so the backward pass does not copy again.
        u, delta, A, B, C = (t.contiguous() for t in (u, delta, A, B, C))
        z = None if z is None else z.contiguous()
        zeros_d = torch.zeros(d, dtype=dtype)
        arrays = (
            _np(u), _np(delta), _np(A), _np(B), _np(C),
            _np(zeros_d if D is None else D),
            _np(torch.zeros(1, 1, 1, dtype=dtype) if z is None else z),
            _np(zeros_d if delta_bias is None else delta_bias),
        )
        out = torch.empty(b, d, l, dtype=dtype)
        y_gate_in = torch.empty((b, d, l) if z is not None else (1, 1, 1), dtype=dtype)
        h_saved = torch.empty(b, d, -(-l // chunk), n, dtype=dtype)
        h_last = torch.zeros(b, d, n, dtype=dtype)
        if l > 0:
            _launch(kern.scan_forward, *arrays, bool(delta_softplus), z is not None, chunk, run,
                    tasks, kern.TASK_CHANNELS, out.numpy(), y_gate_in.numpy(), h_saved.numpy(),
                    h_last.numpy())
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, y_gate_in, h_saved)
        ctx.config = (bool(delta_softplus), int(chunk), run, tasks)
        ctx.set_materialize_grads(False)
        return out, h_last

    @staticmethod
    def backward(ctx, g_out, g_last):
        u, delta, A, B, C, D, z, delta_bias, y_gate_in, h_saved = ctx.saved_tensors
        delta_softplus, chunk, run, tasks = ctx.config
        b, d, l = u.shape
        n = A.shape[1]
        gB_groups, gC_groups = B.shape[1], C.shape[1]
        dtype = u.dtype
        if g_out is None:
            g_out = torch.zeros(b, d, l, dtype=dtype)
        slots_b = kern.slots_per_group(d, gB_groups, run, tasks)
        slots_c = kern.slots_per_group(d, gC_groups, run, tasks)
        g_u = torch.empty(b, d, l, dtype=dtype)
        g_delta = torch.empty(b, d, l, dtype=dtype)
        g_z = torch.empty((b, d, l) if z is not None else (1, 1, 1), dtype=dtype)
        g_A = torch.zeros(b, d, n, dtype=dtype)
        g_D = torch.zeros(b, d, dtype=dtype)
        g_bias = torch.zeros(b, d, dtype=dtype)
        g_Bp = torch.zeros(b, gB_groups, slots_b, n, l, dtype=dtype)
        g_Cp = torch.zeros(b, gC_groups, slots_c, n, l, dtype=dtype)
        zeros_d = torch.zeros(d, dtype=dtype)
        if l > 0:
            _launch(
                kern.scan_backward,
                _np(u), _np(delta), _np(A), _np(B), _np(C),
                _np(zeros_d if D is None else D),
                _np(torch.zeros(1, 1, 1, dtype=dtype) if z is None else z),
                _np(zeros_d if delta_bias is None else delta_bias),
                delta_softplus, z is not None, chunk, run, tasks, kern.TASK_CHANNELS,
                y_gate_in.numpy(), h_saved.numpy(), _np(g_out.to(dtype)),
                _np(torch.zeros(1, 1, 1, dtype=dtype) if g_last is None else g_last.to(dtype)),
                g_last is not None,
                g_u.numpy(), g_delta.numpy(), g_z.numpy(), g_A.numpy(), g_D.numpy(),
                g_bias.numpy(), g_Bp.numpy(), g_Cp.numpy())

        def slot_sum(gp):  # (b, g, slots, n, l) -> (b, g, n, l)
            return gp[:, :, 0] if gp.shape[2] == 1 else gp.sum(2)

        need = ctx.needs_input_grad
        return (
            g_u if need[0] else None,
            g_delta if need[1] else None,
            g_A.sum(0) if need[2] else None,
            slot_sum(g_Bp) if need[3] else None,
            slot_sum(g_Cp) if need[4] else None,
            g_D.sum(0) if D is not None and need[5] else None,
            g_z if z is not None and need[6] else None,
            g_bias.sum(0) if delta_bias is not None and need[7] else None,
            None,
            None,
        )


def _as_grouped(M: torch.Tensor, name: str, b: int, d: int, n: int, l: int) -> torch.Tensor:
    """B or C as ``(b, g, n, l)``: see the module docstring for the accepted layouts."""
    if M.dim() == 2:
        if tuple(M.shape) != (d, n):
            raise ValueError(f"{name} must be (d, n) = {(d, n)} when 2-D, got {tuple(M.shape)}")
        return M[None, :, :, None].expand(b, d, n, l)
    if M.dim() == 3:
        if tuple(M.shape) != (b, n, l):
            raise ValueError(f"{name} must be (b, n, l) = {(b, n, l)} when 3-D, got {tuple(M.shape)}")
        return M[:, None]
    if M.dim() == 4:
        g = M.shape[1]
        if g < 1 or d % g != 0 or tuple(M.shape) != (b, g, n, l):
            raise ValueError(
                f"{name} must be (b, g, n, l) = {(b, 'g', n, l)} with g dividing d={d}, got {tuple(M.shape)}"
            )
        return M
    raise ValueError(f"{name} must have 2, 3 or 4 dimensions, got {M.dim()}")


def selective_scan_numba(
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
    """Differentiable selective scan on Numba kernels; the contract of ``torch_ref.selective_scan``.

    Args:
        u, delta: ``(b, d, l)``.  A: ``(d, n)`` real.  B, C: ``(d, n)``, ``(b, n, l)`` or
        ``(b, g, n, l)`` (channel i uses group ``i // (d // g)``).  D, delta_bias: ``(d,)`` or None.
        z: ``(b, d, l)`` or None.  delta_softplus: softplus (threshold 20) of ``delta + delta_bias``.
        return_last_state: also return the final state ``(b, d, n)`` (differentiable too).
        mode: accepted for signature compatibility; must be None or 'numba'.
        chunk_size: steps between the states saved for the backward pass (default
            ``scan_kernels.DEFAULT_CHUNK``); changes memory and speed, not results.

    Returns:
        ``out (b, d, l)`` in u's dtype, or ``(out, last_state)``.
    """
    if mode not in (None, "numba"):
        raise ValueError(f"selective_scan_numba runs mode 'numba' only, got {mode!r}")
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
    tensors = [t for t in (u, delta, A, B, C, D, z, delta_bias) if t is not None]
    if any(t.device.type != "cpu" for t in tensors):
        raise ValueError("selective_scan_numba runs on CPU tensors only")
    Bg = _as_grouped(B, "B", b, d, n, l)
    Cg = _as_grouped(C, "C", b, d, n, l)

    dtype_in = u.dtype
    cdt = torch.float64 if dtype_in == torch.float64 else torch.float32

    def cast(t):
        return None if t is None else t.to(cdt)

    chunk = kern.DEFAULT_CHUNK if chunk_size is None else int(chunk_size)
    out, last = SelectiveScanFn.apply(
        cast(u), cast(delta), cast(A), cast(Bg), cast(Cg), cast(D), cast(z), cast(delta_bias),
        bool(delta_softplus), chunk,
    )
    out = out.to(dtype_in)
    return (out, last) if return_last_state else out
