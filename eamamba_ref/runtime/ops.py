"""The functions the forward pass calls, for either device.

`model.py` and `mhssm.py` are written once, in NumPy style, against this module. Each function
looks at its (first) array argument: a NumPy array goes to the CPU implementation (`layers`,
`scans`, `ssm`, NumPy itself), a `gpu.DeviceTensor` to the numba.cuda one in `gpu.tensor`, so the
activations of a GPU run stay on the GPU from the first layer to the last. numba.cuda is imported
only when a DeviceTensor shows up, so the CPU path never needs it.
"""
from __future__ import annotations

import numpy as np

from eamamba_ref.reference import layers, scans
from eamamba_ref.runtime import backends as ssm, trace


def _gpu(x):
    """The GPU module for a DeviceTensor argument, None for NumPy input."""
    if isinstance(x, np.ndarray):
        return None
    from eamamba_ref.kernels.cuda import tensor
    if isinstance(x, tensor.DeviceTensor):
        return tensor
    raise TypeError(f"expected a NumPy array or a DeviceTensor, got {type(x).__name__}")


def _dispatch(name, cpu_module, cpu_name=None):
    """A function `name` that runs `cpu_module.cpu_name` on NumPy input and `gpu.tensor.name` on a
    DeviceTensor. The CPU function is looked up at each call, not bound here, so that wrapping it
    (benchmarks/bench_model.py's per-stage timers do) takes effect."""
    cpu_name = cpu_name or name

    def function(x, *args, **kwargs):
        gpu = _gpu(x)
        implementation = getattr(cpu_module, cpu_name) if gpu is None else getattr(gpu, name)
        return implementation(x, *args, **kwargs)
    function.__name__ = name
    function.__doc__ = f"`{cpu_module.__name__}.{cpu_name}` on either device."
    return function


# Same signature on both devices; the first argument picks the device.
conv2d = _dispatch("conv2d", layers)
layer_norm = _dispatch("layer_norm", layers)
pixel_shuffle = _dispatch("pixel_shuffle", layers)
pixel_unshuffle = _dispatch("pixel_unshuffle", layers)
silu = _dispatch("silu", layers)
gelu = _dispatch("gelu", layers)
sigmoid = _dispatch("sigmoid", layers)
relu = _dispatch("relu", layers)
leaky_relu = _dispatch("leaky_relu", layers)
adaptive_avg_pool_1 = _dispatch("adaptive_avg_pool_1", layers)
exp = _dispatch("exp", np)
contiguous = _dispatch("contiguous", np, "ascontiguousarray")
all_around = _dispatch("all_around", scans)
restore = _dispatch("restore", scans)
selective_scan = _dispatch("selective_scan", ssm)


def layer_norm_channels(x, weight, bias=None, eps=1e-5, backend=None):
    """`layers.layer_norm_channels` on either device; with the 'numba' backend (the default) the
    CPU runs the parallel kernel of `cpu_kernels` instead of NumPy."""
    gpu = _gpu(x)
    if gpu is not None:
        return gpu.layer_norm_channels(x, weight, bias, eps)
    if ssm.resolve_backend(backend) == "numba":
        from eamamba_ref.kernels.cpu import norms as cpu_kernels
        return cpu_kernels.layer_norm_channels(x, weight, bias, eps)
    return layers.layer_norm_channels(x, weight, bias, eps)


def matmul(a, b):
    """``a @ b``; b (the activations) picks the device, a (a weight) must live on the same one."""
    gpu = _gpu(b)
    return layers.matmul(a, b) if gpu is None else gpu.matmul(a, b)


def concatenate(arrays, axis=0):
    """``np.concatenate`` on either device."""
    gpu = _gpu(arrays[0])
    return np.concatenate(arrays, axis=axis) if gpu is None else gpu.concatenate(arrays, axis=axis)


def by_row_strips(fn, x, pixels=16384):
    """`fn(x)` for a per-pixel `fn` (1x1 convs and element-wise operations only), computed on the
    CPU over strips of about `pixels` pixels (whole rows), so that fn's intermediates exist one strip
    at a time: the FFN's 2C-channel hidden map is the largest tensor of a full-resolution block
    (256 MiB at 512x512 with C = 128). On the GPU: `fn(x)`. x: `(B, C, H, W)` -> `(B, C', H, W)`.
    A trace records what fn records as whole maps, assembled from the strips (`trace.row_strip`).
    """
    B, C, H, W = x.shape
    rows = max(1, pixels // W)
    if _gpu(x) is not None or rows >= H:
        return fn(x)
    out = None
    for r0 in range(0, H, rows):
        with trace.row_strip(r0, H):
            part = fn(np.ascontiguousarray(x[:, :, r0:r0 + rows]))
        if out is None:
            out = np.empty((B, part.shape[1], H, W), dtype=part.dtype)
        out[:, :, r0:r0 + rows] = part
    return out
