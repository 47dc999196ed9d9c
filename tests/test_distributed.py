"""Restoring on a Dask cluster: many images (batch) and one image in chunks (map_overlap).

A LocalCluster with 2 workers runs in this process (threads, not processes) so the tests are fast;
the models are tiny random ones written like tests/test_restore.py's. The single-process restore
command is the reference everywhere: the cluster must write the very same pixels.
"""
import os

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

pytest.importorskip("distributed")
tifffile = pytest.importorskip("tifffile")

from eamamba_ref.apps import cluster, distributed as dist, inference, pipeline, restore  # noqa: E402
from eamamba_ref.io.images import ImageError, read_image, write_image  # noqa: E402
from eamamba_ref.io.tiff import TiffRegions  # noqa: E402

from test_restore import files_in, image, umask_mode, write_model  # noqa: E402

# another cluster on this machine may hold Dask's default HTTP port; the in-process one takes any
pytestmark = pytest.mark.filterwarnings("ignore:Port .* is already in use")


@pytest.fixture(scope="module")
def unet(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("w") / "unet.npz")


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None)
    c = Client(cluster)
    try:
        yield c
    finally:
        c.close()
        cluster.close()


def make_folder(folder, corrupt=True):
    """Images of several kinds, plus (optionally) a file that is not an image at all."""
    folder.mkdir()
    write_image(folder / "rgb.png", image(13, 21, 3) / 255.0, 8)
    write_image(folder / "gray16.png", (image(16, 9, 1, np.uint16) / 65535.0)[..., None], 16)
    write_image(folder / "rgba.tif", image(12, 12, 3, seed=2) / 255.0, 8, alpha=image(12, 12, 1, seed=3))
    if corrupt:
        (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really" * 8)
    return folder


def reference_outputs(folder, unet, ref_dir, extra=()):
    """Restore every good image one by one with the single-process command."""
    for name in ["rgb.png", "gray16.png", "rgba.tif"]:
        assert restore.main([str(folder / name), "--weights", unet, "-o", str(ref_dir), *extra]) == 0


# ------------------------------------------------------------------------------ batch
def test_batch_matches_single_process_resumes_and_isolates_failures(tmp_path, unet, client):
    folder = make_folder(tmp_path / "in")
    out = tmp_path / "out"
    opts = dist.Settings(weights=unet, tile=8, overlap=2)
    report = dist.restore_batch(dist.find_images([str(folder)]), opts, client, str(out), progress=False)

    assert sorted(os.path.basename(d) for _, d in report.written) == [
        "gray16_denoise.png", "rgb_denoise.png", "rgba_denoise.tif"]
    assert not report.skipped and not report.ok
    [(bad, reason)] = report.failed                       # the corrupt file fails alone, with its reason
    assert bad.endswith("broken.png") and "cannot read image" in reason

    reference_outputs(folder, unet, tmp_path / "ref", ["--tile", "8", "--tile-overlap", "2"])
    for name in ["rgb_denoise.png", "gray16_denoise.png", "rgba_denoise.tif"]:
        got, want = read_image(out / name), read_image(tmp_path / "ref" / name)
        assert np.array_equal(got.pixels, want.pixels) and got.bit_depth == want.bit_depth
        assert (got.alpha is None) == (want.alpha is None)
    assert np.array_equal(read_image(out / "rgba_denoise.tif").alpha, image(12, 12, 1, seed=3))

    # a rerun skips what is done (without rewriting it) and retries only the failure
    stamps = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()}
    again = dist.restore_batch(dist.find_images([str(folder)]), opts, client, str(out), progress=False)
    assert not again.written and len(again.skipped) == 3 and len(again.failed) == 1
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()} == stamps
    assert not [p for p in out.iterdir() if p.name.startswith(".")]      # no temp files left


def test_command_on_a_folder_reports_failures_and_resumes(tmp_path, unet, client, capsys):
    folder = make_folder(tmp_path / "in")
    args = [str(folder), "--weights", unet, "--scheduler", client.scheduler.address]
    assert restore.main(args) == 1                        # one image failed -> exit status 1
    text = capsys.readouterr().out
    assert "restored 3" in text and "failed 1" in text
    assert "broken.png: " in text and "cannot read image" in text
    assert (folder / "rgb_denoise.png").exists()          # no --out: next to the inputs
    os.remove(folder / "broken.png")
    # rerun on the same folder: earlier outputs are neither inputs nor redone
    assert restore.main(args) == 0
    text = capsys.readouterr().out
    assert "restored 0" in text and "skipped 3" in text and "resume" in text
    assert not list(folder.glob("*_denoise_denoise*"))
    reference_outputs(folder, unet, tmp_path / "ref")
    got, want = read_image(folder / "rgb_denoise.png"), read_image(tmp_path / "ref" / "rgb_denoise.png")
    assert np.array_equal(got.pixels, want.pixels)


