"""Images in and out: PNG, JPEG, TIFF (8 and 16 bit), grayscale / RGB / RGBA, written atomically.

Decoding and encoding go through maintained libraries: Pillow for 8-bit files (PNG, JPEG, GIF,
BMP, WebP, ...), tifffile for TIFF, and pypng for 16-bit PNG -- Pillow silently truncates 16-bit
RGB PNGs to 8 bits, which would be a silently wrong image. Every reader then gives the same thing:
the image as it is meant to be displayed, in gray or RGB, with its transparency as an alpha channel:

- the pixel count is checked against `max_pixels` from the file's header, before anything is
  decoded (a small compressed file can declare a huge image);
- EXIF / TIFF orientation is applied, so the pixels are in display orientation (and written so);
- CMYK (JPEG, TIFF) is converted to RGB (uncalibrated: R = (1 - C)(1 - K), no colour profile);
  palettes become RGB, a palette's or a colour key's transparency becomes alpha, 1/2/4-bit images
  become 8-bit, TIFF 'min-is-white' is inverted;
- one image per file: an animated GIF / PNG / WebP, or a TIFF with several full-size pages, is
  refused (a TIFF's reduced-resolution pages -- thumbnails, pyramid levels -- are skipped; a
  multi-picture JPEG (MPO) gives its first, main picture).
"""
from __future__ import annotations

import os
import threading
import warnings
from dataclasses import dataclass

import numpy as np

from eamamba_ref.io.atomic import atomic_output, check_destination

# Images over this many pixels are refused before decoding unless the caller raises the limit:
# at 8192 x 8192 an RGB image is 0.8 GB as float32, and restoring it holds several such arrays.
MAX_PIXELS = 8192 * 8192

WRITE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


class ImageError(ValueError):
    """An image that cannot be read, or an image/request that does not fit."""


@dataclass
class Image:
    """A decoded image, in display orientation.

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

    @property
    def channels(self):
        return self.pixels.shape[2]


_PNG = b"\x89PNG\r\n\x1a\n"
_TIFF = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")      # classic and BigTIFF


def _fail(path, reason):
    return ImageError(f"cannot read image {path}: {reason}")


def check_pixels(path, width, height, max_pixels=MAX_PIXELS):
    """Refuse (`ImageError`) an image of width x height over `max_pixels`, naming the way out."""
    if max_pixels is not None and width * height > max_pixels:
        tiff = os.fspath(path).lower().endswith((".tif", ".tiff"))
        raise ImageError(
            f"{path}: {width}x{height} is {width * height / 1e6:.1f} megapixels, over the limit of {max_pixels} "
            f"pixels ({max_pixels / 1e6:.1f} MP) that guards memory; to restore it anyway raise the limit "
            f"(--max-pixels N, or read_image(path, max_pixels=N)) and use --tile to bound the model's memory, "
            f"or {'' if tiff else 'save it as TIFF and '}use --chunk, which never holds the whole image")


# orientation code (EXIF / TIFF tag 274) -> how to turn the stored pixels into displayed ones
def orient(a, code):
    """Stored `(H, W, ...)` pixels -> display orientation, for EXIF/TIFF orientation `code` 1..8."""
    if code in (5, 6, 7, 8):
        a = np.swapaxes(a, 0, 1)                         # transpose: the four codes that swap H, W
    flip_rows, flip_cols = {2: (False, True), 3: (True, True), 4: (True, False), 5: (False, False),
                            6: (False, True), 7: (True, True), 8: (True, False)}.get(code, (False, False))
    if flip_rows:
        a = a[::-1]
    if flip_cols:
        a = a[:, ::-1]
    return np.ascontiguousarray(a)


_PIL_LOCK = threading.Lock()


def _open_pillow(path):
    """PIL.Image.open without Pillow's own size guard: ours (`check_pixels`) is the one limit."""
    from PIL import Image as PILImage
    with _PIL_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", PILImage.DecompressionBombWarning)
        saved, PILImage.MAX_IMAGE_PIXELS = PILImage.MAX_IMAGE_PIXELS, None
        try:
            return PILImage.open(path)
        finally:
            PILImage.MAX_IMAGE_PIXELS = saved


def _orientation_of(im):
    try:
        code = int(im.getexif().get(0x0112, 1))
    except Exception:                          # a broken EXIF block: show the pixels as stored
        return 1
    return code if 1 <= code <= 8 else 1


