"""eamamba_ref: a framework-free reference implementation of EAMamba (Lin et al., ICCV 2025).

    import eamamba_ref
    model = eamamba_ref.load("denoise.pth")          # official checkpoint, read without torch
    y = model(x)                                      # x: float32 (B, 3, H, W)

    eamamba_ref.selective_scan(u, delta, A, B, C, ...)   # the SSM kernel (numpy | numba | cuda)
    eamamba_ref.scans.all_around(x, (H, W), "diagonal", 8, "concate")
"""

__version__ = "0.1.0"

import os as _os
import sys as _sys

# NumPy's OpenBLAS keeps its idle worker threads spinning for ~2**28 cycles after every GEMM. The
# model alternates GEMMs with Numba's parallel kernels, whose threads then share the cores with
# spinning ones: on 2 cores a forward took 8.4-9.7 s instead of ~6 s at 256x256, and 1.35 s
# instead of 0.17 s at 32x32. 2**4 cycles = sleep at once; waking them costs microseconds per
# GEMM. OpenBLAS reads this when it loads, i.e. only if this package is imported before NumPy
# (it is, for `python -m eamamba_ref...`); otherwise export it yourself. The user's value wins.
OPENBLAS_TIMEOUT_APPLIED = "numpy" not in _sys.modules or "OPENBLAS_THREAD_TIMEOUT" in _os.environ
_os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

from . import scans
from .config import ConfigError, MambaConfig, ModelConfig
from .loading import load
from .model import EAMamba
from .ssm import selective_scan

__all__ = ["scans", "selective_scan", "load", "EAMamba", "ModelConfig", "MambaConfig", "ConfigError"]
