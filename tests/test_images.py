"""Reading images as they are meant to be seen, and refusing the rest in one line.

Each case is a file a user may have: written here with Pillow, tifffile or pypng (or patched by
hand, for headers that lie), and checked against an independent expectation: Pillow's own
conversions (CMYK, EXIF transpose), or values worked out by hand.
"""
import struct
import zlib

import numpy as np
import png
import pytest
import tifffile
from PIL import Image as PILImage, ImageOps

from eamamba_ref.apps import pipeline, restore
from eamamba_ref.io.images import (MAX_PIXELS, ImageError, check_output, from_batch, is_gray,
                                   orient, read_image, to_batch, write_image)


def one_line_error(path, match, **kw):
    with pytest.raises(ImageError, match=match) as err:
        read_image(path, **kw)
    assert "\n" not in str(err.value)
    return str(err.value)


def rgb_pattern(h=5, w=7, dtype=np.uint8, seed=0):
    top = np.iinfo(dtype).max
    return np.random.default_rng(seed).integers(0, top + 1, (h, w, 3)).astype(dtype)


# ---------------------------------------------------------------------------- image bombs
def png_declaring(path, width, height, bits):
    """A valid small PNG whose IHDR is then rewritten to declare width x height (CRC fixed)."""
    writer = png.Writer(4, 4, greyscale=False, bitdepth=bits)
    with open(path, "wb") as f:
        writer.write(f, np.zeros((4, 12), np.uint16 if bits == 16 else np.uint8).tolist())
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(data)
    return path


def tiff_declaring(path, width, height):
    tifffile.imwrite(path, np.zeros((8, 8), np.uint16), compression="zlib")
    with tifffile.TiffFile(path) as tif:
        offsets = [tif.pages[0].tags[k].valueoffset for k in ("ImageWidth", "ImageLength")]
    data = bytearray(path.read_bytes())
    for off, value in zip(offsets, (width, height)):
        data[off:off + 4] = struct.pack("<I", value)
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("make", [
    lambda p: png_declaring(p / "bomb16.png", 12000, 12000, 16),     # pypng's path
    lambda p: png_declaring(p / "bomb8.png", 12000, 12000, 8),       # Pillow's path
    lambda p: tiff_declaring(p / "bomb.tif", 16000, 16000),          # tifffile's path
])
def test_a_huge_declared_size_is_refused_from_the_header(tmp_path, make):
    path = make(tmp_path)
    assert path.stat().st_size < 2000
    msg = one_line_error(path, "megapixels, over the limit")
    assert str(MAX_PIXELS) in msg and "--max-pixels" in msg and "--tile" in msg and "--chunk" in msg


def test_the_pixel_limit_is_one_number_for_every_reader(tmp_path):
    pixels = rgb_pattern(6, 10)
    paths = []
    for name in ("a.png", "b.tif"):
        write_image(tmp_path / name, pixels / 255.0, 8)
        paths.append(tmp_path / name)
    write_image(tmp_path / "c.png", pixels / 255.0, 16)
    paths.append(tmp_path / "c.png")
    PILImage.fromarray(pixels).save(tmp_path / "d.jpg")
    paths.append(tmp_path / "d.jpg")
    for path in paths:
        assert read_image(path, max_pixels=60).width == 10              # exactly at the limit: fine
        assert read_image(path, max_pixels=None).height == 6
        one_line_error(path, "over the limit of 59 pixels", max_pixels=59)


def test_pillows_own_size_guard_does_not_override_ours(tmp_path, monkeypatch):
    """Pillow refuses images over 2 x its MAX_IMAGE_PIXELS by itself; our limit is the only one."""
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 10)
    rgb = rgb_pattern(6, 10)
    for name in ("a.png", "a.jpg", "a.gif", "a.bmp"):
        PILImage.fromarray(rgb).save(tmp_path / name)
        assert read_image(tmp_path / name, max_pixels=None).pixels.shape == (6, 10, 3)
        one_line_error(tmp_path / name, "over the limit of 59 pixels", max_pixels=59)
    assert PILImage.MAX_IMAGE_PIXELS == 10                      # put back as it was


