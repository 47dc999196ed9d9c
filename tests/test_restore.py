"""The restore command, image I/O, tiling and the self-ensemble.

Models here are tiny random EAMamba models written in the converted format (so no torch and no
bundled weights are needed), plus pointwise stand-in "models" for which tiling and flipping must
change nothing: that makes the blending and ensemble arithmetic checkable exactly.
"""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from eamamba_ref.apps import demo, inference, pipeline, restore
from eamamba_ref.io.checkpoint import save_converted
from eamamba_ref.io.config import ModelConfig
from eamamba_ref.io.images import ImageError, read_image, write_image
from eamamba_ref.runtime.model import EAMamba
from eamamba_ref.reference.parameters import init_params

MAMBA = dict(scan_type="diagonal", scan_count=8, scan_merge_method="concate", d_state=4, d_conv=3,
             expand=1, conv_2d=True)
UNET = dict(dim=16, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, mamba_cfg=MAMBA)


def write_model(path, name="eamamba", **over):
    cfg = ModelConfig.from_args(name, dict(UNET, **over) if name == "eamamba" else
                                dict(dim=16, num_blocks=[1], mamba_cfg=MAMBA, **over))
    save_converted(path, cfg.name, cfg.to_args(), init_params(cfg, seed=1))
    return str(path)


@pytest.fixture(scope="module")
def unet(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("w") / "unet.npz")


def image(h, w, c, dtype=np.uint8, seed=0):
    top = 255 if dtype == np.uint8 else 65535
    rng = np.random.default_rng(seed)
    a = rng.integers(0, top + 1, (h, w, c) if c > 1 else (h, w), dtype=np.int64)
    return a.astype(dtype)


# ------------------------------------------------------------------------- image I/O
@pytest.mark.parametrize("ext, c, dtype", [(".png", 3, np.uint8), (".png", 1, np.uint16), (".png", 3, np.uint16),
                                           (".png", 4, np.uint8), (".png", 4, np.uint16), (".tif", 3, np.uint16),
                                           (".tif", 1, np.uint8), (".png", 2, np.uint8)])
def test_images_round_trip_exactly(tmp_path, ext, c, dtype):
    data = image(5, 7, c, dtype)
    bits = 8 if dtype == np.uint8 else 16
    pixels = data[..., : (3 if c >= 3 else 1)] if data.ndim == 3 else data[..., None]
    alpha = data[..., -1] if c in (2, 4) else None
    path = tmp_path / f"x{ext}"
    write_image(path, pixels.astype(np.float32) / (2 ** bits - 1), bits, alpha)
    im = read_image(path)
    assert im.bit_depth == bits
    assert np.array_equal(np.round(im.pixels * (2 ** bits - 1)).astype(dtype), pixels)
    if alpha is not None:
        assert np.array_equal(im.alpha, alpha)
    else:
        assert im.alpha is None


def test_unreadable_and_unsupported_images_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    for path, match in [(bad, "cannot read image"), (tmp_path / "missing.png", "no such file")]:
        with pytest.raises(ImageError, match=match) as err:
            read_image(path)
        assert "\n" not in str(err.value)
    with pytest.raises(ImageError, match="JPEG"):
        write_image(tmp_path / "x.jpg", np.zeros((4, 4, 3)), 16)


def test_write_never_overwrites_unless_asked(tmp_path):
    path = tmp_path / "x.png"
    write_image(path, np.zeros((4, 4, 3)), 8)
    before = path.read_bytes()
    with pytest.raises(ImageError, match="exists"):
        write_image(path, np.ones((4, 4, 3)), 8)
    assert path.read_bytes() == before
    write_image(path, np.ones((4, 4, 3)), 8, overwrite=True)
    assert path.read_bytes() != before
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]          # no temp files left behind


# ----------------------------------------------------------------- tiling and ensemble
def pointwise(x):
    """A stand-in model with no spatial context: tiles and flips must not change its output."""
    return 2.0 * x + 1.0


def pointwise_x2(x):
    return np.repeat(np.repeat(pointwise(x), 2, axis=2), 2, axis=3)


@settings(max_examples=40, deadline=None)
@given(h=st.integers(1, 40), w=st.integers(1, 40), tile=st.integers(8, 24), data=st.data())
def test_tiled_blend_is_exact_for_a_pointwise_model(h, w, tile, data):
    overlap = data.draw(st.integers(0, tile - 1))
    x = np.random.default_rng(0).random((1, 3, h, w), dtype=np.float32)
    for fn, s in [(pointwise, 1), (pointwise_x2, 2)]:
        y = inference.tiled(fn, x, tile, overlap)
        np.testing.assert_allclose(y, fn(x), rtol=1e-6, atol=1e-6)
        assert y.shape == (1, 3, s * h, s * w)


