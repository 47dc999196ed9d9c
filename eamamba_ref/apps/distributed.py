"""Scale the restore command out with Dask: many images, and images larger than memory.

Two jobs, both on a `dask.distributed` cluster (a LocalCluster of worker processes by default, or
any running scheduler by address):

- `restore_batch`: one task per image. Each worker loads the weights once (a per-process cache
  keyed by the weights file), writes its result atomically with `images.write_image`, and reports
  failures as values instead of raising, so one corrupt file never stops the others. Outputs that
  already exist are skipped before any work is sent, which makes a rerun resume where it stopped
  (writes are atomic, so an existing output is always a complete one).
- `restore_large`: one image, read and written chunk by chunk as TIFF (tifffile, no zarr) and
  restored with `dask.array.map_overlap`. Each chunk is computed from the overlapping tiles of
  `inference.tiled`'s global tile grid that touch it, blended with the same weights in the same
  order, so the result is bit-for-bit the single-process `inference.tiled(model, x, tile, overlap)`
  (see `tiled_region`). Per-worker memory follows the chunk and tile size, not the image size.

The cluster itself (start, connect, close, the per-worker weights cache) is `cluster.py`; the
TIFF regions read and written are `io/tiff.py`. Paths (inputs, outputs, weights) must be visible
to the workers under the same names: on one machine that is automatic; on a multi-machine cluster
use a shared filesystem.
"""
from __future__ import annotations

import glob
import os
import secrets
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from eamamba_ref.apps import inference
from eamamba_ref.io.atomic import atomic_output, check_writable, remove_temporaries, tagged
from eamamba_ref.apps.errors import Interrupted, RestoreError, one_line
from eamamba_ref.io.images import MAX_PIXELS, Image, ImageError, read_image, to_integer, write_image
from eamamba_ref.io.tiff import TiffRegionWriter, TiffRegions
from eamamba_ref.apps import pipeline
from eamamba_ref.apps.cluster import connect, require_dask, worker_models
from eamamba_ref.apps.pipeline import (default_output, from_model_output, names_a_file,
                                       output_folder, restore_images, to_model_input)
from eamamba_ref.apps.tasks import TASKS

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


# ------------------------------------------------------------------------ many images
@dataclass(frozen=True)
class Settings:
    """What every image of a batch is restored with (mirrors the restore command's options)."""
    task: str = "denoise"
    weights: str | None = None
    backend: str | None = None
    tile: int | None = None
    overlap: int = 32
    ensemble: bool = False
    sigma: float | None = None
    seed: int = 0
    overwrite: bool = False
    max_pixels: int | None = MAX_PIXELS      # images.read_image's limit (--max-pixels)
    run_tag: str = ""           # names this run's temporary files (see atomic.tagged)


@dataclass
class BatchReport:
    """Outcome of `restore_batch`: lists of (input, output) pairs, and (input, reason) failures."""
    written: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    failed: list = field(default_factory=list)

    @property
    def ok(self):
        return not self.failed


def find_images(specs):
    """Input files from files, folders (their images, not recursive) and glob patterns, sorted.

    Outputs of an earlier run in the same folder (`a_denoise.png` next to `a.png`) are not inputs:
    that is what `_drop_own_outputs` removes once the task is known.
    """
    found = []
    for spec in specs:
        if os.path.isdir(spec):
            hits = sorted(os.path.join(spec, n) for n in os.listdir(spec)
                          if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith(".")
                          and os.path.isfile(os.path.join(spec, n)))
            if not hits:
                raise RestoreError(f"{spec}: no images (.png, .jpg, .tif) in this folder")
        elif os.path.exists(spec) or not glob.has_magic(spec):
            hits = [spec]                   # a file (or a missing one: reported as that image's failure)
        else:
            hits = sorted(p for p in glob.glob(spec) if os.path.isfile(p))
            if not hits:
                raise RestoreError(f"{spec}: no files match this pattern")
        found += [h for h in hits if h not in found]
    return found


