"""NumPy layers of the network: convolutions, linear maps, pixel (un)shuffle, layer norms,
activations, pooling and torch-exact bicubic upsampling.

Everything is float32 in, float32 out, in PyTorch's NCHW layout ``(B, C, H, W)`` and with
PyTorch's parameter layouts (Conv2d weight ``(C_out, C_in // groups, kh, kw)``, Linear weight
``(out, in)``), so a state dict converted with ``.numpy()`` plugs straight in.

There are no Python loops over pixels: the heavy lifting is done by BLAS (matmul) or by whole-array
ufuncs on shifted views. (`kernels.cpu.gemm` computes the same convolutions and products in
cache-sized blocks, in parallel.)
"""

from __future__ import annotations

import numpy as np
from scipy.special import erfc, expit

__all__ = [
    "conv2d",
    "matmul",
    "linear",
    "pixel_shuffle",
    "pixel_unshuffle",
    "layer_norm",
    "layer_norm_channels",
    "gelu",
    "silu",
    "sigmoid",
    "relu",
    "leaky_relu",
    "softplus",
    "adaptive_avg_pool_1",
    "bicubic_upsample",
]

# --------------------------------------------------------------------------------------------
# helpers


def _f32(a, name: str) -> np.ndarray:
    """`a` as a float32 ndarray (no copy when it already is one)."""
    try:
        return np.asarray(a, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a numeric array: {e}") from None


def _check_rank(a: np.ndarray, rank: int, name: str, layout: str) -> None:
    if a.ndim != rank:
        raise ValueError(f"{name} must have rank {rank} {layout}, got shape {a.shape}")


def _positive_int(v, name: str) -> int:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return int(v)


def _pair(v, name: str) -> tuple[int, int]:
    """An int or a pair of ints >= 0, as a pair (PyTorch accepts both for `padding`)."""
    pair = tuple(v) if isinstance(v, (tuple, list)) else (v, v)
    if len(pair) != 2 or any(
        isinstance(p, (bool, np.bool_)) or not isinstance(p, (int, np.integer)) or p < 0 for p in pair
    ):
        raise ValueError(f"{name} must be a non-negative int or a pair of them, got {v!r}")
    return int(pair[0]), int(pair[1])


def _vector(v, n: int, name: str) -> np.ndarray:
    v = _f32(v, name)
    if v.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {v.shape}")
    return v


# --------------------------------------------------------------------------------------------
# convolution and linear maps


def conv_arguments(x, weight, bias, padding, groups):
    """Check conv2d's arguments; returns ``(xp, weight, bias, groups, (h_out, w_out))`` with xp the
    zero-padded float32 input ``(B, C_in, H + 2 ph, W + 2 pw)``."""
    x = _f32(x, "x")
    weight = _f32(weight, "weight")
    _check_rank(x, 4, "x", "(B, C, H, W)")
    _check_rank(weight, 4, "conv weight", "(C_out, C_in/groups, kh, kw)")
    groups = _positive_int(groups, "groups")
    ph, pw = _pair(padding, "padding")
    B, c_in, H, W = x.shape
    c_out, c_per_group, kh, kw = weight.shape
    if c_in % groups or c_out % groups:
        raise ValueError(f"groups={groups} must divide both C_in={c_in} and C_out={c_out}")
    if c_per_group != c_in // groups:
        raise ValueError(
            f"conv weight expects {c_per_group} input channels per group, "
            f"but x has C_in/groups = {c_in}/{groups} = {c_in // groups}"
        )
    if kh < 1 or kw < 1:
        raise ValueError(f"conv kernel must be at least 1x1, got {kh}x{kw}")
    h_out, w_out = H + 2 * ph - kh + 1, W + 2 * pw - kw + 1
    if h_out < 1 or w_out < 1:
        raise ValueError(f"conv kernel {kh}x{kw} is larger than the padded input {H + 2 * ph}x{W + 2 * pw}")
    if bias is not None:
        bias = _vector(bias, c_out, "conv bias")
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw))) if ph or pw else x
    return xp, weight, bias, groups, (h_out, w_out)