# Pillow mode -> the mode to convert to (None: take the pixels as they are)
_PIL_MODES = {"1": "L", "L": None, "LA": None, "La": "LA", "P": "RGB", "PA": "RGBA", "RGB": None,
              "RGBA": None, "RGBa": "RGBA", "RGBX": "RGB", "CMYK": "RGB", "YCbCr": "RGB",
              "I;16": None, "I;16L": None, "I;16B": None, "I;16N": None}


def _read_pillow(path, max_pixels, pil=None, tiff_frame=None):
    """8-bit formats, 16-bit gray: -> integer `(H, W[, C])`, display-oriented.

    `tiff_frame`: the page of a TIFF to read (its pages were checked by `tiff_page`)."""
    im = pil or _open_pillow(path)
    with im:
        if tiff_frame:
            im.seek(tiff_frame)
        check_pixels(path, im.width, im.height, max_pixels)
        frames = getattr(im, "n_frames", 1)
        if frames > 1 and im.format not in ("MPO", "TIFF"):   # MPO: a JPEG's main picture + extras
            raise _fail(path, f"animated {im.format or 'image'} ({frames} frames); restore reads still images: "
                              f"extract the frame you want first")
        mode = im.mode
        if mode not in _PIL_MODES:
            raise _fail(path, f"unsupported pixel mode {mode} (8- or 16-bit gray, RGB, RGBA, palette or CMYK only)")
        target = _PIL_MODES[mode]
        if "transparency" in im.info and mode in ("P", "L", "RGB"):   # a transparent colour: -> alpha
            target = {"P": "RGBA", "L": "LA", "RGB": "RGBA"}[mode]
        code = _orientation_of(im)
        if target:
            im.load()
            im = im.convert(target)
        data = np.asarray(im)
    data = data.astype(data.dtype.newbyteorder("="), copy=False)      # I;16B is big-endian
    return orient(data, code)


