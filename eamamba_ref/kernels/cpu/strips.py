"""The blocks' feed-forward part computed a strip of rows at a time: the 'numba' backend's
`channel_mixer` (same arguments and result as `reference.model.channel_mixer`).

The 'simple' and 'ffn' mixers act on every pixel separately (1x1 convs and element-wise
operations), so they can run over strips of whole rows, and their intermediates then exist one
strip at a time: the FFN's 2C-channel hidden map is the largest tensor of a full-resolution block
(256 MiB at 512x512 with C = 128). The other mixers have a 3x3 depthwise conv and run whole.
"""
from __future__ import annotations

import numpy as np

from eamamba_ref.reference.hooks import row_strip
from eamamba_ref.reference.model import channel_mixer as reference_channel_mixer

PER_PIXEL = ("simple", "ffn")
STRIP_PIXELS = 16384          # about this many pixels (whole rows) per strip


def channel_mixer(p, x, kind, ops, pixels=STRIP_PIXELS):
    """`reference.model.channel_mixer` on `x (B, C, H, W)`, over strips of about `pixels` pixels
    for the per-pixel kinds. A trace records whole maps, assembled from the strips
    (`reference.hooks.row_strip`)."""
    B, C, H, W = x.shape
    rows = max(1, pixels // W)
    if kind not in PER_PIXEL or rows >= H:
        return reference_channel_mixer(p, x, kind, ops)
    out = None
    for r0 in range(0, H, rows):
        with row_strip(r0, H):
            part = reference_channel_mixer(p, np.ascontiguousarray(x[:, :, r0:r0 + rows]), kind, ops)
        if out is None:
            out = np.empty((B, part.shape[1], H, W), dtype=part.dtype)
        out[:, :, r0:r0 + rows] = part
    return out
