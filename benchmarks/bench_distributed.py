"""Throughput of the Dask batch restore, and memory per worker of the chunked (map_overlap) restore.

    python benchmarks/bench_distributed.py                       # 8 images of 128x128; 2048x2048 in 256 chunks
    python benchmarks/bench_distributed.py --images 4 --large 1024 512

Uses a tiny random EAMamba (dim 16, one block per level: the smallest 8-direction model), written
like the tests' models, so no weights are needed. Part 1 restores the same images with LocalClusters
of 1 and 2 worker processes (weights loaded and kernels compiled before the clock starts) and
prints images/second, next to the single-process command's loop. Part 2 restores synthetic TIFFs of
the given sizes chunk by chunk and prints each worker's peak resident memory during the run (Linux
VmHWM, reset before the run through /proc/self/clear_refs) next to the size of the whole image.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from eamamba_ref.apps import cluster, distributed as dist, pipeline  # noqa: E402
from eamamba_ref.apps.tasks import TASKS  # noqa: E402
from eamamba_ref.io.checkpoint import save_converted  # noqa: E402
from eamamba_ref.io.config import ModelConfig  # noqa: E402
from eamamba_ref.io.images import read_image, write_image  # noqa: E402
from eamamba_ref.reference.parameters import init_params  # noqa: E402

MAMBA = dict(scan_type="diagonal", scan_count=8, scan_merge_method="concate", d_state=4, d_conv=3,
             expand=1, conv_2d=True)


def tiny_model(path):
    cfg = ModelConfig.from_args("eamamba", dict(dim=16, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1,
                                                mamba_cfg=MAMBA))
    save_converted(path, cfg.name, cfg.to_args(), init_params(cfg, seed=1))
    return path


def _reset_peak():
    with open("/proc/self/clear_refs", "w") as f:      # "5": reset the peak RSS (VmHWM) to the current RSS
        f.write("5")


def _memory_mb():
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                fields[key] = int(value.split()[0]) / 1024
    return fields


def batch(tmp, weights, n_images, size, workers_list):
    rng = np.random.default_rng(0)
    src = os.path.join(tmp, "images")
    os.makedirs(src)
    for i in range(n_images):
        write_image(os.path.join(src, f"img{i}.png"), rng.random((size, size, 3), dtype=np.float32), 8)
    paths = dist.find_images([src])
    settings = dist.Settings(weights=weights, backend="numba")

    # the single-process command's loop, for reference (same model, Numba on all cores)
    model = pipeline.load_task_model(TASKS["denoise"], weights, "numba")
    x = pipeline.to_model_input([read_image(paths[0])], TASKS["denoise"])
    pipeline.restore_array(model, x)                              # compile / warm up
    t = time.perf_counter()
    for p in paths:
        pipeline.restore_array(model, pipeline.to_model_input([read_image(p)], TASKS["denoise"]))
    single = n_images / (time.perf_counter() - t)
    print(f"  single process (restore command loop):  {single:6.3f} images/s")

    for n in workers_list:
        with cluster.connect("local", n) as client:
            warm = os.path.join(tmp, f"warm{n}")
            client.run(lambda: cluster.worker_models("denoise", weights, "numba").for_channels(3))  # loaded once per worker
            dist.restore_batch(paths[:n], settings, client, warm, progress=False)   # kernels warm everywhere
            t = time.perf_counter()
            report = dist.restore_batch(paths, settings, client, os.path.join(tmp, f"out{n}"), progress=False)
            rate = n_images / (time.perf_counter() - t)
            assert report.ok and len(report.written) == n_images
        print(f"  LocalCluster, {n} worker(s) x 1 thread:   {rate:6.3f} images/s  (x{rate / single:.2f})")


def large(tmp, weights, sizes, chunk, tile, overlap, workers):
    import tifffile
    rng = np.random.default_rng(1)
    with cluster.connect("local", workers) as client:
        client.run(lambda: cluster.worker_models("denoise", weights, "numba").for_channels(3))
        warm = os.path.join(tmp, "warm.tif")                 # compile the kernels on every worker first
        tifffile.imwrite(warm, rng.integers(0, 256, (2 * chunk, 2 * chunk, 3), dtype=np.uint8))
        dist.restore_large(warm, os.path.join(tmp, "warm_out.tif"), "denoise", weights, client=client,
                           chunk=chunk, tile=tile, overlap=overlap, backend="numba", progress=False)
        for size in sizes:
            src = os.path.join(tmp, f"large{size}.tif")
            tifffile.imwrite(src, rng.integers(0, 256, (size, size, 3), dtype=np.uint8), tile=(256, 256))
            out = os.path.join(tmp, f"large{size}_out.tif")
            before = client.run(_memory_mb)
            client.run(_reset_peak)
            t = time.perf_counter()
            dist.restore_large(src, out, "denoise", weights, client=client, chunk=chunk, tile=tile,
                               overlap=overlap, backend="numba", progress=False)
            seconds = time.perf_counter() - t
            after = client.run(_memory_mb)
            assert tifffile.imread(out).shape == (size, size, 3)
            whole = size * size * 3 * 4 / 2 ** 20
            print(f"  {size}x{size} in {chunk}-pixel chunks (tile {tile}, overlap {overlap}), {workers} workers: "
                  f"{seconds:.1f} s; whole image as float32 {whole:.0f} MB")
            for addr in sorted(after):
                print(f"    worker {addr.rsplit(':', 1)[-1]}: RSS before {before[addr]['VmRSS']:.0f} MB, "
                      f"peak during {after[addr]['VmHWM']:.0f} MB (+{after[addr]['VmHWM'] - before[addr]['VmRSS']:.0f} MB)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--large", type=int, nargs="*", default=[2048], help="sizes of the synthetic large images")
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--tile", type=int, default=128)
    ap.add_argument("--overlap", type=int, default=16)
    args = ap.parse_args()
    print(f"{os.cpu_count()} CPU cores; load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    with tempfile.TemporaryDirectory() as tmp:
        weights = tiny_model(os.path.join(tmp, "tiny.npz"))
        if args.images:
            print(f"batch: {args.images} images of {args.size}x{args.size}, tiny random model")
            batch(tmp, weights, args.images, args.size, args.workers)
        if args.large:
            print("one large image, chunk by chunk (map_overlap):")
            large(tmp, weights, args.large, args.chunk, args.tile, args.overlap, max(args.workers))
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