def _read_png16(path, head, max_pixels):
    import png
    check_pixels(path, int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big"), max_pixels)
    with _open_pillow(path) as im:                  # only its EXIF (eXIf chunk); pypng decodes
        code = _orientation_of(im)
    reader = png.Reader(filename=path)
    reader.preamble()
    reader.sbit = None            # sBIT only notes the source's precision: keep the stored 16-bit values
    width, height, rows, info = reader.asDirect()                      # tRNS -> alpha
    planes = info["planes"]
    data = np.vstack([np.asarray(r, dtype=np.uint16) for r in rows]).reshape(height, width, planes)
    return orient(data, code)


_PHOTOMETRIC = {0: "min-is-white", 1: "gray", 2: "RGB", 3: "palette", 4: "mask", 5: "CMYK/separated",
                6: "YCbCr", 8: "CIELab", 9: "ICCLab", 10: "ITULab", 32844: "LogL", 32845: "LogLuv"}


def tiff_page(tif, path):
    """The page of an open `tifffile.TiffFile` that holds its image; `ImageError` when there are
    several full-size images. Reduced-resolution pages (thumbnails, pyramid levels) do not count."""
    full = [p for p in tif.pages if not int(getattr(p, "subfiletype", 0) or 0) & 1]
    if len(full) > 1:
        raise _fail(path, f"the TIFF holds {len(full)} images (pages); restore reads one image per file: "
                          f"save the page you want as its own file")
    return full[0] if full else tif.pages[0]


def _cmyk_to_rgb(data, top):
    """CMYK(+extra) integer -> RGB(+extra): R = (1 - C)(1 - K), as Pillow converts CMYK JPEGs."""
    cmy, k = data[..., :3].astype(np.float64), data[..., 3:4].astype(np.float64)
    rgb = np.round((top - cmy) * (top - k) / top).astype(data.dtype)
    return np.concatenate([rgb, data[..., 4:]], axis=2)


def _read_tiff(path, max_pixels):
    import tifffile
    with tifffile.TiffFile(path) as tif:
        page = tiff_page(tif, path)
        check_pixels(path, page.imagewidth, page.imagelength, max_pixels)
        if getattr(page, "imagedepth", 1) > 1:
            raise _fail(path, "a volumetric TIFF (image depth > 1); restore reads 2-D images")
        photometric, bits = int(page.photometric), page.bitspersample
        if photometric not in (0, 1, 2, 3, 5) or (photometric == 5 and page.samplesperpixel < 4):
            raise _fail(path, f"TIFF colour space {_PHOTOMETRIC.get(photometric, photometric)} is not supported "
                              f"(gray, RGB, palette or CMYK only): save it as RGB")
        try:
            tifffile.TIFF.DECOMPRESSORS[page.compression]
        except KeyError:                              # e.g. LZW or JPEG without the imagecodecs package
            if bits <= 8 or page.samplesperpixel == 1:    # Pillow decodes these exactly
                return _read_pillow(path, max_pixels, tiff_frame=page.index)
            raise _fail(path, f"TIFF compression {page.compression.name} needs the imagecodecs package "
                              f"(pip install imagecodecs)") from None
        data = page.asarray()
        code = int(page.tags.valueof(274, default=1) or 1)
        if page.planarconfig == 2 and data.ndim == 3 and page.samplesperpixel > 1:
            data = np.moveaxis(data, 0, -1)           # separate planes (C, H, W) -> (H, W, C)
        if data.dtype == bool:                        # bilevel
            data = data.astype(np.uint8) * np.uint8(255)
        if data.dtype not in (np.uint8, np.uint16):
            raise _fail(path, f"unsupported pixel type {data.dtype} (8- or 16-bit images only)")
        if data.ndim == 2:
            data = data[..., None]
        top = np.iinfo(data.dtype).max
        if photometric == 0:                          # min-is-white: 0 is white
            data = np.concatenate([top - data[..., :1], data[..., 1:]], axis=2)
        elif photometric == 3:                        # palette: 16-bit colour map, (3, 2**bits)
            cmap = page.colormap
            if cmap is None:
                raise _fail(path, "palette TIFF without a colour map")
            rgb = np.moveaxis(cmap[:, data[..., 0]], 0, -1)
            if (cmap % 257 == 0).all():               # an 8-bit palette stored as 16-bit
                rgb = (rgb // 257).astype(np.uint8)
            data = np.concatenate([rgb.astype(rgb.dtype), data[..., 1:].astype(rgb.dtype)], axis=2)
        elif photometric == 5:
            if page.samplesperpixel - len(page.extrasamples or ()) != 4:
                raise _fail(path, "a separated TIFF that is not CMYK (4 inks); save it as RGB")
            data = _cmyk_to_rgb(data, top)
    return orient(data, code if 1 <= code <= 8 else 1)


def _decode(path, max_pixels):
    """Integer `(H, W, C)` pixels of `path` in display orientation (C = 1..4, the last one alpha
    when C is 2 or 4)."""
    with open(path, "rb") as f:
        head = f.read(32)
    if not head:
        raise _fail(path, "empty file")
    if head[:4] in _TIFF:
        data = _read_tiff(path, max_pixels)
    elif head[:8] == _PNG and head[12:16] == b"IHDR" and len(head) >= 25 and head[24] == 16:
        data = _read_png16(path, head, max_pixels)
    else:
        from PIL import UnidentifiedImageError
        try:
            pil = _open_pillow(path)
        except UnidentifiedImageError:
            raise _fail(path, "not an image (no known image format: PNG, JPEG, TIFF, GIF, BMP, WebP, ...)") from None
        data = _read_pillow(path, max_pixels, pil)
    return data if data.ndim == 3 else data[..., None]


def read_image(path, max_pixels=MAX_PIXELS):
    """Decode `path` into an `Image`; one-line `ImageError` for anything that is not a usable image.

    Images over `max_pixels` (None: no limit) are refused from their header, before decoding.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ImageError(f"{path}: no such file")
    try:
        data = np.asarray(_decode(path, max_pixels))
    except ImageError:
        raise
    except MemoryError:
        raise _fail(path, "not enough memory to decode it (see --max-pixels, --tile, --chunk)") from None
    except Exception as err:                      # decoders raise many types; the message matters
        detail = str(err).splitlines()[0] if str(err) else "unreadable"
        raise _fail(path, f"truncated or corrupt ({type(err).__name__}: {detail})") from None
    if data.dtype == np.uint8:
        bit_depth, scale = 8, 255.0
    elif data.dtype == np.uint16:
        bit_depth, scale = 16, 65535.0
    else:
        raise _fail(path, f"unsupported pixel type {data.dtype} (8- or 16-bit images only)")
    if data.ndim != 3 or data.shape[2] not in (1, 2, 3, 4) or min(data.shape[:2]) < 1:
        raise _fail(path, f"unsupported image layout {data.shape} (grayscale, RGB or RGBA images only)")
    alpha = None
    if data.shape[2] in (2, 4):                  # gray+alpha or RGBA: keep alpha aside, untouched
        alpha = data[..., -1].copy()
        data = data[..., :-1]
    pixels = data.astype(np.float32) / np.float32(scale)
    return Image(pixels=pixels, alpha=alpha, bit_depth=bit_depth, path=path)


# ------------------------------------------------------------------- gray and model arrays
def is_gray(pixels, tolerance=0.0):
    """Whether `(H, W, C)` pixels are gray: one channel, or three channels equal everywhere (within
    `tolerance`; 0 = exactly, as when an 8/16-bit gray image was saved as RGB)."""
    pixels = np.asarray(pixels)
    if pixels.shape[2] == 1:
        return True
    first = pixels[..., :1]
    return bool(np.all(np.abs(pixels - first) <= tolerance))


def to_batch(pixels):
    """`(H, W, C)` -> the model's `(1, C, H, W)` float32, C-contiguous (C = 1 stays one channel).

    A list of B images of one shape gives `(B, C, H, W)`."""
    if isinstance(pixels, (list, tuple)):
        shapes = {np.shape(p) for p in pixels}
        if len(shapes) != 1:
            raise ValueError(f"images of different shapes cannot form one batch: {sorted(shapes)}")
        return np.ascontiguousarray(np.stack([np.asarray(p, np.float32) for p in pixels]).transpose(0, 3, 1, 2))
    return np.ascontiguousarray(np.asarray(pixels, np.float32).transpose(2, 0, 1)[None])


def from_batch(y):
    """A model's `(1, C, H, W)` -> `(H, W, C)` (what `write_image` takes; C = 1 writes gray)."""
    if y.ndim != 4 or y.shape[0] != 1:
        raise ValueError(f"expected one image (1, C, H, W), got shape {y.shape}")
    return y[0].transpose(1, 2, 0)


def check_output(path, inputs=(), overwrite=False, bit_depth=8, alpha=False):
    """Validate an output path before any work (`ImageError`): a format `write_image` writes, for
    this bit depth and alpha; an existing, writable folder; not one of `inputs`; not an existing
    file unless `overwrite`. Returns the path."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in WRITE_EXTENSIONS:
        raise ImageError(f"{path}: unsupported output format {ext or '(no extension)'} (use .png, .jpg or .tif)")
    if ext in (".jpg", ".jpeg") and (bit_depth != 8 or alpha):
        raise ImageError(f"{path}: JPEG holds 8-bit images without alpha, this one is "
                         f"{'16-bit' if bit_depth != 8 else '8-bit'}{' with alpha' if alpha else ''}; "
                         f"write .png or .tif instead")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ImageError(f"{path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ImageError(f"{path}: cannot write into folder {folder} (permission denied)")
    if os.path.isdir(path):
        raise ImageError(f"{path} is a folder, not an output file name")
    check_destination(path, overwrite, inputs, error=ImageError)     # an input, or an existing file
    return path


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
    path = check_output(path, (), overwrite, bit_depth, alpha is not None)
    ext = os.path.splitext(path)[1].lower()
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
            planes = 1 if data.ndim == 2 else data.shape[2]      # say which axis holds samples:
            tifffile.imwrite(tmp, data, photometric="rgb" if planes >= 3 else "minisblack",  # (H, W, 2)
                             planarconfig="contig" if planes > 1 else None,    # is not 2 pages
                             extrasamples=["unassalpha"] if planes in (2, 4) else None)
        elif ext == ".png" and bit_depth == 16:
            import png
            planes = 1 if data.ndim == 2 else data.shape[2]
            mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[planes] + ";16"
            png.from_array(data.reshape(data.shape[0], -1), mode).save(tmp)
        else:
            import imageio.v3 as iio
            kwargs = {"quality": 95} if ext in (".jpg", ".jpeg") else {}
            iio.imwrite(tmp, data, extension=ext, **kwargs)
