"""The whole model on a GPU: numba.cuda kernels (`kernels`) behind a small NumPy-style array type
(`tensor.DeviceTensor`). Importing this package imports numba.cuda; the CPU path never does."""
from eamamba_ref.kernels.cuda.tensor import DeviceTensor

__all__ = ["DeviceTensor"]
