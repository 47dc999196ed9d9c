"""Backends: the table of functions a model runs, bound once (`table`), and the selective scan of
Mamba (S6) as a checked public function on any backend (`selective_scan`).

A backend is a `reference.ops.Ops` table:
    'numpy'  `reference.ops.NUMPY`: the readable reference, exactly;
    'numba'  the reference with the parallel CPU kernels of `kernels.cpu` in place of conv2d and
             matmul (blocked, on the runtime's pool), the blocks' LayerNorm, the selective scan,
             the MHSSM (fused), the FFN (by row strips) and the blocks' two halves (each fused
             with its LayerNorm and residual): the default;
    'cuda'   numba.cuda kernels on GPU arrays (`kernels.cuda.tensor`) for every operation, with
             the reference's MHSSM and FFN composing them.

The selective scan:

    selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, backend=None)

computes, for every batch item b and channel d, from h = 0 (N numbers per (b, d)):

    delta_t = softplus(delta_t + delta_bias)                      (softplus only if asked)
    h_t     = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t
    y_t     = sum_n C_t[n] h_t[n] + D * u_t,        then y *= silu(z) if z is given

the semantics of ``selective_scan_ref`` in mamba-ssm 2.2 (real A only).

Shapes: u, delta, z (batch, D, L); A (D, N); B and C each (D, N) (the same at every step),
(batch, N, L) (one group) or (batch, G, N, L), where channel d reads group d // (D / G);
D and delta_bias (D,). Returns y (batch, D, L) float32, or (y, last_state) with last_state
(batch, D, N) float32 when return_last_state is True.

Scan kernels:
    'numpy'  the readable specification (`reference.ssm`), one vectorised step per time step;
    'numba'  the parallel CPU kernel (`kernels.cpu.scan`);
    'cuda'   a numba.cuda kernel (`kernels.cuda.scan`), one thread per (batch, channel). It accepts
             NumPy arrays (copied to the device; the result comes back as NumPy arrays) or CUDA
             device arrays (the result stays on the device when u is one).

The process-wide default backend is 'numba'; the environment variable EAMAMBA_BACKEND (read, never
written) overrides it and ``set_default_backend`` overrides both. A model binds its table when it
is made. (`restore` and `evaluate` pick 'cuda' where a GPU works: see `pipeline.default_backend`.
The CUDA kernels are tested in numba's CUDA simulator and were checked on an NVIDIA H200 by
benchmarks/gpu_check.py.)
"""

import functools
import os

import numpy as np

from eamamba_ref.reference.ops import NUMPY, Ops
from eamamba_ref.runtime import threads

__all__ = [
    "BACKENDS",
    "table",
    "selective_scan",
    "set_default_backend",
    "get_default_backend",
    "resolve_backend",
    "available_backends",
]

BACKENDS = ("numpy", "numba", "cuda")
_BUILTIN_DEFAULT = "numba"
_default_backend = None  # set by set_default_backend; None means "environment, then built-in"


def _check_name(name, where):
    if name not in BACKENDS:
        raise ValueError(f"unknown selective-scan backend {name!r} ({where}); "
                         f"expected one of {BACKENDS}")
    return name


def _cuda_available():
    """Whether numba.cuda imports and sees a GPU (or runs its simulator)."""
    try:
        from numba import cuda
    except Exception:  # numba-cuda missing or broken: the backend is simply not there
        return False
    try:
        return bool(cuda.is_available())
    except Exception:
        return False


def available_backends():
    """Names of the backends that can run here, as a tuple ('cuda' only with a GPU/simulator)."""
    return ("numpy", "numba") + (("cuda",) if _cuda_available() else ())


def get_default_backend():
    """The backend used when ``selective_scan`` gets backend=None."""
    if _default_backend is not None:
        return _default_backend
    env = os.environ.get("EAMAMBA_BACKEND")
    if env:
        return _check_name(env.strip().lower(), "from the environment variable EAMAMBA_BACKEND")
    return _BUILTIN_DEFAULT


def resolve_backend(name):
    """The backend a call with `backend=name` uses: the default for None, else the (checked) name.
    ('cuda' without a GPU fails later, with its own clear error.)"""
    return get_default_backend() if name is None else _check_name(name, "backend=")


def set_default_backend(name):
    """Set the process-wide default backend ('numpy', 'numba' or 'cuda'); None restores it.

    Raises ValueError for an unknown name and RuntimeError for 'cuda' without a usable GPU.
    """
    global _default_backend
    if name is not None:
        _check_name(name, "in set_default_backend")
        if name == "cuda" and not _cuda_available():
            raise RuntimeError("the 'cuda' backend is not available: numba.cuda finds no GPU")
    _default_backend = name


# ------------------------------------------------------------------------------------------------
# The tables

def table(name=None):
    """The `Ops` table of backend `name` (None: the default backend), made once per process."""
    name = resolve_backend(name)
    if name == "cuda" and not _cuda_available():
        raise RuntimeError("the 'cuda' backend is not available: numba.cuda finds no GPU")
    return _table(name)


