"""Parallel Numba CPU kernels, each with the signature of the reference function it replaces."""