def test_tile_covering_the_image_equals_the_untiled_model(unet):
    model = pipeline.load(unet)
    x = np.random.default_rng(0).random((1, 3, 20, 28), dtype=np.float32)
    untiled = inference.padded(model, x)
    assert untiled.shape == (1, 3, 20, 28)
    assert np.array_equal(inference.tiled(model, x, tile=32, overlap=8), untiled)
    smaller = inference.tiled(model, x, tile=16, overlap=8)      # real tiles: close, not equal
    assert smaller.shape == untiled.shape and np.isfinite(smaller).all()


def test_padding_mirrors_like_the_official_test_script():
    seen = {}

    def record(x):
        seen["x"] = x
        return x
    x = np.arange(2 * 3 * 5, dtype=np.float32).reshape(1, 1, 5, 6)   # 5 x 6 -> padded to 8 x 8
    y = inference.padded(record, x)
    assert seen["x"].shape == (1, 1, 8, 8)
    assert np.array_equal(seen["x"][0, 0, 5:, :6], x[0, 0, [4, 3, 2], :])     # BORDER_REFLECT
    assert np.array_equal(y, x)


def test_ensemble_averages_the_four_flips():
    x = np.random.default_rng(0).random((1, 3, 8, 8), dtype=np.float32)
    np.testing.assert_allclose(inference.ensemble(pointwise, x), pointwise(x), rtol=1e-6)
    calls = []
    inference.ensemble(lambda v: calls.append(v.copy()) or v, x)
    assert len(calls) == 4
    assert np.array_equal(calls[1], x[..., ::-1]) and np.array_equal(calls[2], x[..., ::-1, :])


# --------------------------------------------------------------------------- the command
def test_restore_rgb_gray16_and_rgba(tmp_path, unet, capsys):
    rgb, gray, rgba = tmp_path / "rgb.png", tmp_path / "gray16.png", tmp_path / "rgba.png"
    write_image(rgb, image(13, 21, 3) / 255.0, 8)
    write_image(gray, (image(16, 9, 1, np.uint16) / 65535.0)[..., None], 16)
    alpha = image(12, 12, 1)
    write_image(rgba, image(12, 12, 3) / 255.0, 8, alpha=alpha)
    assert restore.main([str(rgb), str(gray), str(rgba), "--weights", unet, "--tile", "8", "--tile-overlap", "2"]) == 0
    out_rgb = read_image(tmp_path / "rgb_denoise.png")
    assert out_rgb.pixels.shape == (13, 21, 3) and out_rgb.bit_depth == 8
    out_gray = read_image(tmp_path / "gray16_denoise.png")
    assert out_gray.pixels.shape == (16, 9, 1) and out_gray.bit_depth == 16
    out_rgba = read_image(tmp_path / "rgba_denoise.png")
    assert np.array_equal(out_rgba.alpha, alpha)                    # alpha passed through untouched
    # untiled, the command's output is the model's output on the padded image, rounded to 8 bits
    assert restore.main([str(rgb), "--weights", unet, "-o", str(tmp_path / "untiled.png")]) == 0
    model = pipeline.load(unet)
    x = read_image(rgb).pixels.transpose(2, 0, 1)[None].copy()
    want = np.clip(inference.padded(model, x)[0].transpose(1, 2, 0), 0, 1)
    assert np.abs(read_image(tmp_path / "untiled.png").pixels - want).max() <= 0.5 / 255 + 1e-6


def test_restore_never_overwrites(tmp_path, unet, capsys):
    src = tmp_path / "a.png"
    write_image(src, image(8, 8, 3) / 255.0, 8)
    original = src.read_bytes()
    assert restore.main([str(src), "--weights", unet, "-o", str(src)]) == 2
    assert "input file" in capsys.readouterr().err and src.read_bytes() == original
    assert restore.main([str(src), "--weights", unet]) == 0
    out = tmp_path / "a_denoise.png"
    first = out.read_bytes()
    assert restore.main([str(src), "--weights", unet, "--sigma", "50"]) == 2
    assert "exists" in capsys.readouterr().err and out.read_bytes() == first
    assert restore.main([str(src), "--weights", unet, "--sigma", "50", "--overwrite"]) == 0


def test_super_resolution_scales_image_and_alpha(tmp_path):
    sr = write_model(tmp_path / "sr2.npz", "eamambasr", upscale=2)
    src = tmp_path / "small.png"
    write_image(src, image(9, 7, 3) / 255.0, 8, alpha=image(9, 7, 1))
    assert restore.main([str(src), "--task", "sr2", "--weights", sr]) == 0
    out = read_image(tmp_path / "small_sr2.png")
    assert out.pixels.shape == (18, 14, 3) and out.alpha.shape == (18, 14)


