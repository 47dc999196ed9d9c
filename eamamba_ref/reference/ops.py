"""The table of functions a forward pass calls, and the reference's own table, `NUMPY`.

`model.py` and `mhssm.py` never call a layer directly: they call `ops.conv2d(...)`,
`ops.mhssm(...)`, ... on the table they are given. A backend is one such table, bound once when
a model is made (`runtime.backends.table`): 'numpy' is `NUMPY` below, so the model runs exactly
the code of this folder; 'numba' replaces some entries with the parallel CPU kernels of
`kernels.cpu` (same signatures, tested against these functions); 'cuda' replaces every entry with
a numba.cuda one working on GPU arrays.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

from eamamba_ref.reference import layers, mhssm, model, scans, ssm


class Ops(NamedTuple):
    """One backend: a function per operation of the forward pass (arrays are `(B, C, H, W)` maps
    or `(B, C, L)` token sequences, channel-first)."""
    conv2d: Callable               # (x, weight, bias=None, padding=0, groups=1)     layers.conv2d
    matmul: Callable               # (a, b, pixels='columns')                       layers.matmul
    layer_norm: Callable           # (x, weight, bias=None, eps=1e-5, axis=-1)      layers.layer_norm
    layer_norm_channels: Callable  # (x, weight, bias=None, eps=1e-5)               the blocks' norms
    silu: Callable
    gelu: Callable
    sigmoid: Callable
    relu: Callable
    leaky_relu: Callable           # (x, negative_slope=0.01)
    adaptive_avg_pool_1: Callable  # (B, C, H, W) -> (B, C, 1, 1)
    pixel_shuffle: Callable        # (x, r)
    pixel_unshuffle: Callable      # (x, r)
    exp: Callable
    contiguous: Callable           # a C-contiguous copy, or the array itself
    concatenate: Callable          # (arrays, axis=0)
    all_around: Callable           # (x, size, scan_type, scan_count, merge)        scans.all_around
    restore: Callable              # (y, size, scan_type, scan_count, merge)        scans.restore
    selective_scan: Callable       # (u, delta, A, B, C, D=None, z=None, delta_bias=None,
                                   #  delta_softplus=False, return_last_state=False) ssm.selective_scan
    mhssm: Callable                # (p, x, size, cfg, ops)                          mhssm.mhssm
    channel_mixer: Callable        # (p, x, kind, ops)                               model.channel_mixer
    block_mhssm: Callable          # (p, x, cfg, ops): x + MHSSM(norm1(x))           model.block_mhssm
    block_ffn: Callable            # (p, x, cfg, ops): x + FFN(norm2(x))             model.block_ffn


NUMPY = Ops(
    conv2d=layers.conv2d,
    matmul=layers.matmul,
    layer_norm=layers.layer_norm,
    layer_norm_channels=layers.layer_norm_channels,
    silu=layers.silu,
    gelu=layers.gelu,
    sigmoid=layers.sigmoid,
    relu=layers.relu,
    leaky_relu=layers.leaky_relu,
    adaptive_avg_pool_1=layers.adaptive_avg_pool_1,
    pixel_shuffle=layers.pixel_shuffle,
    pixel_unshuffle=layers.pixel_unshuffle,
    exp=np.exp,
    contiguous=np.ascontiguousarray,
    concatenate=np.concatenate,
    all_around=scans.all_around,
    restore=scans.restore,
    selective_scan=ssm.selective_scan,
    mhssm=mhssm.mhssm,
    channel_mixer=model.channel_mixer,
    block_mhssm=model.block_mhssm,
    block_ffn=model.block_ffn,
)