def conv2d(x, weight, bias=None, padding=0, groups: int = 1) -> np.ndarray:
    """2-D cross-correlation with stride 1 and zero padding, like ``torch.nn.functional.conv2d``.

    x: ``(B, C_in, H, W)``; weight: ``(C_out, C_in // groups, kh, kw)``; bias: ``(C_out,)`` or None;
    padding: int or ``(ph, pw)``. Returns ``(B, C_out, H + 2 ph - kh + 1, W + 2 pw - kw + 1)``.

    Three strategies, picked by shape:
      * 1x1 dense: one matmul over the ``(B, C_in, H*W)`` view;
      * depthwise (groups == C_in == C_out): a sum of kh*kw shifted views scaled per channel;
      * everything else: im2col from strided views times the weight matrix (grouped convolutions
        batch the groups in the same matmul).
    """
    xp, weight, bias, groups, (h_out, w_out) = conv_arguments(x, weight, bias, padding, groups)
    B, c_in = xp.shape[:2]
    c_out, _, kh, kw = weight.shape
    if kh == kw == 1 and groups == 1:
        # (C_out, C_in) @ (B, C_in, H*W): BLAS with the batch broadcast
        out = matmul(weight.reshape(c_out, c_in), xp.reshape(B, c_in, h_out * w_out))
        out = out.reshape(B, c_out, h_out, w_out)
    elif groups == c_in == c_out:
        out = depthwise(xp, weight[:, 0], h_out, w_out)
    else:
        out = im2col_conv(xp, weight, groups, h_out, w_out)
    if bias is not None:
        out += bias[:, None, None]
    return out


def depthwise(xp: np.ndarray, w: np.ndarray, h_out: int, w_out: int) -> np.ndarray:
    """Depthwise conv of the padded ``xp (B, C, Hp, Wp)`` with ``w (C, kh, kw)``: tap (i, j) adds the
    view of xp shifted by (i, j), scaled per channel. Returns ``(B, C, h_out, w_out)``."""
    kh, kw = w.shape[1:]
    taps = w[:, :, :, None, None]                  # (C, kh, kw, 1, 1): per-channel scale of each tap
    out = xp[:, :, :h_out, :w_out] * taps[:, 0, 0]
    for i in range(kh):
        for j in range(kw):
            if i or j:
                out += xp[:, :, i:i + h_out, j:j + w_out] * taps[:, i, j]
    return out