@functools.cache
def _table(name):
    if name == "numpy":
        return NUMPY
    if name == "numba":
        from eamamba_ref.kernels.cpu import fused, gemm, halves, norms, scan, strips
        pool = functools.partial
        return NUMPY._replace(
            conv2d=pool(gemm.conv2d, parallel_for=threads.parallel_for),
            matmul=pool(gemm.matmul, parallel_for=threads.parallel_for),
            layer_norm_channels=norms.layer_norm_channels,
            selective_scan=scan.selective_scan,
            mhssm=pool(fused.mhssm, parallel_for=threads.parallel_for),
            channel_mixer=strips.channel_mixer,
            block_mhssm=pool(halves.block_mhssm, parallel_for=threads.parallel_for),
            block_ffn=pool(halves.block_ffn, parallel_for=threads.parallel_for),
        )
    from eamamba_ref.kernels.cuda import tensor as T
    composed = ("mhssm", "channel_mixer", "block_mhssm", "block_ffn")    # the reference composes them
    return Ops(**{name: getattr(T, name) for name in Ops._fields if name not in composed},
               **{name: getattr(NUMPY, name) for name in composed})


# ------------------------------------------------------------------------------------------------
# Validation: done once here, so the backends can trust their inputs.

def _is_device_array(x):
    """A CUDA array: __cuda_array_interface__, or copy_to_host (numba's CUDA simulator)."""
    if isinstance(x, np.ndarray):
        return False
    return hasattr(x, "__cuda_array_interface__") or hasattr(x, "copy_to_host")


def _as_float32(x, name, keep_device):
    """x as a float32 array; a CUDA device array is kept as it is when keep_device is True."""
    if keep_device and _is_device_array(x):
        if np.dtype(x.dtype) != np.float32:
            raise ValueError(f"{name} is a device array of dtype {x.dtype}; it must be float32")
        return x
    arr = np.asarray(x)
    if np.iscomplexobj(arr):
        raise ValueError(f"{name} is complex; only real-valued inputs are supported")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
            or arr.dtype == np.bool_):
        raise ValueError(f"{name} has dtype {arr.dtype}; expected a real number array")
    return arr.astype(np.float32, copy=False)


def _check_shape(x, name, expected):
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(x.shape)}")


def _check_input_matrix(M, name, batch, n_channels, n_state, length):
    """B or C: (D, N), (batch, N, L) or (batch, G, N, L); returns it as (D, N) or 4-D."""
    if M.ndim == 2:
        _check_shape(M, name, (n_channels, n_state))
        return M
    if M.ndim == 3:  # one group: the same as (batch, 1, N, L)
        _check_shape(M, name, (batch, n_state, length))
        return M.reshape(batch, 1, n_state, length)
    if M.ndim == 4:
        groups = M.shape[1]
        _check_shape(M, name, (batch, groups, n_state, length))
        if groups < 1 or n_channels % groups:
            raise ValueError(f"{name} has {groups} groups, which do not divide the "
                             f"{n_channels} channels of u (D must be a multiple of G)")
        return M
    raise ValueError(f"{name} must have shape (D, N), (batch, N, L) or (batch, G, N, L), "
                     f"got {tuple(M.shape)}")


def _validate(u, delta, A, B, C, D, z, delta_bias, keep_device):
    u = _as_float32(u, "u", keep_device)
    if u.ndim != 3:
        raise ValueError(f"u must have shape (batch, D, L), got {tuple(u.shape)}")
    batch, n_channels, length = u.shape
    delta = _as_float32(delta, "delta", keep_device)
    _check_shape(delta, "delta", u.shape)
    A = _as_float32(A, "A", keep_device)
    if A.ndim != 2 or A.shape[0] != n_channels:
        raise ValueError(f"A must have shape (D, N) = ({n_channels}, N), got {tuple(A.shape)}")
    n_state = A.shape[1]
    if n_state < 1:
        raise ValueError("A must have at least one state (N >= 1)")
    B = _check_input_matrix(_as_float32(B, "B", keep_device), "B", batch, n_channels,
                            n_state, length)
    C = _check_input_matrix(_as_float32(C, "C", keep_device), "C", batch, n_channels,
                            n_state, length)
    if D is not None:
        D = _as_float32(D, "D", keep_device)
        _check_shape(D, "D", (n_channels,))
    if z is not None:
        z = _as_float32(z, "z", keep_device)
        _check_shape(z, "z", u.shape)
    if delta_bias is not None:
        delta_bias = _as_float32(delta_bias, "delta_bias", keep_device)
        _check_shape(delta_bias, "delta_bias", (n_channels,))
    return u, delta, A, B, C, D, z, delta_bias


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, backend=None):
    """Run the selective scan; see the module docstring for the equations and shapes.

    backend: 'numpy', 'numba', 'cuda' or None (the default backend, see get_default_backend).
    Returns y (batch, D, L) float32, or (y, last_state (batch, D, N)) if return_last_state.
    """
    name = resolve_backend(backend)
    u, delta, A, B, C, D, z, delta_bias = _validate(u, delta, A, B, C, D, z, delta_bias,
                                                    keep_device=(name == "cuda"))
    batch, n_channels, length = u.shape
    n_state = A.shape[1]

    if batch == 0 or n_channels == 0 or length == 0:
        # Nothing to scan: y is empty and the state never left 0.
        y = np.zeros((batch, n_channels, length), dtype=np.float32)
        last_state = np.zeros((batch, n_channels, n_state), dtype=np.float32)
    elif name == "numpy":
        y, last_state = NUMPY.selective_scan(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus),
                                             return_last_state=True)
    elif name == "numba":
        from eamamba_ref.kernels.cpu.scan import selective_scan_numba
        threads.start_numba_threads()            # the runtime's choice of threading layer
        y, last_state = selective_scan_numba(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus))
    else:
        if not _cuda_available():
            raise RuntimeError("the 'cuda' backend is not available: numba.cuda finds no GPU")
        from eamamba_ref.kernels.cuda.scan import selective_scan_cuda
        y, last_state = selective_scan_cuda(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus))
    return (y, last_state) if return_last_state else y
