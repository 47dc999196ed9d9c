"""Images in and out: PNG, JPEG, TIFF (8 and 16 bit), grayscale / RGB / RGBA, written atomically.

Decoding and encoding go through maintained libraries: imageio (Pillow) for 8-bit files, tifffile
for TIFF, and pypng for 16-bit PNG -- Pillow silently truncates 16-bit RGB PNGs to 8 bits, which
would be a silently wrong image.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from .atomic import atomic_output, check_destination


class ImageError(ValueError):
    """An image that cannot be read, or an image/request that does not fit."""


@dataclass
class Image:
    """A decoded image.

    pixels: float32 `(H, W, C)` in [0, 1], C = 1 (grayscale) or 3 (RGB).
    alpha:  the alpha channel `(H, W)` exactly as stored (passed through untouched), or None.
    bit_depth: 8 or 16 (what the output is written in).
    """
    pixels: np.ndarray
    alpha: np.ndarray | None
    bit_depth: int
    path: str = ""

    @property
    def height(self):
        return self.pixels.shape[0]

    @property
    def width(self):
        return self.pixels.shape[1]


def _is_png16(path):
    with open(path, "rb") as f:
        head = f.read(26)
    return head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR" and head[24] == 16


def _decode(path):
    ext = os.path.splitext(path)[1].lower()
    if ext in (".tif", ".tiff"):
        import tifffile
        return tifffile.imread(path)
    if _is_png16(path):
        import png
        width, height, rows, info = png.Reader(filename=path).asDirect()
        planes = info["planes"]
        data = np.vstack([np.asarray(r, dtype=np.uint16) for r in rows])
        return data.reshape(height, width, planes) if planes > 1 else data.reshape(height, width)
    import imageio.v3 as iio
    return iio.imread(path)


def read_image(path):
    """Decode `path` into an `Image`; one-line `ImageError` for anything that is not a usable image."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ImageError(f"{path}: no such file")
    try:
        data = np.asarray(_decode(path))
    except Exception as err:                      # decoders raise many types; the message matters
        raise ImageError(f"{path}: cannot read image ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'unreadable'})") from None
    if data.dtype == np.uint8:
        bit_depth, scale = 8, 255.0
    elif data.dtype == np.uint16:
        bit_depth, scale = 16, 65535.0
    else:
        raise ImageError(f"{path}: unsupported pixel type {data.dtype} (8- or 16-bit images only)")
    if data.ndim == 2:
        data = data[..., None]
    if data.ndim != 3 or data.shape[2] not in (1, 2, 3, 4) or min(data.shape[:2]) < 1:
        raise ImageError(f"{path}: unsupported image layout {data.shape} (grayscale, RGB or RGBA images only)")
    alpha = None
    if data.shape[2] in (2, 4):                  # gray+alpha or RGBA: keep alpha aside, untouched
        alpha = data[..., -1].copy()
        data = data[..., :-1]
    pixels = data.astype(np.float32) / np.float32(scale)
    return Image(pixels=pixels, alpha=alpha, bit_depth=bit_depth, path=path)


def to_integer(pixels, bit_depth):
    """float `(H, W, C)` in [0, 1] -> uint8/uint16, clipped and rounded."""
    top = 255.0 if bit_depth == 8 else 65535.0
    dtype = np.uint8 if bit_depth == 8 else np.uint16
    return np.round(np.clip(pixels, 0.0, 1.0) * top).astype(dtype)


def write_image(path, pixels, bit_depth=8, alpha=None, overwrite=False):
    """Encode float `(H, W, C)` pixels (C = 1 or 3) in [0, 1] to `path`, atomically.

    The file appears complete or not at all (`atomic.atomic_output`). An existing file is never
    replaced unless `overwrite`. `alpha` `(H, W)` is appended as stored (its size must
    match). The format follows the extension: .png, .jpg/.jpeg (8-bit only), .tif/.tiff.
    """
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".png", ".jpg", ".jpeg", ".tif", ".tiff"):
        raise ImageError(f"{path}: unsupported output format {ext or '(none)'} (use .png, .jpg or .tif)")
    check_destination(path, overwrite, error=ImageError)     # before encoding: fail fast
    if ext in (".jpg", ".jpeg") and (bit_depth != 8 or alpha is not None):
        raise ImageError(f"{path}: JPEG holds 8-bit images without alpha; write .png or .tif instead")
    data = to_integer(pixels, bit_depth)
    if alpha is not None:
        if alpha.shape != data.shape[:2]:
            raise ImageError(f"alpha channel {alpha.shape} does not match the image {data.shape[:2]}")
        data = np.concatenate([data, alpha.astype(data.dtype)[..., None]], axis=2)
    if data.shape[2] == 1:
        data = data[..., 0]

    with atomic_output(path, overwrite, error=ImageError) as tmp:
        if ext in (".tif", ".tiff"):
            import tifffile
            tifffile.imwrite(tmp, data)
        elif ext == ".png" and bit_depth == 16:
            import png
            planes = 1 if data.ndim == 2 else data.shape[2]
            mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[planes] + ";16"
            png.from_array(data.reshape(data.shape[0], -1), mode).save(tmp)
        else:
            import imageio.v3 as iio
            kwargs = {"quality": 95} if ext in (".jpg", ".jpeg") else {}
            iio.imwrite(tmp, data, extension=ext, **kwargs)
