"""Fast versions of reference functions: `cpu` (Numba, parallel) and `cuda` (numba.cuda)."""
