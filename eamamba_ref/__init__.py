"""eamamba_ref: a framework-free reference implementation of EAMamba (Lin et al., ICCV 2025).

    import eamamba_ref
    model = eamamba_ref.load("denoise.pth")          # official checkpoint, read without torch
    y = model(x)                                      # x: float32 (B, 3, H, W)

    eamamba_ref.selective_scan(u, delta, A, B, C, ...)   # the SSM kernel (numpy | numba | cuda)
    eamamba_ref.reference.scans.all_around(x, (H, W), "diagonal", 8, "concate")
"""

__version__ = "0.1.0"

# Importing the package changes nothing in the process (no environment variables, no library
# settings): threads are owned at run time, while a forward pass runs, by `runtime`.

from eamamba_ref.reference import scans
from eamamba_ref.io.config import ConfigError, MambaConfig, ModelConfig
from eamamba_ref.io.loading import load
from eamamba_ref.runtime.model import EAMamba
from eamamba_ref.runtime.backends import selective_scan

__all__ = ["scans", "selective_scan", "load", "EAMamba", "ModelConfig", "MambaConfig", "ConfigError"]