def _drop_own_outputs(paths, task):
    """Leave out files that are another input's default output (a rerun on the same folder)."""
    outputs = {os.path.abspath(default_output(p, task)) for p in paths}
    return [p for p in paths if os.path.abspath(p) not in outputs]


def plan_outputs(paths, task, out_dir=None):
    """(input, output) pairs with the restore command's naming; two inputs may not share an output.

    `out_dir` is a folder (created if needed), whatever its name."""
    if out_dir:
        output_folder(out_dir)
    return [(group[0], dst) for group, dst in pipeline.plan_outputs([[p] for p in paths], task, out_dir)]


def restore_one(src, dst, settings: Settings):
    """Restore one image file on a worker: ('written' | 'skipped' | 'failed', src, dst, reason).

    Never raises: a failure is a value, so it cannot stop the other images. Same steps as
    `restore.restore_files` (the tests check the outputs are identical), without its printing.
    """
    try:
        if os.path.exists(dst) and not settings.overwrite:
            return ("skipped", src, dst, "output exists")
        task = TASKS[settings.task]
        models = worker_models(settings.task, settings.weights, settings.backend)
        image = read_image(src, settings.max_pixels)
        out, alpha = restore_images(task, models, [image], settings.sigma, settings.seed, settings.tile,
                                    settings.overlap, settings.ensemble)
        with tagged(settings.run_tag):
            write_image(dst, out, image.bit_depth, alpha, overwrite=settings.overwrite)
        return ("written", src, dst, "")
    except ImageError as err:
        if "exists" in str(err) and os.path.exists(dst):     # another run wrote it meanwhile
            return ("skipped", src, dst, "output exists")
        return ("failed", src, dst, str(err))
    except ValueError as err:               # this project's errors: already one line for the user
        return ("failed", src, dst, str(err).splitlines()[0] if str(err) else type(err).__name__)
    except Exception as err:                # anything else: still this image's failure only
        return ("failed", src, dst, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")


def restore_batch(paths, settings: Settings, client, out_dir=None, progress=True):
    """Restore every image of `paths` on the cluster behind `client`, one task per image.

    Outputs are named like the restore command's (`a.png` -> `a_<task>.png`, in `out_dir` or next to
    the input). Existing outputs are skipped unless `settings.overwrite` (resumable reruns).
    Returns a `BatchReport`; `progress` shows a tqdm bar on stderr.
    """
    from distributed import as_completed
    from tqdm import tqdm

    task = TASKS[settings.task]
    if task.inputs != 1:
        raise RestoreError(f"task '{task.name}' takes two views per image; restore its pairs one by one")
    report = BatchReport()
    todo = []
    for src, dst in plan_outputs(paths, task, out_dir):
        if os.path.exists(dst) and not settings.overwrite:
            report.skipped.append((src, dst))
        else:
            todo.append((src, dst))
    futures = {client.submit(restore_one, src, dst, settings, pure=False): (src, dst) for src, dst in todo}
    with tqdm(total=len(futures), desc=f"restoring ({task.name})", unit="image", file=sys.stderr,
              disable=not progress or not futures) as bar, _interruptible(report, len(paths)):
        for fut in as_completed(futures):
            src, dst = futures[fut]
            if fut.status == "error":            # the worker died (e.g. out of memory) or was lost
                exc = fut.exception()
                status, reason = "failed", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            else:
                status, _, _, reason = fut.result()
            if status == "written":
                report.written.append((src, dst))
            elif status == "skipped":
                report.skipped.append((src, dst))
            else:
                report.failed.append((src, reason))
            fut.release()                        # results are tiny, but do not hold them
            bar.update(1)
    order = {p: i for i, p in enumerate(paths)}  # report in input order, not completion order
    for lst in (report.written, report.skipped, report.failed):
        lst.sort(key=lambda item: order.get(item[0], 0))
    return report


@contextmanager
def _interruptible(report, total):
    """Ctrl-C becomes `Interrupted` saying how much is done (every written output is complete)."""
    try:
        yield
    except KeyboardInterrupt:
        done = len(report.written) + len(report.skipped)
        raise Interrupted(f"interrupted; {done} of {total} done, rerun to resume") from None


# ----------------------------------------------------------- one image larger than memory
def tiled_region(run, x, origin, region, shape, tile, overlap):
    """`inference.tiled(run, X, tile, overlap)` restricted to one region, from a window of X.

    X is the whole `(B, C, H, W)` image (`shape` = (H, W)); `x` is the window of it that starts at
    `origin` = (y, x); `region` = ((y0, y1), (x0, x1)) is the part of the output wanted, in input
    pixels. The window must hold every tile of the global grid that touches the region (see
    `halo`). Those tiles are run and blended with the same weights, in the same order, as in
    `inference.tiled`, and tiles that do not touch the region contribute nothing there, so the
    result is bit-for-bit `inference.tiled(run, X, tile, overlap)[..., s*y0:s*y1, s*x0:s*x1]`
    (s = the model's scale) for a deterministic `run`.
    """
    H, W = shape
    (ry0, ry1), (rx0, rx1) = region
    oy, ox = origin
    if tile is None or (tile >= H and tile >= W):          # inference.tiled runs the whole image once
        y = inference.padded(run, x)
        s = y.shape[2] // x.shape[2]
        return y[:, :, s * (ry0 - oy):s * (ry1 - oy), s * (rx0 - ox):s * (rx1 - ox)]
    if tile < 8 or not 0 <= overlap < tile:
        raise ValueError(f"tile must be >= 8 and overlap in [0, tile), got tile {tile}, overlap {overlap}")
    ys, xs = inference._starts(H, tile, overlap), inference._starts(W, tile, overlap)
    th, tw = min(tile, H), min(tile, W)
    out = weight = None
    for i, y0 in enumerate(ys):
        if y0 >= ry1 or y0 + th <= ry0:
            continue
        for j, x0 in enumerate(xs):
            if x0 >= rx1 or x0 + tw <= rx0:
                continue
            if y0 < oy or x0 < ox or y0 + th > oy + x.shape[2] or x0 + tw > ox + x.shape[3]:
                raise ValueError(f"tile at ({y0}, {x0}) is not inside the window at {origin} of size {x.shape[2:]}")
            piece = inference.padded(run, np.ascontiguousarray(x[:, :, y0 - oy:y0 - oy + th, x0 - ox:x0 - ox + tw]))
            s = piece.shape[2] // th
            if out is None:
                out = np.zeros((x.shape[0], piece.shape[1], s * (ry1 - ry0), s * (rx1 - rx0)), np.float32)
                weight = np.zeros(out.shape[2:], np.float32)
            # the weights of inference.tiled: they depend on the neighbours in the global grid
            up = (ys[i - 1] + th - y0) * s if i > 0 else 0
            down = (y0 + th - ys[i + 1]) * s if i + 1 < len(ys) else 0
            left = (xs[j - 1] + tw - x0) * s if j > 0 else 0
            right = (x0 + tw - xs[j + 1]) * s if j + 1 < len(xs) else 0
            w = np.outer(inference._ramp(s * th, up, down), inference._ramp(s * tw, left, right))
            # the overlap of this tile's output with the region, in region and tile coordinates
            a0, a1 = max(y0, ry0), min(y0 + th, ry1)
            b0, b1 = max(x0, rx0), min(x0 + tw, rx1)
            dst = (slice(s * (a0 - ry0), s * (a1 - ry0)), slice(s * (b0 - rx0), s * (b1 - rx0)))
            src = (slice(s * (a0 - y0), s * (a1 - y0)), slice(s * (b0 - x0), s * (b1 - x0)))
            out[(slice(None), slice(None)) + dst] += piece[(slice(None), slice(None)) + src] * w[src]
            weight[dst] += w[src]
    return out / weight


def chunk_sizes(size, chunk, tile):
    """Chunks of one axis: `chunk` each; a remainder shorter than a tile joins the last chunk.

    No chunk is then narrower than the halo (< tile), which `map_overlap` needs.
    """
    n, rest = divmod(size, chunk)
    if n == 0:
        return (size,)
    if rest == 0 or rest >= tile:
        return (chunk,) * n + ((rest,) if rest else ())
    return (chunk,) * (n - 1) + (chunk + rest,)


def halo(size, chunks, tile, overlap):
    """Pixels of context each chunk of one axis needs: every grid tile touching it must fit."""
    if len(chunks) == 1:
        return 0                                             # one chunk holds the whole axis
    starts, t, need, a = inference._starts(size, tile, overlap), tile, 0, 0
    for c in chunks:
        b = a + c
        touching = [s for s in starts if s < b and s + t > a]
        need = max(need, a - min(touching), max(touching) + t - b)
        a = b
    return need


def _restore_chunk(block, block_id=None, *, spec):
    """map_overlap's function: integer pixels of one chunk + its halo -> the chunk's output pixels."""
    (ychunks, xchunks), (dy, dx), (H, W) = spec["chunks"], spec["depth"], spec["shape"]
    iy, ix = block_id[0], block_id[1]
    ry0, rx0 = sum(ychunks[:iy]), sum(xchunks[:ix])
    ry1, rx1 = ry0 + ychunks[iy], rx0 + xchunks[ix]
    oy, ox = max(0, ry0 - dy), max(0, rx0 - dx)              # boundary='none': no halo past the edge
    bits = 8 if block.dtype == np.uint8 else 16
    color = 1 if block.shape[2] in (1, 2) else 3
    image = Image(block[..., :color].astype(np.float32) / np.float32(255.0 if bits == 8 else 65535.0), None, bits)
    # the model by the file's channel count (not by looking: every chunk must take the same model)
    model = worker_models(spec["task"], spec["weights"], spec["backend"]).for_channels(color)
    x = to_model_input([image], TASKS[spec["task"]], model.config.inp_channels)   # no pre-upsampling here
    y = tiled_region(model, x, (oy, ox), ((ry0, ry1), (rx0, rx1)), (H, W), spec["tile"], spec["overlap"])
    out = to_integer(from_model_output(y, image, 1)[0], bits)
    if block.shape[2] in (2, 4):                                # alpha: passed through, resized
        s = out.shape[0] // (ry1 - ry0)
        alpha = block[ry0 - oy:ry1 - oy, rx0 - ox:rx1 - ox, -1:]
        out = np.concatenate([out, np.repeat(np.repeat(alpha, s, 0), s, 1)], axis=2)
    return out


def check_chunked(task, chunk, tile, overlap):
    """Validate a chunked-restore request (`RestoreError`); returns the chunk size to use."""
    if task.inputs != 1 or task.pre_upsample:
        raise RestoreError(f"task '{task.name}' cannot be restored chunk by chunk "
                           + ("(it takes two views)" if task.inputs != 1 else
                              "(its bicubic pre-upsampling needs the whole image)"))
    if tile is None or tile < 8 or not 0 <= overlap < tile:
        raise RestoreError(f"chunked restore needs --tile >= 8 and --tile-overlap in [0, tile), got {tile}, {overlap}")
    chunk = chunk or max(tile, 8 * (tile - overlap))
    if chunk < tile:
        raise RestoreError(f"--chunk ({chunk}) must be at least the tile size ({tile})")
    return chunk


def large_array(source, task_name, weights=None, backend=None, chunk=None, tile=256, overlap=32):
    """The lazy restored image: a `dask.array` `(s*H, s*W, C)` of the source's dtype.

    source: a `(H, W, C)` uint8/uint16 array-like with `shape`, `dtype` and region indexing (a
    `TiffRegions`, or a NumPy array). Chunks are `chunk` x `chunk` input pixels (default
    8 * (tile - overlap), at least a tile); each is restored by `map_overlap` from a halo wide enough for every tile
    of the global grid that touches it (`halo`).
    """
    import dask.array as da

    task = TASKS[task_name]
    chunk = check_chunked(task, chunk, tile, overlap)
    H, W, C = source.shape
    chunks = (chunk_sizes(H, chunk, tile), chunk_sizes(W, chunk, tile))
    depth = (halo(H, chunks[0], tile, overlap), halo(W, chunks[1], tile, overlap))
    s = task.scale
    x = da.from_array(source, chunks=chunks + ((C,),), asarray=True, lock=False, fancy=False)
    spec = dict(chunks=chunks, depth=depth, shape=(H, W), task=task_name, weights=weights, backend=backend,
                tile=tile, overlap=overlap)
    out_chunks = (tuple(s * c for c in chunks[0]), tuple(s * c for c in chunks[1]), (C,))
    return da.map_overlap(_restore_chunk, x, depth={0: depth[0], 1: depth[1], 2: 0}, boundary="none",
                          trim=False, allow_rechunk=False, chunks=out_chunks, dtype=source.dtype,
                          meta=np.empty((0, 0, 0), source.dtype), spec=spec)


def restore_large(in_path, out_path, task_name="denoise", weights=None, *, client=None, chunk=None, tile=256,
                  overlap=32, backend=None, overwrite=False, progress=True):
    """Restore a TIFF larger than memory into a TIFF, chunk by chunk, on `client`'s cluster.

    The output (uncompressed, written through a memory map, one chunk at a time) holds exactly the
    pixels `python -m eamamba_ref.restore IN --tile TILE --tile-overlap OVERLAP` would write. It is
    assembled in a temporary file next to `out_path` and moved into place at the end, so it appears
    complete or not at all; an existing `out_path` is not replaced unless `overwrite`. Without a
    client, Dask's local threads run it. Returns `out_path`.
    """
    import dask

    in_path, out_path = os.fspath(in_path), os.fspath(out_path)
    for p, what in [(in_path, "input"), (out_path, "output")]:
        if not p.lower().endswith((".tif", ".tiff")):
            raise ImageError(f"{p}: chunked restore reads and writes TIFF only ({what} must be .tif/.tiff)")
    if not os.path.isfile(in_path):
        raise ImageError(f"{in_path}: no such file")
    if os.path.abspath(in_path) == os.path.abspath(out_path):
        raise RestoreError(f"{out_path} is the input file; refusing to overwrite it")
    source = TiffRegions(in_path)
    y = large_array(source, task_name, weights, backend, chunk, tile, overlap)
    shape = y.shape if source.shape[2] > 1 else y.shape[:2]
    with atomic_output(out_path, overwrite, suffix=".tif", error=ImageError) as tmp:
        stored = y.store(TiffRegionWriter.create(tmp, shape, y.dtype), lock=False, compute=False)
        if client is not None:
            future = client.compute(stored)
            if progress:
                from distributed import progress as show
                show(future)
            future.result()
        elif progress:
            from dask.diagnostics import ProgressBar
            with ProgressBar(out=sys.stderr):
                dask.compute(stored)
        else:
            dask.compute(stored)
    return out_path


# ------------------------------------------------------------------------ the command
def wants_cluster(args):
    """Whether the restore command's arguments ask for this module."""
    return bool(args.scheduler or args.workers is not None or args.chunk
                or any(os.path.isdir(p) or (not os.path.exists(p) and glob.has_magic(p)) for p in args.inputs))


def run_command(task, args, backend):
    """The restore command's cluster mode; returns the exit status (0 all done, 1 some failed).

    Every check that can fail without the cluster (Dask installed, inputs, output names and
    folders) runs before the cluster starts, so a bad request costs no start-up time.
    """
    require_dask()
    if task.inputs != 1:
        raise RestoreError(f"task '{task.name}' takes two views per image; folders, globs, --scheduler "
                           f"and --chunk serve single-image tasks")
    paths = _drop_own_outputs(find_images(args.inputs), task)
    single_file_out = names_a_file(args.output)
    if single_file_out and (len(paths) != 1 or not args.chunk):
        raise RestoreError("with folders, globs or a cluster, --out must be a folder, not a file name")
    out_dir = output_folder(args.output) if args.output and not single_file_out else None
    if args.chunk:
        if args.ensemble or args.sigma is not None:
            raise RestoreError("--chunk restores the image as it is: no --ensemble or --sigma")
        check_chunked(task, args.chunk, args.tile or 256, args.tile_overlap)
        pairs = [(src, args.output if single_file_out else _tiff_name(src, task, out_dir)) for src in paths]
    else:
        pairs = plan_outputs(paths, task, out_dir)
    for folder in sorted({os.path.dirname(os.path.abspath(dst)) for _, dst in pairs}):
        if not os.path.isdir(folder):
            raise RestoreError(f"output folder {folder} does not exist")
        check_writable(folder)             # read-only or full: one line now, not one failure per image
    if not args.overwrite and all(os.path.exists(dst) for _, dst in pairs):
        print(summary(BatchReport(skipped=pairs)))      # a finished rerun: no cluster to start
        return 0
    tag = f"run{os.getpid()}x{secrets.token_hex(3)}"
    try:
        return _run_on_cluster(task, args, backend, paths, pairs, out_dir, tag)
    finally:                                # a worker killed mid-write (Ctrl-C) leaves its temp file
        remove_temporaries([os.path.dirname(os.path.abspath(dst)) for _, dst in pairs], tag)


def _run_on_cluster(task, args, backend, paths, pairs, out_dir, tag):
    with connect(args.scheduler, args.workers) as client:
        if args.chunk:                      # one large image after the other, each over the whole cluster
            report = BatchReport()
            with _interruptible(report, len(pairs)):
                for src, dst in pairs:
                    if os.path.exists(dst) and not args.overwrite:
                        report.skipped.append((src, dst))
                        continue
                    try:
                        restore_large(src, dst, task.name, args.weights, client=client, chunk=args.chunk,
                                      tile=args.tile or 256, overlap=args.tile_overlap, backend=backend,
                                      overwrite=args.overwrite)
                    except ValueError as err:   # this image only (bad file, bad chunk size...)
                        report.failed.append((src, one_line(err)))
                        continue
                    report.written.append((src, dst))
                    print(f"{src} -> {dst}")
            print(summary(report))
            return 0 if report.ok else 1
        settings = Settings(task=task.name, weights=args.weights, backend=backend, tile=args.tile,
                            overlap=args.tile_overlap, ensemble=args.ensemble, sigma=args.sigma, seed=args.seed,
                            overwrite=args.overwrite, max_pixels=getattr(args, "max_pixels", MAX_PIXELS), run_tag=tag)
        report = restore_batch(paths, settings, client, out_dir)
    print(summary(report))
    return 0 if report.ok else 1


def _tiff_name(src, task, out_dir):
    root, _ = os.path.splitext(default_output(src, task, out_dir))
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    return root + ".tif"


def summary(report: BatchReport):
    """The end-of-run report: counts, then one line per failure with its reason."""
    lines = [f"restored {len(report.written)} image(s); skipped {len(report.skipped)} whose output already "
             f"exists (reruns resume: pass --overwrite to redo them); failed {len(report.failed)}"]
    lines += [f"  failed: {src}: {reason[len(src) + 2:] if reason.startswith(src + ': ') else reason}"
              for src, reason in report.failed]
    return "\n".join(lines)
