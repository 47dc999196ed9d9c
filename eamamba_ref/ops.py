"""The functions the forward pass calls, for either device.

`model.py` and `mhssm.py` are written once, in NumPy style, against this module. Each function
looks at its (first) array argument: a NumPy array goes to the CPU implementation (`layers`,
`scans`, `ssm`, NumPy itself), a `gpu.DeviceTensor` to the numba.cuda one in `gpu.tensor`, so the
activations of a GPU run stay on the GPU from the first layer to the last. numba.cuda is imported
only when a DeviceTensor shows up, so the CPU path never needs it.
"""
from __future__ import annotations

import numpy as np

from . import layers, scans, ssm


def _gpu(x):
    """The GPU module for a DeviceTensor argument, None for NumPy input."""
    if isinstance(x, np.ndarray):
        return None
    from .gpu import tensor
    if isinstance(x, tensor.DeviceTensor):
        return tensor
    raise TypeError(f"expected a NumPy array or a DeviceTensor, got {type(x).__name__}")


def _dispatch(name, cpu_function):
    def function(x, *args, **kwargs):
        gpu = _gpu(x)
        return cpu_function(x, *args, **kwargs) if gpu is None else getattr(gpu, name)(x, *args, **kwargs)
    function.__name__ = name
    function.__doc__ = f"`{cpu_function.__module__}.{cpu_function.__name__}` on either device."
    return function


# Same signature on both devices; the first argument picks the device.
conv2d = _dispatch("conv2d", layers.conv2d)
layer_norm = _dispatch("layer_norm", layers.layer_norm)
layer_norm_channels = _dispatch("layer_norm_channels", layers.layer_norm_channels)
pixel_shuffle = _dispatch("pixel_shuffle", layers.pixel_shuffle)
pixel_unshuffle = _dispatch("pixel_unshuffle", layers.pixel_unshuffle)
silu = _dispatch("silu", layers.silu)
gelu = _dispatch("gelu", layers.gelu)
sigmoid = _dispatch("sigmoid", layers.sigmoid)
relu = _dispatch("relu", layers.relu)
leaky_relu = _dispatch("leaky_relu", layers.leaky_relu)
adaptive_avg_pool_1 = _dispatch("adaptive_avg_pool_1", layers.adaptive_avg_pool_1)
exp = _dispatch("exp", np.exp)
contiguous = _dispatch("contiguous", np.ascontiguousarray)
all_around = _dispatch("all_around", scans.all_around)
restore = _dispatch("restore", scans.restore)
selective_scan = _dispatch("selective_scan", ssm.selective_scan)


def matmul(a, b):
    """``a @ b``; b (the activations) picks the device, a (a weight) must live on the same one."""
    gpu = _gpu(b)
    return np.matmul(a, b) if gpu is None else gpu.matmul(a, b)


def concatenate(arrays, axis=0):
    """``np.concatenate`` on either device."""
    gpu = _gpu(arrays[0])
    return np.concatenate(arrays, axis=axis) if gpu is None else gpu.concatenate(arrays, axis=axis)
