"""eamamba_ref: a framework-free reference implementation of EAMamba (Lin et al., ICCV 2025).

    import eamamba_ref
    model = eamamba_ref.load("denoise.pth")          # official checkpoint, read without torch
    y = model(x)                                      # x: float32 (B, 3, H, W)

    eamamba_ref.selective_scan(u, delta, A, B, C, ...)   # the SSM kernel (numpy | numba | cuda)
    eamamba_ref.scans.all_around(x, (H, W), "diagonal", 8, "concate")

The layers of the package are its folders (docs/architecture.md): reference/ (the forward pass in
NumPy), kernels/, runtime/, io/, apps/, and pytorch/ (the PyTorch reference, an optional extra).
"""
import importlib

__version__ = "0.1.0"

# The names below are looked up on first use, so that importing a part of the package (say the
# PyTorch reference, eamamba_ref.pytorch) loads only that part. Importing the package changes
# nothing in the process: threads are owned at run time, while a forward pass runs, by `runtime`.
_API = {
    "scans": ("eamamba_ref.reference.scans", None),
    "selective_scan": ("eamamba_ref.runtime.backends", "selective_scan"),
    "load": ("eamamba_ref.io.loading", "load"),
    "EAMamba": ("eamamba_ref.runtime.model", "EAMamba"),
    "ModelConfig": ("eamamba_ref.io.config", "ModelConfig"),
    "MambaConfig": ("eamamba_ref.io.config", "MambaConfig"),
    "ConfigError": ("eamamba_ref.io.config", "ConfigError"),
}
__all__ = list(_API)


def __getattr__(name):
    if name not in _API:
        raise AttributeError(f"module 'eamamba_ref' has no attribute {name!r}")
    module, attribute = _API[name]
    value = importlib.import_module(module)
    return value if attribute is None else getattr(value, attribute)


def __dir__():
    return sorted(list(globals()) + __all__)