def test_the_command_takes_max_pixels(tmp_path, capsys):
    src = tmp_path / "a.png"
    write_image(src, rgb_pattern(6, 10) / 255.0, 8)
    assert restore.main([str(src), "--max-pixels", "59"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "over the limit of 59 pixels" in err and "\n" not in err


# ------------------------------------------------------------------------------- colour
def test_cmyk_jpeg_is_converted_to_rgb(tmp_path):
    path = tmp_path / "cmyk.jpg"
    cmyk = np.zeros((16, 16, 4), np.uint8)
    cmyk[:8] = (0, 255, 255, 0)               # red
    cmyk[8:] = (0, 0, 0, 128)                 # 50% black: gray 127
    PILImage.fromarray(cmyk, "CMYK").save(path, quality=100)
    im = read_image(path)
    assert im.alpha is None and im.pixels.shape == (16, 16, 3)
    got = np.round(im.pixels * 255)
    assert np.abs(got[:8] - [255, 0, 0]).max() <= 3
    assert np.abs(got[8:] - 127).max() <= 3


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_cmyk_tiff_is_converted_to_rgb(tmp_path, dtype):
    cmyk = np.random.default_rng(0).integers(0, np.iinfo(dtype).max + 1, (5, 6, 4)).astype(dtype)
    path = tmp_path / "cmyk.tif"
    tifffile.imwrite(path, cmyk, photometric="separated")
    im = read_image(path)
    assert im.alpha is None and im.bit_depth == (8 if dtype == np.uint8 else 16)
    got = np.round(im.pixels * np.iinfo(dtype).max).astype(np.int64)
    if dtype == np.uint8:                     # the same conversion as Pillow's for CMYK
        want = np.asarray(PILImage.fromarray(cmyk, "CMYK").convert("RGB")).astype(np.int64)
    else:                                     # by hand: R = (1 - C)(1 - K)
        c = cmyk.astype(np.float64) / 65535
        want = np.round((1 - c[..., :3]) * (1 - c[..., 3:]) * 65535).astype(np.int64)
    assert np.abs(got - want).max() <= 1


def test_palette_png_keeps_its_transparency(tmp_path):
    path = tmp_path / "pal.png"
    p = PILImage.new("P", (3, 1))
    p.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
    p.putdata([0, 1, 2])
    p.save(path, transparency=1)
    im = read_image(path)
    assert np.array_equal(np.round(im.pixels[0] * 255), [[255, 0, 0], [0, 255, 0], [0, 0, 255]])
    assert im.alpha is not None and im.alpha.tolist() == [[255, 0, 255]]


def test_a_transparent_colour_key_becomes_alpha(tmp_path):
    path = tmp_path / "key.png"
    PILImage.fromarray(np.array([[[1, 2, 3], [4, 5, 6]]], np.uint8)).save(path, transparency=(1, 2, 3))
    assert read_image(path).alpha.tolist() == [[0, 255]]


def test_one_bit_and_two_bit_pngs_are_read(tmp_path):
    bits = np.array([[0, 1, 1], [1, 0, 0]], bool)
    PILImage.fromarray(bits).save(tmp_path / "b1.png")
    im = read_image(tmp_path / "b1.png")
    assert im.bit_depth == 8 and np.array_equal(im.pixels[..., 0], bits.astype(np.float32))
    png.from_array([[0, 1, 2, 3]], "L;2").save(tmp_path / "g2.png")
    assert np.allclose(read_image(tmp_path / "g2.png").pixels[0, :, 0], [0, 1 / 3, 2 / 3, 1])


def test_tiff_photometric_variants(tmp_path):
    bits = np.array([[0, 1], [1, 0]], bool)
    tifffile.imwrite(tmp_path / "white.tif", bits, photometric="miniswhite")        # 1 = black
    assert np.array_equal(read_image(tmp_path / "white.tif").pixels[..., 0], 1 - bits.astype(np.float32))
    cmap = np.zeros((3, 256), np.uint16)
    cmap[:, 1] = (65535, 0, 257 * 10)
    tifffile.imwrite(tmp_path / "pal.tif", np.array([[0, 1]], np.uint8), photometric="palette", colormap=cmap)
    im = read_image(tmp_path / "pal.tif")
    assert im.bit_depth == 8 and np.round(im.pixels * 255).tolist() == [[[0, 0, 0], [255, 0, 10]]]
    rgb = rgb_pattern()
    tifffile.imwrite(tmp_path / "planes.tif", np.moveaxis(rgb, -1, 0), photometric="rgb", planarconfig="separate")
    assert np.array_equal(np.round(read_image(tmp_path / "planes.tif").pixels * 255), rgb)


def test_lzw_tiff_without_imagecodecs_is_read_through_pillow(tmp_path):
    rgb = rgb_pattern(9, 11)
    PILImage.fromarray(rgb).save(tmp_path / "lzw.tif", compression="tiff_lzw")
    assert np.array_equal(np.round(read_image(tmp_path / "lzw.tif").pixels * 255), rgb)


# -------------------------------------------------------------------------- orientation
@pytest.mark.parametrize("code", range(1, 9))
def test_exif_orientation_is_applied_like_pillow(tmp_path, code):
    rgb = rgb_pattern(4, 7)
    exif = PILImage.Exif()
    exif[0x0112] = code
    path = tmp_path / "o.png"
    PILImage.fromarray(rgb).save(path, exif=exif.tobytes())
    want = np.asarray(ImageOps.exif_transpose(PILImage.open(path)))
    assert np.array_equal(np.round(read_image(path).pixels * 255), want)
    # TIFF's own orientation tag, read by tifffile, against Pillow's reading of the same file
    tpath = tmp_path / "o.tif"
    tifffile.imwrite(tpath, rgb, photometric="rgb", extratags=[(274, 3, 1, code, True)])
    want = np.asarray(ImageOps.exif_transpose(PILImage.open(tpath)))
    assert np.array_equal(np.round(read_image(tpath).pixels * 255), want)


def test_orientation_of_a_16_bit_png(tmp_path):
    rgb = rgb_pattern(4, 7, np.uint16)
    path = tmp_path / "o16.png"
    write_image(path, rgb / 65535.0, 16)
    data = bytearray(path.read_bytes())
    exif = PILImage.Exif()
    exif[0x0112] = 6                                                   # rotate 90 degrees clockwise
    payload = exif.tobytes()[6:] if exif.tobytes().startswith(b"Exif") else exif.tobytes()
    chunk = struct.pack(">I", len(payload)) + b"eXIf" + payload
    chunk += struct.pack(">I", zlib.crc32(b"eXIf" + payload))
    data[33:33] = chunk                                                # right after IHDR
    path.write_bytes(data)
    im = read_image(path)
    assert im.bit_depth == 16
    assert np.array_equal(np.round(im.pixels * 65535), np.rot90(rgb, -1))


def test_orient_undoes_what_a_camera_stores():
    a = np.arange(6).reshape(2, 3)
    assert np.array_equal(orient(a, 6), [[3, 0], [4, 1], [5, 2]])          # by hand: 90 degrees clockwise
    assert np.array_equal(orient(a, 8), [[2, 5], [1, 4], [0, 3]])
    assert np.array_equal(orient(a, 1), a)


# ---------------------------------------------------------- one image per file, GIFs, junk
def test_multi_page_tiff_is_refused_but_thumbnails_are_skipped(tmp_path):
    tifffile.imwrite(tmp_path / "stack.tif", np.zeros((3, 4, 5), np.uint8), photometric="minisblack")
    one_line_error(tmp_path / "stack.tif", "holds 3 images")
    rgb = rgb_pattern(8, 8)
    with tifffile.TiffWriter(tmp_path / "thumb.tif") as w:
        w.write(rgb, photometric="rgb")
        w.write(rgb[::4, ::4], photometric="rgb", subfiletype=1)           # reduced-resolution copy
    assert np.array_equal(np.round(read_image(tmp_path / "thumb.tif").pixels * 255), rgb)


def test_still_gif_is_read_and_animated_gif_refused(tmp_path):
    rgb = np.zeros((6, 5, 3), np.uint8)
    rgb[:3] = (255, 0, 0)
    rgb[3:] = (0, 0, 255)
    PILImage.fromarray(rgb).save(tmp_path / "still.gif")
    im = read_image(tmp_path / "still.gif")
    assert im.pixels.shape == (6, 5, 3) and np.array_equal(np.round(im.pixels * 255), rgb)
    frames = [PILImage.new("RGB", (4, 4), (i * 60, 0, 0)) for i in range(3)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    one_line_error(tmp_path / "anim.gif", "animated GIF .3 frames.")


def test_empty_text_and_truncated_files_are_named(tmp_path):
    (tmp_path / "zero.png").write_bytes(b"")
    one_line_error(tmp_path / "zero.png", r"cannot read image .*zero.png: empty file")
    (tmp_path / "notes.png").write_text("hello, not a picture\n")
    one_line_error(tmp_path / "notes.png", "not an image")
    write_image(tmp_path / "ok.png", rgb_pattern(32, 32) / 255.0, 8)
    (tmp_path / "cut.png").write_bytes((tmp_path / "ok.png").read_bytes()[:80])
    one_line_error(tmp_path / "cut.png", "truncated or corrupt")


# ------------------------------------------------------------------------------- gray
@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("ext", [".png", ".tif"])
def test_gray_and_gray_alpha_stay_one_channel(tmp_path, bits, ext):
    top = 2 ** bits - 1
    rng = np.random.default_rng(1)
    gray = rng.integers(0, top + 1, (5, 6, 1))
    alpha = rng.integers(0, top + 1, (5, 6)).astype(np.uint8 if bits == 8 else np.uint16)
    for a in (None, alpha):
        path = tmp_path / f"g{a is None}{ext}"
        write_image(path, gray / top, bits, a)
        im = read_image(path)
        x = to_batch(im.pixels)
        assert x.shape == (1, 1, 5, 6) and x.dtype == np.float32 and x.flags.c_contiguous
        assert im.bit_depth == bits and np.array_equal(np.round(x[0, 0] * top), gray[..., 0])
        assert (im.alpha is None) == (a is None) and (a is None or np.array_equal(im.alpha, a))
        # a one-channel result goes back at the input's depth, alpha re-attached
        out = tmp_path / f"out{a is None}{ext}"
        write_image(out, from_batch(x), im.bit_depth, im.alpha)
        back = read_image(out)
        assert back.pixels.shape == (5, 6, 1) and back.bit_depth == bits
        assert np.array_equal(back.pixels, im.pixels) and (a is None or np.array_equal(back.alpha, a))


def test_to_batch_stacks_images():
    a, b = np.zeros((4, 5, 1), np.float32), np.ones((4, 5, 1), np.float32)
    x = to_batch([a, b])
    assert x.shape == (2, 1, 4, 5) and x[0].max() == 0 and x[1].min() == 1 and x.flags.c_contiguous
    with pytest.raises(ValueError, match="different shapes"):
        to_batch([a, np.zeros((4, 6, 1))])


def test_is_gray():
    rgb = np.repeat(np.random.default_rng(0).random((4, 5, 1), dtype=np.float32), 3, axis=2)
    assert is_gray(rgb) and is_gray(rgb[..., :1])
    rgb[2, 3, 1] += 1 / 255
    assert not is_gray(rgb) and is_gray(rgb, tolerance=1 / 255 + 1e-6)
    assert not is_gray(np.random.default_rng(0).random((4, 5, 3)))


# ------------------------------------------------------------------------------- output
def test_output_is_checked_before_any_work(tmp_path):
    src = tmp_path / "in.png"
    write_image(src, rgb_pattern() / 255.0, 8)
    cases = [(tmp_path / "x.bmp", {}, "unsupported output format .bmp"),
             (tmp_path / "nope" / "x.png", {}, "does not exist"),
             (src, {"inputs": [src]}, "is an input file"),
             (src, {}, "exists; refusing"),
             (tmp_path / "x.jpg", {"bit_depth": 16}, "JPEG holds 8-bit"),
             (tmp_path / "y.jpg", {"alpha": True}, "JPEG holds 8-bit"),
             (tmp_path, {}, "unsupported output format")]
    for path, kw, match in cases:
        with pytest.raises(ImageError, match=match):
            check_output(path, **kw)
    assert check_output(tmp_path / "fine.tif", [src], bit_depth=16, alpha=True) == str(tmp_path / "fine.tif")
    check_output(src, [tmp_path / "other.png"], overwrite=True)


def test_unwritable_folder_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr("os.access", lambda path, mode: False)
    with pytest.raises(ImageError, match="permission denied"):
        check_output(tmp_path / "x.png")


def test_the_command_refuses_a_bad_output_before_computing(tmp_path, capsys, monkeypatch):
    src = tmp_path / "in.png"
    write_image(src, rgb_pattern(8, 8) / 255.0, 8)

    def no_work(*args, **kwargs):
        raise AssertionError("the model ran before the output was checked")
    monkeypatch.setattr(pipeline, "restore_array", no_work)
    for out, match in [("x.bmp", "unsupported output format .bmp"), ("missing/x.png", "does not exist")]:
        assert restore.main([str(src), "-o", str(tmp_path / out)]) == 2
        err = capsys.readouterr().err.strip()
        assert match in err and "\n" not in err


# ------------------------------------------------ the chunked reader (images larger than memory)
def test_chunked_tiff_reader_follows_the_same_page_rule_and_refuses_what_it_cannot_restore(tmp_path):
    from eamamba_ref.io.tiff import TiffRegions
    rgb = rgb_pattern(8, 8)
    with tifffile.TiffWriter(tmp_path / "thumb_first.tif") as w:      # a thumbnail page, then the image
        w.write(rgb[::4, ::4], photometric="rgb", subfiletype=1)
        w.write(rgb, photometric="rgb")
    src = TiffRegions(tmp_path / "thumb_first.tif")
    assert src.shape == (8, 8, 3) and np.array_equal(src[2:7, 1:5], rgb[2:7, 1:5])
    assert np.array_equal(np.round(read_image(tmp_path / "thumb_first.tif").pixels * 255), rgb)
    tifffile.imwrite(tmp_path / "stack.tif", np.zeros((3, 4, 5), np.uint8), photometric="minisblack")
    tifffile.imwrite(tmp_path / "cmyk.tif", np.zeros((4, 5, 4), np.uint8), photometric="separated")
    tifffile.imwrite(tmp_path / "turned.tif", rgb, photometric="rgb", extratags=[(274, 3, 1, 6, True)])
    for name, match in [("stack.tif", "holds 3 images"), ("cmyk.tif", "CMYK"), ("turned.tif", "orientation 6")]:
        with pytest.raises(ImageError, match=match) as err:
            TiffRegions(tmp_path / name)
        assert "\n" not in str(err.value)


def test_a_16_bit_png_with_fewer_significant_bits_keeps_its_values(tmp_path):
    """pypng writes 12-bit data as 16-bit samples scaled to the full range plus an sBIT chunk; the
    stored 16-bit values are the image (Pillow and browsers show them), not the 12-bit originals."""
    path = tmp_path / "sbit.png"
    with open(path, "wb") as f:
        png.Writer(3, 1, greyscale=True, bitdepth=12).write(f, [[0, 2048, 4095]])
    im = read_image(path)
    assert im.bit_depth == 16
    np.testing.assert_allclose(im.pixels[0, :, 0], [0, 2048 / 4095, 1], atol=1 / 65535)
