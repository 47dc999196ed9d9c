"""The two halves of a MambaFormer block, each fused with its LayerNorm and its residual add: the
'numba' backend's `block_mhssm` (`x + MHSSM(norm1(x))`) and `block_ffn` (`x + FFN(norm2(x))`),
same arguments and result as `reference.model`'s.

Composed plainly, each half streams full-resolution maps through memory several times: the
LayerNorm writes a normalised copy of x, the GEMM reads it back, the FFN writes its 2C-channel
hidden map and reads it again for the gate, the gate writes its product, and the residual add
reads two maps and writes a third, single-threaded. Two cores share the memory bandwidth of
about 1.4 cores (docs/performance.md), so these passes, not the FLOPs, set the time of the
cheap stages. Here the LayerNorm is computed per block of pixels right before the GEMM that
reads it, the FFN runs whole on a block of pixels while its intermediates stay in cache, and
the residual is added to each block as it is written. Measured on (1, 64, 128, 128): the FFN
half 10.3 -> 6.0 ms, same bits.

The bits are those of the plain composition on the same backend (every pixel's LayerNorm is the
same arithmetic whatever its tile, every block the same BLAS call): tests/test_halves.py
checks it bit for bit. While a trace records, the plain composition runs instead, so that every
official stage is recorded (`reference.hooks`); its values are the bits the fused halves compute.
"""
from __future__ import annotations

import numpy as np

from eamamba_ref.kernels.cpu.fused import fusable, mhssm_core
from eamamba_ref.kernels.cpu.gemm import pixel_blocks, pixels_suffice, serial_for
from eamamba_ref.kernels.cpu.norms import normalised_tile, tile_arguments
from eamamba_ref.reference.hooks import is_recording
from eamamba_ref.reference.model import block_ffn as reference_block_ffn
from eamamba_ref.reference.model import block_mhssm as reference_block_mhssm
from eamamba_ref.reference.model import channel_mixer, sub
from eamamba_ref.reference.ops import NUMPY

PER_PIXEL = ("simple", "ffn")      # the FFN kinds that act on every pixel separately (no 3x3 conv)
EPS = 1e-5                         # the blocks' LayerNorm eps (`layers.layer_norm_channels`)

__all__ = ["block_mhssm", "block_ffn"]


def _norm(p, name):
    """(weight, bias or None, eps) of the blocks' LayerNorm `name` (BiasFree without a bias)."""
    return p[f"{name}.body.weight"], p.get(f"{name}.body.bias"), EPS


def block_mhssm(p, x, cfg, ops, *, parallel_for=serial_for):
    """`reference.model.block_mhssm`: `x + MHSSM(norm1(x))` on `(B, C, H, W)`, the LayerNorm done
    by in_proj's blocks and the residual by out_proj's (`fused.mhssm_core`)."""
    if is_recording() or not fusable(cfg.mamba):
        return reference_block_mhssm(p, x, cfg, ops)
    B, C, H, W = x.shape
    out = mhssm_core(sub(p, "mamba"), x.reshape(B, C, H * W), (H, W), cfg.mamba, ops, parallel_for,
                     norm=_norm(p, "norm1"), residual=True)
    return out.reshape(B, C, H, W)


def block_ffn(p, x, cfg, ops, *, parallel_for=serial_for):
    """`reference.model.block_ffn`: `x + FFN(norm2(x))` on `(B, C, H, W)`, one block of pixels per
    task: its LayerNorm, the whole per-pixel FFN (`reference.model.channel_mixer` on the NumPy
    layers, one-thread BLAS on a `(1, C, 1, n)` tile) and the residual add, in cache.

    Other FFN kinds (a 3x3 conv mixes neighbouring pixels) and maps too small to give every
    thread a block run the plain composition (a choice made from the shapes alone)."""
    B, C, H, W = x.shape
    L = H * W
    kind = cfg.channel_mixer_type
    if is_recording() or kind not in PER_PIXEL or not pixels_suffice(L):
        return reference_block_ffn(p, x, cfg, ops)
    x = np.ascontiguousarray(x, dtype=np.float32)
    flat = x.reshape(B, C, L)
    out = np.empty_like(flat)
    norm = tile_arguments(*_norm(p, "norm2"))
    ffn = sub(p, "ffn")
    tasks = [(b, p) for b in range(B) for p in pixel_blocks(L)]

    def task(i):
        b, p = tasks[i]
        n = p.stop - p.start
        tile = normalised_tile(flat[b], p.start, p.stop, norm)                   # (C, n)
        mixed = channel_mixer(ffn, tile.reshape(1, C, 1, n), kind, NUMPY)         # (1, C, 1, n)
        np.add(flat[b, :, p], mixed.reshape(C, n), out=out[b, :, p])

    parallel_for(task, len(tasks))
    return out.reshape(B, C, H, W)