@pytest.mark.parametrize("args, match", [
    (["--task", "motion-deblur"], "no bundled weights.*convert"),
    (["--task", "sr2", "--weights", "UNET"], "eamamba model, but task 'sr2' needs an eamambasr"),
    (["--task", "defocus-deblur", "--weights", "UNET", "IMG", "IMG"], "dual-pixel"),
    (["--weights", "DUAL", "IMG"], "6 input channels"),
    (["--weights", "nope.npz", "IMG"], "no such weights"),
    (["--weights", "UNET", "NOTIMG"], "cannot read image"),
    (["--weights", "UNET", "IMG", "--tile", "4"], "--tile"),
    (["--weights", "UNET", "IMG", "nofolder/b.png"], "nofolder/b.png: no such file"),   # not "no output folder"
])
def test_bad_requests_are_one_line_errors(tmp_path, unet, capsys, args, match):
    img = tmp_path / "img.png"
    write_image(img, image(8, 8, 3) / 255.0, 8)
    notimg = tmp_path / "notimg.png"
    notimg.write_text("hello")
    dual = write_model(tmp_path / "dual.npz", dual_pixel_task=True, inp_channels=6)
    subst = {"UNET": unet, "DUAL": dual, "IMG": str(img), "NOTIMG": str(notimg)}
    assert restore.main([subst.get(a, a) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    import re
    assert re.search(match, err), err


def test_dual_pixel_takes_two_views(tmp_path, capsys):
    dual = write_model(tmp_path / "dual.npz", dual_pixel_task=True, inp_channels=6)
    left, right = tmp_path / "l.png", tmp_path / "r.png"
    write_image(left, image(8, 16, 3) / 255.0, 8)
    write_image(right, image(8, 16, 3, seed=1) / 255.0, 8)
    assert restore.main([str(left), str(right), "--task", "defocus-deblur", "--weights", dual]) == 0
    assert read_image(tmp_path / "l_defocus-deblur.png").pixels.shape == (8, 16, 3)


def test_list_tasks(capsys):
    assert restore.main(["--list-tasks"]) == 0
    out = capsys.readouterr().out
    assert "denoise" in out and "realsr4" in out and "bundled" in out


def test_outputs_get_ordinary_permissions(tmp_path):
    import os
    path = tmp_path / "p.png"
    write_image(path, np.zeros((4, 4, 3)), 8)
    umask = os.umask(0)
    os.umask(umask)
    assert (path.stat().st_mode & 0o777) == (0o666 & ~umask)


# ------------------------------------------------------------- writers and user errors
def files_in(folder):
    """Every entry of `folder` (hidden temporary files included), recursively, as relative names."""
    import os
    return sorted(os.path.relpath(os.path.join(d, n), folder) for d, _, names in os.walk(folder) for n in names)


def umask_mode():
    import os
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def test_atomic_output_never_clobbers_and_leaves_nothing_on_failure(tmp_path):
    from eamamba_ref.io.atomic import OutputRefused, atomic_output
    path = tmp_path / "x.txt"
    with atomic_output(path) as tmp:
        open(tmp, "w").write("one")
    assert path.read_text() == "one" and (path.stat().st_mode & 0o777) == umask_mode()
    with pytest.raises(OutputRefused, match="exists"):
        with atomic_output(path) as tmp:
            pass
    with pytest.raises(RuntimeError):
        with atomic_output(path, overwrite=True) as tmp:
            open(tmp, "w").write("half")
            raise RuntimeError("the writer failed")
    assert path.read_text() == "one" and files_in(tmp_path) == ["x.txt"]
    # the destination appears while writing: not replaced, the temp file is removed
    with pytest.raises(OutputRefused, match="exists"):
        with atomic_output(tmp_path / "y.txt") as tmp:
            open(tmp, "w").write("mine")
            (tmp_path / "y.txt").write_text("theirs")
    assert (tmp_path / "y.txt").read_text() == "theirs" and files_in(tmp_path) == ["x.txt", "y.txt"]


def no_space(*args, **kwargs):
    """A writer on a full disk: some bytes, then ENOSPC (as the OS reports it, without a file name)."""
    import errno
    path = args[0]
    open(path, "wb").write(b"\x89PNG partial")
    raise OSError(errno.ENOSPC, "No space left on device")


def read_only_folder(*args, **kwargs):
    import errno
    raise OSError(errno.EROFS, "Read-only file system", kwargs.get("dir"))


@pytest.mark.parametrize("case, match", [
    ("missing folder", "output folder .* does not exist"),
    ("not a folder", "exists and is not a folder"),
    ("weights folder", "is a folder; --weights takes a weights file"),
    ("read-only", "Read-only file system"),
    ("disk full", r"out\.png: No space left on device"),
])
def test_output_path_problems_are_one_line_errors_and_leave_no_files(tmp_path, unet, capsys, monkeypatch, case, match):
    import re

    import imageio.v3 as iio

    from eamamba_ref.io import atomic
    src = tmp_path / "a.png"
    write_image(src, image(8, 8, 3) / 255.0, 8)
    (tmp_path / "plainfile").write_text("not a folder")
    args = {"missing folder": ["-o", str(tmp_path / "missing" / "out.png")],
            "not a folder": ["-o", str(tmp_path / "plainfile")],
            "weights folder": ["-o", str(tmp_path / "out.png"), "--weights", str(tmp_path)],
            "read-only": ["-o", str(tmp_path / "out.png")],
            "disk full": ["-o", str(tmp_path / "out.png")]}[case]
    if case == "read-only":
        monkeypatch.setattr(atomic.tempfile, "mkstemp", read_only_folder)
    if case == "disk full":
        monkeypatch.setattr(iio, "imwrite", no_space)
    before = files_in(tmp_path)
    weights = [] if "--weights" in args else ["--weights", unet]
    assert restore.main([str(src), *weights, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and re.search(match, err), err
    assert files_in(tmp_path) == before                     # no output, no temporary file


def test_several_inputs_with_one_output_are_refused_before_any_work(tmp_path, unet, capsys):
    src = tmp_path / "a.png"
    write_image(src, image(8, 8, 3) / 255.0, 8)
    write_image(tmp_path / "a.jpg", image(8, 8, 3) / 255.0, 8)      # a.jpg -> a_denoise.png too
    assert restore.main([str(src), str(tmp_path / "a.jpg"), "--weights", unet]) == 2
    assert "both be written" in capsys.readouterr().err
    assert files_in(tmp_path) == ["a.jpg", "a.png"]                  # not even the first one


def test_demo_writes_into_its_own_folder(tmp_path, unet, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert restore.main(["--weights", unet, "--tile", "64", "--tile-overlap", "8"]) == 0
    assert files_in(tmp_path) == [f"{demo.DEMO_DIR}/eamamba_demo_denoise.png",
                                  f"{demo.DEMO_DIR}/eamamba_demo_denoise_comparison.png"]
    for name in files_in(tmp_path):
        assert ((tmp_path / name).stat().st_mode & 0o777) == umask_mode()
    assert restore.main(["--weights", unet]) == 2                     # a second demo does not replace it
    assert "exists" in capsys.readouterr().err


def test_ctrl_c_is_one_line_and_exit_status_130(tmp_path, unet, capsys, monkeypatch):
    src = tmp_path / "a.png"
    write_image(src, image(8, 8, 3) / 255.0, 8)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(pipeline, "restore_array", interrupted)
    assert restore.main([str(src), "--weights", unet]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"
    assert files_in(tmp_path) == ["a.png"]


def test_evaluate_never_replaces_a_csv(tmp_path, capsys):
    from eamamba_ref.apps import evaluate
    (tmp_path / "data").mkdir()
    write_image(tmp_path / "data" / "x.png", image(16, 16, 3) / 255.0, 8)
    csv_path = tmp_path / "results.csv"
    csv_path.write_text("precious\n")
    args = ["--data", str(tmp_path / "data"), "--no-model", "--baselines", "none", "--csv", str(csv_path)]
    assert evaluate.main(args) == 2
    assert "exists" in capsys.readouterr().err and csv_path.read_text() == "precious\n"
    assert evaluate.main(args + ["--overwrite"]) == 0
    assert csv_path.read_text().startswith("image,method,psnr,ssim,seconds")
    assert (csv_path.stat().st_mode & 0o777) == umask_mode()
    assert files_in(tmp_path) == ["data/x.png", "results.csv"]


@settings(max_examples=60, deadline=None)
@given(steps=st.lists(st.tuples(st.booleans(), st.booleans(), st.binary(max_size=64)), min_size=1, max_size=6))
def test_atomic_output_holds_the_last_complete_permitted_write(steps):
    """Any sequence of writes (overwrite or not, failing midway or not): the file holds the bytes of
    the last write that was allowed and completed, or does not exist; no temporary file remains."""
    import os
    import tempfile

    from eamamba_ref.io.atomic import OutputRefused, atomic_output
    with tempfile.TemporaryDirectory() as folder:
        path = f"{folder}/out.bin"
        want = None
        for overwrite, fail, data in steps:
            allowed = want is None or overwrite
            try:
                with atomic_output(path, overwrite) as tmp:
                    with open(tmp, "wb") as f:
                        f.write(data[: len(data) // 2])
                        if fail:
                            raise RuntimeError("writer failed midway")
                        f.write(data[len(data) // 2:])
            except OutputRefused:
                assert not allowed
            except RuntimeError:
                assert allowed and fail
            else:
                assert allowed and not fail
                want = data
            assert os.listdir(folder) == ([] if want is None else ["out.bin"])
            if want is not None:
                assert open(path, "rb").read() == want