def test_command_with_a_glob_and_out_folder(tmp_path, unet, client, capsys):
    folder = make_folder(tmp_path / "in", corrupt=False)
    out = tmp_path / "out"
    assert restore.main([str(folder / "*.png"), "--weights", unet, "--out", str(out),
                         "--scheduler", client.scheduler.address]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["gray16_denoise.png", "rgb_denoise.png"]


@pytest.mark.parametrize("extra, match", [
    (["--out", "x.png"], "must be a folder"),
    (["--workers", "3"], "running scheduler brings its own workers"),
    (["--task", "defocus-deblur", "--weights", "DUAL"], "two views"),
    (["--chunk", "8", "--tile", "16", "--tile-overlap", "4"], "at least the tile size"),
    (["--chunk", "64", "--ensemble"], "no --ensemble"),
])
def test_cluster_mode_bad_requests_are_one_line_errors(tmp_path, unet, client, capsys, extra, match):
    folder = make_folder(tmp_path / "in", corrupt=False)
    dual = write_model(tmp_path / "dual.npz", dual_pixel_task=True, inp_channels=6)
    args = [str(folder), "--weights", unet, "--scheduler", client.scheduler.address] + extra
    assert restore.main([dual if a == "DUAL" else a for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and match in err, err


@pytest.mark.parametrize("case, match", [
    ("empty folder", "no images"),
    ("a.png and a.jpg", "would both be written"),
    ("workers 0", "--workers must be >= 1, got 0"),
    ("glob matching nothing", "no files match"),
    ("out names a file", "--out must be a folder"),
    ("chunk smaller than tile", "at least the tile size"),
    ("tile without room for the overlap", "--tile-overlap in [0, tile)"),
    ("chunk 0", "--chunk must be a positive size"),
    ("empty folder named dd.png", "no images"),
    ("out is a plain file", "exists and is not a folder"),
])
def test_folder_and_cluster_requests_fail_with_one_line_before_the_cluster_starts(tmp_path, unet, capsys, case,
                                                                                  match):
    folder = make_folder(tmp_path / "in", corrupt=False)
    (tmp_path / "empty").mkdir()
    (tmp_path / "dd.png").mkdir()
    (tmp_path / "plain").write_text("x")
    twins = tmp_path / "twins"
    twins.mkdir()
    write_image(twins / "a.png", image(8, 8, 3) / 255.0, 8)
    write_image(twins / "a.jpg", image(8, 8, 3) / 255.0, 8)
    args = {"empty folder": [str(tmp_path / "empty")],
            "a.png and a.jpg": [str(twins)],
            "workers 0": [str(folder), "--workers", "0"],
            "glob matching nothing": [str(tmp_path / "nothing" / "*.png")],
            "out names a file": [str(folder), "--out", str(tmp_path / "file.png")],
            "chunk smaller than tile": [str(folder / "rgba.tif"), "--chunk", "8", "--tile", "16", "--tile-overlap", "4"],
            "tile without room for the overlap": [str(folder / "rgba.tif"), "--chunk", "64", "--tile", "16"],
            "chunk 0": [str(folder / "rgba.tif"), "--chunk", "0"],
            "empty folder named dd.png": [str(tmp_path / "dd.png")],
            "out is a plain file": [str(folder), "--out", str(tmp_path / "plain")]}[case]
    before = files_in(tmp_path)
    # no --scheduler: a local cluster would be started (seconds) if the request got that far
    assert restore.main(args + ["--weights", unet]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and match in err, err
    assert files_in(tmp_path) == before


def test_an_unwritable_out_folder_is_one_line_before_the_cluster_starts(tmp_path, unet, capsys, monkeypatch):
    from eamamba_ref.io import atomic
    from test_restore import read_only_folder
    folder = make_folder(tmp_path / "in", corrupt=False)
    monkeypatch.setattr(atomic.tempfile, "mkstemp", read_only_folder)      # as on a read-only mount
    assert restore.main([str(folder), "--weights", unet, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {tmp_path / 'out'}: Read-only file system"
    assert files_in(tmp_path / "out") == []


def test_errors_under_python_dash_m_are_one_line(tmp_path, unet):
    """`python -m eamamba_ref.restore` runs restore.py as __main__: its errors must still be caught."""
    import subprocess
    import sys
    (tmp_path / "empty").mkdir()
    for args in [[str(tmp_path / "empty")], [str(tmp_path / "*.png")]]:
        run = subprocess.run([sys.executable, "-m", "eamamba_ref.restore", *args, "--weights", unet],
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 2 and run.stderr.startswith("error: ") and run.stderr.count("\n") == 1, run.stderr


def test_an_out_folder_named_like_an_image_is_a_folder(tmp_path, unet, client):
    folder = make_folder(tmp_path / "in", corrupt=False)
    (tmp_path / "dd.png").mkdir()
    assert restore.main([str(folder), "--weights", unet, "--out", str(tmp_path / "dd.png"),
                         "--scheduler", client.scheduler.address]) == 0
    assert sorted(p.name for p in (tmp_path / "dd.png").iterdir()) == [
        "gray16_denoise.png", "rgb_denoise.png", "rgba_denoise.tif"]


def test_without_dask_the_error_names_the_extra(tmp_path, unet, capsys, monkeypatch):
    import sys
    folder = make_folder(tmp_path / "in", corrupt=False)
    monkeypatch.setitem(sys.modules, "distributed", None)        # `import distributed` now fails
    assert restore.main([str(folder), "--weights", unet, "--scheduler", "local"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and 'pip install "eamamba_ref[dask]"' in err, err


def test_an_unreachable_scheduler_fails_fast(tmp_path, unet, capsys):
    import time
    folder = make_folder(tmp_path / "in", corrupt=False)
    start = time.monotonic()
    assert restore.main([str(folder), "--weights", unet, "--scheduler", "tcp://127.0.0.1:1"]) == 2
    assert time.monotonic() - start < cluster.CONNECT_TIMEOUT + 10          # not distributed's 30 s
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot connect to the Dask scheduler at tcp://127.0.0.1:1") and "\n" not in err


def test_ctrl_c_in_folder_mode_says_what_is_done(tmp_path, unet, client, capsys, monkeypatch):
    import distributed
    folder = make_folder(tmp_path / "in", corrupt=False)
    real = distributed.as_completed

    def one_then_ctrl_c(futures):
        yield next(iter(real(futures)))
        raise KeyboardInterrupt
    monkeypatch.setattr(distributed, "as_completed", one_then_ctrl_c)
    args = [str(folder), "--weights", unet, "--scheduler", client.scheduler.address, "--out", str(tmp_path / "out")]
    assert restore.main(args) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "interrupted; 1 of 3 done, rerun to resume"
    monkeypatch.setattr(distributed, "as_completed", real)
    assert restore.main(args) == 0                                  # the rerun finishes the job
    assert len(list((tmp_path / "out").iterdir())) == 3
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]


def test_weights_are_loaded_once_per_worker_process(tmp_path, unet, client, monkeypatch):
    loads = []
    real = pipeline.load_task_model
    monkeypatch.setattr(pipeline, "load_task_model", lambda *a, **k: loads.append(a) or real(*a, **k))
    monkeypatch.setattr(cluster, "_MODELS", {})              # both in-process workers share this process
    folder = make_folder(tmp_path / "in", corrupt=False)
    report = dist.restore_batch(dist.find_images([str(folder)]), dist.Settings(weights=unet), client,
                                str(tmp_path / "out"), progress=False)
    assert len(report.written) == 3 and len(loads) == 1


def test_two_inputs_with_the_same_output_are_refused(tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    with pytest.raises(restore.RestoreError, match="both be written"):
        dist.plan_outputs([str(tmp_path / "a" / "x.png"), str(tmp_path / "b" / "x.png")],
                          restore.TASKS["denoise"], str(tmp_path / "out"))
    with pytest.raises(restore.RestoreError, match="no files match"):
        dist.find_images([str(tmp_path / "*.png")])


# ---------------------------------------------------------------- one image, in chunks
def context_model(x):
    """A stand-in with spatial context (running sums): any change in tiling changes its output."""
    return np.cumsum(np.cumsum(x, axis=2), axis=3) / np.float32(x.shape[2] * x.shape[3])


def context_model_x2(x):
    y = context_model(x)
    return np.repeat(np.repeat(y, 2, axis=2), 2, axis=3)


@settings(max_examples=60, deadline=None)
@given(h=st.integers(8, 70), w=st.integers(8, 70), tile=st.integers(8, 24), data=st.data())
def test_each_chunk_with_its_halo_equals_the_tiled_image_exactly(h, w, tile, data):
    overlap = data.draw(st.integers(0, tile - 1))
    chunk = data.draw(st.integers(tile, max(tile, 40)))
    x = np.random.default_rng(h * 100 + w).random((1, 3, h, w), dtype=np.float32)
    ych, xch = dist.chunk_sizes(h, chunk, tile), dist.chunk_sizes(w, chunk, tile)
    assert sum(ych) == h and min(ych) >= min(tile, h)
    dy, dx = dist.halo(h, ych, tile, overlap), dist.halo(w, xch, tile, overlap)
    assert (len(ych) == 1 or dy < min(ych)) and (len(xch) == 1 or dx < min(xch))   # map_overlap's limit
    iy, ix = data.draw(st.integers(0, len(ych) - 1)), data.draw(st.integers(0, len(xch) - 1))
    y0, x0 = sum(ych[:iy]), sum(xch[:ix])
    y1, x1 = y0 + ych[iy], x0 + xch[ix]
    oy, ox = max(0, y0 - dy), max(0, x0 - dx)
    window = x[:, :, oy:min(h, y1 + dy), ox:min(w, x1 + dx)]
    for model, s in [(context_model, 1), (context_model_x2, 2)]:
        want = inference.tiled(model, x, tile, overlap)[:, :, s * y0:s * y1, s * x0:s * x1]
        got = dist.tiled_region(model, window, (oy, ox), ((y0, y1), (x0, x1)), (h, w), tile, overlap)
        assert np.array_equal(got, want)                 # bit for bit, not just close


@pytest.mark.parametrize("kind", ["contiguous", "tiled-zlib", "strips-zlib", "separate-planes"])
def test_tiff_regions_read_exactly_the_region(tmp_path, kind):
    data = image(37, 29, 4 if kind != "separate-planes" else 3, np.uint16, seed=5)
    path = tmp_path / "x.tif"
    kw = {"contiguous": {}, "tiled-zlib": dict(tile=(16, 16), compression="zlib"),
          "strips-zlib": dict(rowsperstrip=5, compression="zlib"),
          "separate-planes": dict(planarconfig="separate")}[kind]
    tifffile.imwrite(path, data if kind != "separate-planes" else np.moveaxis(data, -1, 0),
                     photometric="rgb", **kw)
    src = TiffRegions(path)
    assert src.shape == data.shape and src.dtype == np.uint16
    for ys, xs in [(slice(0, 37), slice(0, 29)), (slice(3, 20), slice(15, 29)), (slice(33, 37), slice(0, 1))]:
        assert np.array_equal(src[ys, xs], data[ys, xs])


@pytest.mark.parametrize("c, dtype, kw", [(3, np.uint16, {}),                          # memory-mapped input
                                          (4, np.uint8, dict(tile=(16, 16), compression="zlib")),
                                          (1, np.uint8, dict(rowsperstrip=7, compression="zlib"))])
def test_restore_large_writes_the_single_process_tiled_result(tmp_path, unet, client, c, dtype, kw):
    data = image(41, 58, c, dtype, seed=c)
    src = tmp_path / "big.tif"
    tifffile.imwrite(src, data, photometric="rgb" if c >= 3 else "minisblack", **kw)
    out = tmp_path / "big_restored.tif"
    dist.restore_large(src, out, "denoise", unet, client=client, chunk=24, tile=16, overlap=4, progress=False)
    assert restore.main([str(src), "--weights", unet, "--tile", "16", "--tile-overlap", "4",
                         "-o", str(tmp_path / "ref.tif")]) == 0
    got, want = tifffile.imread(out), tifffile.imread(tmp_path / "ref.tif")
    assert got.dtype == want.dtype and got.shape == want.shape == data.shape
    assert np.array_equal(got, want)
    if c == 4:
        assert np.array_equal(got[..., 3], data[..., 3])          # alpha passed through
    assert (out.stat().st_mode & 0o777) == umask_mode()          # not the temporary file's 0600
    with pytest.raises(ImageError, match="exists"):               # never replaced without asking
        dist.restore_large(src, out, "denoise", unet, client=client, chunk=24, tile=16, overlap=4, progress=False)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_super_resolution_in_chunks(tmp_path, client):
    sr = write_model(tmp_path / "sr2.npz", "eamambasr", upscale=2)
    data = image(20, 33, 3, seed=9)
    x = data.transpose(2, 0, 1)[None].astype(np.float32) / np.float32(255)
    got = dist.large_array(data, "sr2", sr, chunk=16, tile=12, overlap=3).compute()
    model = pipeline.load(sr)
    want = inference.tiled(model, x, 12, 3)[0].transpose(1, 2, 0)
    assert got.shape == (40, 66, 3)
    assert np.array_equal(got, np.round(np.clip(want, 0, 1) * 255).astype(np.uint8))


def test_command_chunked(tmp_path, unet, client, capsys):
    data = image(30, 30, 3, np.uint16)
    src = tmp_path / "big.tif"
    tifffile.imwrite(src, data)
    args = [str(src), "--weights", unet, "--chunk", "16", "--tile", "16", "--tile-overlap", "4",
            "--scheduler", client.scheduler.address, "--out", str(tmp_path / "out")]
    assert restore.main(args) == 0
    out = tmp_path / "out" / "big_denoise.tif"
    assert tifffile.imread(out).shape == (30, 30, 3)
    assert restore.main(args) == 0 and "skipped" in capsys.readouterr().out


@pytest.mark.parametrize("call, match", [
    (dict(task_name="denoise", chunk=8, tile=16, overlap=4), "at least the tile"),
    (dict(task_name="realsr2"), "whole image"),
    (dict(task_name="denoise", tile=16, overlap=16), "tile-overlap"),
])
def test_chunked_bad_requests(tmp_path, unet, call, match):
    src = tmp_path / "a.tif"
    tifffile.imwrite(src, image(20, 20, 3))
    with pytest.raises(ValueError, match=match):
        dist.restore_large(src, tmp_path / "b.tif", weights=unet, progress=False, **call)
    with pytest.raises(ImageError, match="TIFF only"):
        dist.restore_large(src, tmp_path / "b.png", weights=unet, progress=False)


def test_dask_worker_processes_write_the_bytes_of_single_image_runs(tmp_path):
    """The folder command on a real local cluster (worker processes, each with its own thread
    settings from Dask) against the single-image command in a separate process with 2 threads
    for every library: the same output files, byte for byte, for colour and gray images (the
    bundled demo weights; the gray one goes to the gray model)."""
    import subprocess
    import sys

    rng = np.random.default_rng(11)
    src = tmp_path / "in"
    src.mkdir()
    write_image(src / "colour.png", rng.random((40, 56, 3)).astype(np.float32), 8)
    write_image(src / "gray.png", rng.random((48, 32, 1)).astype(np.float32), 16)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    base = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    base["PYTHONPATH"] = root + os.pathsep + base.get("PYTHONPATH", "")

    def run(args, threads=None):
        env = dict(base, **({f"{k}_NUM_THREADS": str(threads) for k in ("OPENBLAS", "OMP", "NUMBA", "MKL")}
                            if threads else {}))
        proc = subprocess.run([sys.executable, "-m", "eamamba_ref.restore", *args], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr

    run([str(src), "--out", str(tmp_path / "dask"), "--workers", "2", "--sigma", "20"])
    for name in ("colour.png", "gray.png"):
        run([str(src / name), "-o", str(tmp_path / f"single_{name}"), "--sigma", "20"], threads=2)
        stem = os.path.splitext(name)[0]
        batch = (tmp_path / "dask" / f"{stem}_denoise.png").read_bytes()
        assert batch == (tmp_path / f"single_{name}").read_bytes()


def test_max_pixels_reaches_the_batch_workers(tmp_path, unet, client, capsys):
    """A folder run refuses what the single-image command refuses, with the same --max-pixels."""
    folder = make_folder(tmp_path / "in", corrupt=False)            # largest image: 13 x 21 = 273 pixels
    args = [str(folder), "--weights", unet, "--out", str(tmp_path / "out"), "--scheduler",
            client.scheduler.address, "--max-pixels", "200"]
    assert restore.main(args) == 1                                  # one image failed
    text = capsys.readouterr().out
    assert "failed 1" in text and "rgb.png: " in text and "over the limit of 200 pixels" in text
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gray16_denoise.png", "rgba_denoise.tif"]