def im2col_patches(xp: np.ndarray, kh: int, kw: int, groups: int, h_out: int, w_out: int) -> np.ndarray:
    """The patches of the padded ``xp (B, C_in, Hp, Wp)`` as a strided view
    ``(B, groups, C_in/groups, kh, kw, h_out, w_out)``: element [b, g, c, i, j, y, x] is input pixel
    (y + i, x + j) of channel g*C_in/groups + c. No copy."""
    B, c_in = xp.shape[:2]
    win = np.lib.stride_tricks.sliding_window_view(xp, (kh, kw), axis=(2, 3))  # (B, C, h, w, kh, kw)
    return win.reshape(B, groups, c_in // groups, h_out, w_out, kh, kw).transpose(0, 1, 2, 5, 6, 3, 4)


def im2col_conv(xp: np.ndarray, weight: np.ndarray, groups: int, h_out: int, w_out: int) -> np.ndarray:
    """General (grouped) conv of the padded ``xp (B, C_in, Hp, Wp)`` as im2col + matmul: the patch
    matrix ``(B, groups, C_in/groups * kh * kw, pixels)`` times the weights ``(groups, C_out/groups,
    C_in/groups * kh * kw)``. Returns ``(B, C_out, h_out, w_out)``."""
    B = xp.shape[0]
    c_out, cg, kh, kw = weight.shape
    k = cg * kh * kw
    patches = im2col_patches(xp, kh, kw, groups, h_out, w_out).reshape(B, groups, k, h_out * w_out)
    out = matmul(weight.reshape(groups, c_out // groups, k), patches)
    return out.reshape(B, c_out, h_out, w_out)


def matmul(a, b, pixels: str = "columns") -> np.ndarray:
    """``np.matmul(a, b)`` in float32 (batch axes broadcast).

    pixels: 'columns' or 'rows', where the pixels of the product are (the last axis, ``W @ X``, or
    the second-last, ``X @ W``). The result does not depend on it: it tells a kernel that computes
    the product in blocks of pixels (`kernels.cpu.gemm.matmul`) where to cut.
    """
    if pixels not in ("columns", "rows"):
        raise ValueError(f"pixels must be 'columns' or 'rows', got {pixels!r}")
    a = _f32(a, "a")
    b = _f32(b, "b")
    if a.ndim < 2 or b.ndim < 2 or a.shape[-1] != b.shape[-2]:
        raise ValueError(f"matmul needs (..., M, K) @ (..., K, N), got {a.shape} @ {b.shape}")
    return np.matmul(a, b)


def linear(x, weight, bias=None) -> np.ndarray:
    """``x @ weight.T + bias`` over the last axis, like ``torch.nn.functional.linear``.

    x: ``(..., in)``; weight: ``(out, in)``; bias: ``(out,)`` or None. Returns ``(..., out)``.
    """
    x = _f32(x, "x")
    weight = _f32(weight, "weight")
    _check_rank(weight, 2, "linear weight", "(out, in)")
    if x.ndim < 1:
        raise ValueError("x must have at least one axis (..., in)")
    n_out, n_in = weight.shape
    if x.shape[-1] != n_in:
        raise ValueError(f"linear weight expects {n_in} input features, x has {x.shape[-1]} (shape {x.shape})")
    # weight.T is a transposed view: BLAS reads it as is, without a copy.
    out = np.matmul(x.reshape(-1, n_in), weight.T).reshape(*x.shape[:-1], n_out)
    if bias is not None:
        out += _vector(bias, n_out, "linear bias")
    return out


# --------------------------------------------------------------------------------------------
# pixel (un)shuffle


def pixel_shuffle(x, r: int) -> np.ndarray:
    """``(B, C*r*r, H, W) -> (B, C, H*r, W*r)``, like ``torch.nn.PixelShuffle(r)``.

    out[b, c, h*r + i, w*r + j] = x[b, c*r*r + i*r + j, h, w]. Any dtype; it is kept.
    """
    x = np.asarray(x)
    r = _positive_int(r, "r")
    _check_rank(x, 4, "x", "(B, C, H, W)")
    B, C, H, W = x.shape
    if C % (r * r):
        raise ValueError(f"pixel_shuffle needs C divisible by r*r = {r * r}, got C = {C}")
    c = C // (r * r)
    y = x.reshape(B, c, r, r, H, W).transpose(0, 1, 4, 2, 5, 3)
    return np.ascontiguousarray(y.reshape(B, c, H * r, W * r))


def pixel_unshuffle(x, r: int) -> np.ndarray:
    """``(B, C, H*r, W*r) -> (B, C*r*r, H, W)``, like ``torch.nn.PixelUnshuffle(r)``; inverse of
    :func:`pixel_shuffle`. Any dtype; it is kept."""
    x = np.asarray(x)
    r = _positive_int(r, "r")
    _check_rank(x, 4, "x", "(B, C, H, W)")
    B, C, H, W = x.shape
    if H % r or W % r:
        raise ValueError(f"pixel_unshuffle needs H and W divisible by r = {r}, got {H}x{W}")
    h, w = H // r, W // r
    y = x.reshape(B, C, h, r, w, r).transpose(0, 1, 3, 5, 2, 4)
    return np.ascontiguousarray(y.reshape(B, C * r * r, h, w))


# --------------------------------------------------------------------------------------------
# normalisation


def layer_norm(x, weight, bias=None, eps: float = 1e-5, axis: int = -1) -> np.ndarray:
    """Layer norm over one axis with the biased variance (``unbiased=False``).

    With bias (WithBias / ``nn.LayerNorm``): ``(x - mean) / sqrt(var + eps) * weight + bias``.
    Without (the official BiasFree variant): ``x / sqrt(var + eps) * weight``: x is *not*
    centred, although var is computed around the mean.
    x: any shape; weight, bias: ``(x.shape[axis],)``. Returns x's shape.
    """
    x = _f32(x, "x")
    if x.ndim == 0:
        raise ValueError("x must have at least one axis")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis {axis} is out of range for x of shape {x.shape}")
    axis %= x.ndim
    n = x.shape[axis]
    # parameters broadcast along `axis`, e.g. (C, 1, 1) for the channels of (B, C, H, W)
    bshape = (n,) + (1,) * (x.ndim - 1 - axis)
    weight = _vector(weight, n, "layer_norm weight").reshape(bshape)
    eps = np.float32(eps)

    centred = x - x.mean(axis=axis, keepdims=True)
    var = np.square(centred).mean(axis=axis, keepdims=True)
    inv_std = np.sqrt(var + eps)
    np.reciprocal(inv_std, out=inv_std)
    if bias is None:
        out = np.multiply(x, inv_std, out=centred)  # reuse the buffer; the centred values are not needed
    else:
        out = np.multiply(centred, inv_std, out=centred)
    out *= weight
    if bias is not None:
        out += _vector(bias, n, "layer_norm bias").reshape(bshape)
    return out


def layer_norm_channels(x, weight, bias=None, eps: float = 1e-5) -> np.ndarray:
    """The blocks' LayerNorm: normalise over C at every pixel of ``x (B, C, H, W)``.

    weight, bias: ``(C,)``; bias None is the BiasFree variant (see :func:`layer_norm`).
    Equal to the official to_3d -> LayerNorm(C) -> to_4d, without the transposes.
    """
    x = _f32(x, "x")
    _check_rank(x, 4, "x", "(B, C, H, W)")
    return layer_norm(x, weight, bias, eps=eps, axis=1)


# --------------------------------------------------------------------------------------------
# activations (element-wise, any shape)


def gelu(x) -> np.ndarray:
    """Exact GELU, ``x * Phi(x) = x/2 * (1 + erf(x / sqrt 2))`` (torch's default ``nn.GELU()``).

    Written as ``x/2 * erfc(-x / sqrt 2)``: for x << 0, ``1 + erf`` cancels to a few float32 ulps
    (relative errors up to 100%, which PyTorch's float32 GELU has), erfc keeps ~1e-6 relative accuracy.
    """
    x = _f32(x, "x")
    out = erfc(x * np.float32(-1.0 / np.sqrt(2.0)))
    out *= x
    out *= np.float32(0.5)
    return out


def sigmoid(x) -> np.ndarray:
    """``1 / (1 + exp(-x))``, computed without overflow for large |x|."""
    return expit(_f32(x, "x"))


def silu(x) -> np.ndarray:
    """SiLU / swish, ``x * sigmoid(x)``."""
    x = _f32(x, "x")
    out = expit(x)
    out *= x
    return out


def relu(x) -> np.ndarray:
    """``max(x, 0)``."""
    return np.maximum(_f32(x, "x"), np.float32(0.0))


def leaky_relu(x, negative_slope: float = 0.01) -> np.ndarray:
    """``x`` where x > 0, else ``negative_slope * x`` (``nn.LeakyReLU`` default slope 0.01)."""
    x = _f32(x, "x")
    return np.where(x > 0, x, x * np.float32(negative_slope))


def softplus(x, beta: float = 1.0, threshold: float = 20.0) -> np.ndarray:
    """``log(1 + exp(beta x)) / beta``, and the identity where ``beta x > threshold``
    (torch's ``F.softplus``, and the CUDA selective-scan kernel's delta_softplus at threshold 20)."""
    x = _f32(x, "x")
    beta, threshold = np.float32(beta), np.float32(threshold)
    bx = x * beta
    # clip before exp: the clipped lanes are replaced by x anyway, and this avoids overflow
    soft = np.log1p(np.exp(np.minimum(bx, threshold)))
    if beta != 1:
        soft /= beta
    return np.where(bx > threshold, x, soft)


# --------------------------------------------------------------------------------------------
# pooling and resampling


def adaptive_avg_pool_1(x) -> np.ndarray:
    """Global average over H, W: ``(B, C, H, W) -> (B, C, 1, 1)`` (``nn.AdaptiveAvgPool2d(1)``)."""
    x = _f32(x, "x")
    _check_rank(x, 4, "x", "(B, C, H, W)")
    B, C = x.shape[:2]
    # one flat axis: NumPy then sums pairwise, accurate in float32
    return x.reshape(B, C, -1).mean(axis=-1).reshape(B, C, 1, 1)


_CUBIC_A = np.float32(-0.75)  # PyTorch's (and OpenCV's) cubic convolution parameter


def _cubic_taps(n_in: int, n_out: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Source indices ``(n_out, 4)`` (clamped to the input) and weights ``(n_out, 4)`` along one axis.

    Follows PyTorch's CPU ``upsample_bicubic2d`` with ``align_corners=False`` and a given
    ``scale_factor`` (recompute_scale_factor None): the step is ``1 / scale`` (not n_in / n_out), the
    source coordinate ``src = (dst + 0.5) / scale - 0.5`` is computed in float32 and not clamped, its
    four taps are ``floor(src) - 1 .. floor(src) + 2`` with out-of-range indices clamped to the border.
    """
    step = np.float32(1.0 / scale)
    src = step * (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
    base = np.minimum(np.floor(src), np.float32(n_in - 1))
    t = np.clip(src - base, np.float32(0.0), np.float32(1.0))  # the fractional offset, lambda
    idx = np.clip(base.astype(np.int64)[:, None] + np.arange(-1, 3), 0, n_in - 1)

    a = _CUBIC_A
    s = 1 - t  # distance to the right neighbour

    def near(d):  # kernel for |d| <= 1
        return ((a + 2) * d - (a + 3)) * d * d + 1

    def far(d):  # kernel for 1 < |d| < 2
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

    w = np.stack([far(t + 1), near(t), near(s), far(s + 1)], axis=1).astype(np.float32)
    return idx, w


def _cubic_1d(x: np.ndarray, idx: np.ndarray, w: np.ndarray, axis: int) -> np.ndarray:
    """Resample `x` along `axis` with 4-tap indices/weights ``(n_out, 4)``; taps summed in order."""
    shape = [1] * x.ndim
    shape[axis] = len(w)
    out = np.take(x, idx[:, 0], axis=axis)
    out *= w[:, 0].reshape(shape)
    for k in range(1, 4):
        out += np.take(x, idx[:, k], axis=axis) * w[:, k].reshape(shape)
    return out


def bicubic_upsample(x, scale) -> np.ndarray:
    """Bicubic resize by ``scale``, equal to ``F.interpolate(x, scale_factor=scale, mode='bicubic',
    align_corners=False)`` (no antialiasing).

    x: ``(B, C, H, W)``; scale: a positive number (the project uses the integers 2, 3, 4).
    Returns ``(B, C, floor(H * scale), floor(W * scale))``. Separable: W first, then H, which is
    the same order of sums as PyTorch's kernel (rows inside, columns outside).
    """
    x = _f32(x, "x")
    _check_rank(x, 4, "x", "(B, C, H, W)")
    try:
        scale = float(scale)
    except (TypeError, ValueError):
        raise ValueError(f"scale must be a positive number, got {scale!r}") from None
    if not np.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive number, got {scale!r}")
    H, W = x.shape[2:]
    h_out, w_out = int(np.floor(H * scale)), int(np.floor(W * scale))
    if h_out < 1 or w_out < 1:
        raise ValueError(f"scale {scale} leaves no output pixels for an input of {H}x{W}")
    y = _cubic_1d(x, *_cubic_taps(W, w_out, scale), axis=3)
    return _cubic_1d(y, *_cubic_taps(H, h_out, scale), axis=2)
