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

# Threads that spin when idle. The model alternates NumPy's GEMMs (OpenBLAS threads) with Numba's
# parallel kernels (OpenMP threads); each pool keeps its threads spinning for a while after its
# work is done, and on few cores the other pool's threads then share their cores with spinners.
# * OpenBLAS spins ~2**28 cycles after every GEMM: a 256x256 forward took 8.4-9.7 s instead of
#   ~6 s on 2 cores, a 32x32 one 1.35 s instead of 0.17 s. 2**4 cycles = sleep at once.
# * Numba's OpenMP (libgomp) threads spin after every kernel: passive waiting took the 256x256
#   forward from 5.3-5.7 s to 4.3-4.7 s (user time 10 -> 8 s).
# Waking sleeping threads costs microseconds per call. Both variables are read when the library
# loads: OpenBLAS with NumPy (so only if this package is imported before NumPy, as it is for
# `python -m eamamba_ref...`; the model warns otherwise), libgomp at Numba's first parallel
# kernel. A value the user set is kept. THREAD_ENV_SET says what this import set (benchmarks
# leave it out of the PyTorch reference's environment: torch's own OpenMP runs at its defaults).
THREAD_ENV = {"OPENBLAS_THREAD_TIMEOUT": "4", "OMP_WAIT_POLICY": "passive"}
THREAD_ENV_SET = {k: v for k, v in THREAD_ENV.items() if k not in _os.environ}
OPENBLAS_TIMEOUT_APPLIED = "numpy" not in _sys.modules or "OPENBLAS_THREAD_TIMEOUT" not in THREAD_ENV_SET
_os.environ.update(THREAD_ENV_SET)

from . import scans
from .config import ConfigError, MambaConfig, ModelConfig
from .loading import load
from .model import EAMamba
from .ssm import selective_scan

__all__ = ["scans", "selective_scan", "load", "EAMamba", "ModelConfig", "MambaConfig", "ConfigError"]
