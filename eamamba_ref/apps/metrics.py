"""PSNR and SSIM with the official protocol (test.py of daidaijr/EAMamba).

- PSNR: on [0, 1] values, mean squared error over all pixels and channels, prediction clipped.
- SSIM: on the 0-255 scale, 11x11 gaussian window with sigma 1.5, 'valid' filtering (no padding),
  constants (0.01*255)^2 and (0.03*255)^2, averaged over pixels and channels. scikit-image's
  `structural_similarity` with gaussian weights, sigma 1.5 and population covariance computes
  exactly that (its cropped border equals the valid region), so it is used as is.
- SR: both on the Y channel of ITU-R BT.601 YCbCr (the official rgb2ycbcr), with `scale` pixels
  shaved from every border.
Images are `(H, W, C)` float arrays in [0, 1].
"""
from __future__ import annotations

import numpy as np
from skimage.metrics import structural_similarity

_Y_WEIGHTS = np.array([65.481, 128.553, 24.966]) / 255.0


def rgb_to_y(img):
    """`(H, W, 3)` RGB in [0, 1] -> `(H, W, 1)` luma in [0, 1] (16/255 .. 235/255), as the official code."""
    return (img.astype(np.float64) @ _Y_WEIGHTS + 16.0 / 255.0)[..., None]


def _prepare(pred, gt, y_only, border):
    pred = np.clip(np.asarray(pred, np.float64), 0.0, 1.0)
    gt = np.asarray(gt, np.float64)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape")
    if y_only:
        pred, gt = rgb_to_y(pred), rgb_to_y(gt)
    if border:
        pred, gt = pred[border:-border, border:-border], gt[border:-border, border:-border]
    return pred, gt


def psnr(pred, gt, y_only=False, border=0):
    pred, gt = _prepare(pred, gt, y_only, border)
    mse = np.mean((pred - gt) ** 2)
    return float(10 * np.log10(1.0 / max(mse, 1e-20)))


def ssim(pred, gt, y_only=False, border=0):
    pred, gt = _prepare(pred, gt, y_only, border)
    return float(structural_similarity(pred * 255.0, gt * 255.0, channel_axis=2, data_range=255.0,
                                       gaussian_weights=True, sigma=1.5, use_sample_covariance=False))
