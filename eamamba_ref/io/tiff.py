"""Chunked TIFF in and out: read any rectangle of a TIFF's image, write rectangles into a new one.

For images larger than memory (the restore command's `--chunk`, `apps/distributed.py`): only the
pixels of the rectangle asked for are read or written, and both classes hold nothing but a path, so
they pickle to Dask workers, which open the file themselves. TIFF through tifffile (no zarr).
Whole images are read and written by `images.py`, whose page rule (`tiff_page`: one image per
file, thumbnails skipped) applies here too.
"""
from __future__ import annotations

import math
import os

import numpy as np

from eamamba_ref.io.images import ImageError, tiff_page


class TiffRegions:
    """Read rectangular regions `(h, w, C)` of a TIFF's image, without reading the rest.

    Uncompressed contiguous files are memory-mapped; tiled or striped (and compressed) files decode
    only the tiles/strips that touch the region. Picklable (it holds the path only), so Dask
    workers open the file themselves. Supports 8/16-bit grayscale, gray+alpha, RGB, RGBA.
    """

    def __init__(self, path):
        import tifffile
        self.path = os.fspath(path)
        try:
            with tifffile.TiffFile(self.path) as tif:
                page = tiff_page(tif, self.path)        # one image; thumbnails are skipped
                shape, dtype = page.shape, page.dtype
                self.index = page.index
                self.contiguous = page.is_contiguous and not page.is_tiled
                self.separate = page.planarconfig == 2
                photometric = int(page.photometric)
                orientation = int(page.tags.valueof(274, default=1) or 1)
        except ImageError:
            raise
        except Exception as err:
            raise ImageError(f"{self.path}: cannot read TIFF ({type(err).__name__}: {err})") from None
        if photometric not in (1, 2):                # chunks are restored as stored: gray or RGB only
            kind = {0: "min-is-white", 3: "palette", 5: "CMYK"}.get(photometric, f"photometric {photometric}")
            raise ImageError(f"{self.path}: chunked restore reads gray or RGB TIFFs, this one is {kind}: "
                             f"save it as RGB (or restore it without --chunk)")
        if orientation != 1:                         # read_image turns it upright; chunks cannot
            raise ImageError(f"{self.path}: chunked restore reads upright TIFFs, this one has orientation "
                             f"{orientation}: rotate it first (or restore it without --chunk)")
        if page.is_tiled and getattr(page, "tiledepth", 1) > 1 or len(shape) not in (2, 3):
            raise ImageError(f"{self.path}: unsupported TIFF layout {shape} (2-D images only)")
        if len(shape) == 3 and self.separate:                # (C, H, W) planes
            shape = (shape[1], shape[2], shape[0])
        self.shape = (shape[0], shape[1], shape[2] if len(shape) == 3 else 1)
        self.dtype = np.dtype(dtype)
        self.ndim = 3
        if self.dtype not in (np.uint8, np.uint16) or self.shape[2] not in (1, 2, 3, 4):
            raise ImageError(f"{self.path}: unsupported TIFF {dtype} {shape} (8/16-bit gray, RGB or RGBA only)")

    def __getitem__(self, key):
        ys, xs = key[0], key[1]
        y0, y1, _ = ys.indices(self.shape[0])
        x0, x1, _ = xs.indices(self.shape[1])
        if self.contiguous:
            import tifffile
            mm = tifffile.memmap(self.path, page=self.index, mode="r")
            region = np.array(mm[y0:y1, x0:x1] if not self.separate else np.moveaxis(mm[:, y0:y1, x0:x1], 0, -1))
            del mm
        else:
            region = self._decode(y0, y1, x0, x1)
        region = region.reshape(y1 - y0, x1 - x0, self.shape[2])
        return region[(slice(None), slice(None)) + tuple(key[2:])]

    def _decode(self, y0, y1, x0, x1):
        import tifffile
        out = np.zeros((y1 - y0, x1 - x0, self.shape[2]), self.dtype)
        with tifffile.TiffFile(self.path) as tif:
            page = tif.pages[self.index]
            H, W, C = self.shape
            if page.is_tiled:
                sh, sw = page.tilelength, page.tilewidth
            else:
                sh, sw = page.rowsperstrip or H, W
            ny, nx = math.ceil(H / sh), math.ceil(W / sw)
            planes = range(C) if self.separate else [0]
            fh = tif.filehandle
            for p in planes:
                for ty in range(y0 // sh, math.ceil(y1 / sh)):
                    for tx in range(x0 // sw, math.ceil(x1 / sw)):
                        index = (p * ny + ty) * nx + tx
                        fh.seek(page.dataoffsets[index])
                        data = fh.read(page.databytecounts[index])
                        seg, idx, _ = page.decode(data, index, jpegtables=page.jpegtables)
                        seg = seg.reshape(seg.shape[-3:])          # (rows, cols, samples)
                        sy, sx = idx[-3], idx[-2]                  # where the decoder says it goes
                        a0, a1 = max(sy, y0), min(sy + seg.shape[0], y1, H)
                        b0, b1 = max(sx, x0), min(sx + seg.shape[1], x1, W)
                        c = slice(p, p + 1) if self.separate else slice(None)
                        out[a0 - y0:a1 - y0, b0 - x0:b1 - x0, c] = seg[a0 - sy:a1 - sy, b0 - sx:b1 - sx]
        return out


class TiffRegionWriter:
    """`target[region] = block` into an uncompressed TIFF made by `tifffile.memmap` (picklable:
    it holds the path only, so Dask workers write their chunks themselves)."""

    def __init__(self, path):
        self.path = path

    @classmethod
    def create(cls, path, shape, dtype):
        """A new uncompressed TIFF at `path`: header and zero pixels on disk, `(H, W)` or `(H, W, C)`."""
        import tifffile
        tifffile.memmap(path, shape=shape, dtype=dtype).flush()
        return cls(path)

    def __setitem__(self, key, value):
        import tifffile
        mm = tifffile.memmap(self.path, mode="r+")
        mm[key[: mm.ndim]] = value.reshape(mm[key[: mm.ndim]].shape)
        mm.flush()
        del mm
