"""`EAMamba`: a ready model (config + parameters + a backend table) and what runs its forward pass.

The forward pass itself is `reference.model.eamamba` / `eamamba_sr`, run on the model's table
(`runtime.backends.table`), bound when the model is made. On the CPU it runs inside
`threads.forward_threads()` (BLAS on one thread, GEMM blocks on the runtime's pool: the same bits
for any thread count) and `allocator.reuse_freed_memory()` (no page faults for the large
temporaries). With 'cuda' the parameters are uploaded once and every layer reads and writes device
memory (`kernels.cuda.tensor.DeviceTensor`) until the result comes back.
"""
from __future__ import annotations

import numpy as np

from eamamba_ref.reference.model import eamamba, eamamba_sr
from eamamba_ref.runtime import backends, threads
from eamamba_ref.runtime.allocator import reuse_freed_memory


class EAMamba:
    """A ready model: `model(x)` runs the forward pass.

    config: `io.config.ModelConfig` (validated here); params: official state-dict name -> float32
    array; backend: 'numpy' (the reference, exactly), 'numba' (CPU kernels) or 'cuda' (GPU);
    None picks the process default (`runtime.backends.get_default_backend`) now.
    x: float32 `(B, C, H, W)` NumPy array; returns `(B, out_channels, H', W')` as NumPy.
    """

    def __init__(self, config, params: dict, backend=None):
        self.config = config.validate()
        self.params = params
        self.backend = backend

    @property
    def backend(self):
        """The backend's name; setting it binds that backend's table."""
        return self._backend

    @backend.setter
    def backend(self, name):
        self._backend = backends.resolve_backend(name)
        self.ops = backends.table(self._backend)
        self._device_params = None

    def __call__(self, x):
        x = np.asarray(x)
        cfg = self.config
        if x.ndim != 4:
            raise ValueError(f"input must be (B, C, H, W), got shape {x.shape}")
        if x.shape[1] != cfg.inp_channels:
            raise ValueError(f"this model takes {cfg.inp_channels} input channels, got {x.shape[1]}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        forward = eamamba if cfg.name == "eamamba" else eamamba_sr
        if self._backend == "cuda":
            from eamamba_ref.kernels.cuda import DeviceTensor
            if self._device_params is None:
                self._device_params = {k: DeviceTensor.from_host(v) for k, v in self.params.items()}
            return forward(self._device_params, cfg, DeviceTensor.from_host(x), self.ops).to_host()
        with threads.forward_threads(), reuse_freed_memory():
            return forward(self.params, cfg, x, self.ops)

    @property
    def num_params(self):
        return int(sum(v.size for v in self.params.values()))

    def __repr__(self):
        m = self.config.mamba
        return (f"EAMamba({self.config.name}, dim={self.config.dim}, blocks={list(self.config.num_blocks)}, "
                f"scan={m.scan_type or 'raster'}x{m.scan_count} {m.scan_merge_method}, "
                f"d_state={m.d_state}, params={self.num_params:,}, backend={self._backend!r})")
