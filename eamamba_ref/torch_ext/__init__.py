"""PyTorch extensions backed by Numba CPU kernels.

``selective_scan_numba`` is a drop-in, differentiable replacement for
``torch_ref.selective_scan`` (forward and backward are parallel Numba kernels); it is also what
``torch_ref.set_scan_mode('numba')`` selects.

    from eamamba_ref.torch_ext import selective_scan_numba, SelectiveScanFn
"""

from .scan_function import SelectiveScanFn, selective_scan_numba

__all__ = ["SelectiveScanFn", "selective_scan_numba"]
