"""How far `--tile` moves the result from the untiled one (the table in docs/usage.md, "Tiling").

    python benchmarks/tiling_difference.py [--weights W] [--image PNG] [--tiles 128/32 64/16]

Runs the bundled denoiser (or --weights) on the bundled 256x256 sample, clean and with seeded
sigma-25 noise, untiled and tiled, and prints the difference to the untiled output in 8-bit levels:
max and mean of the float output, and the share of 8-bit output values that differ.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import eamamba_ref  # noqa: E402  (before NumPy: OpenBLAS's idle threads sleep)
import numpy as np  # noqa: E402

from eamamba_ref.apps import inference, pipeline  # noqa: E402
from eamamba_ref.apps.demo import SAMPLE  # noqa: E402
from eamamba_ref.apps.tasks import TASKS  # noqa: E402
from eamamba_ref.io.images import read_image  # noqa: E402

WEIGHTS = os.path.join(os.path.dirname(eamamba_ref.__file__), "weights", "denoise_demo.npz")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", default=WEIGHTS)
    ap.add_argument("--image", default=SAMPLE)
    ap.add_argument("--tiles", nargs="+", default=["128/32", "64/16"], help="TILE/OVERLAP pairs")
    args = ap.parse_args()
    model = eamamba_ref.load(args.weights)
    clean = read_image(args.image)
    levels = lambda a: np.round(np.clip(a, 0, 1) * 255)      # noqa: E731  (the 8-bit output)
    print("| input | --tile / --tile-overlap | max | mean | 8-bit output values that differ |")
    for label, image in [("clean", clean), ("noisy, sigma 25", pipeline.add_noise(clean, 25, 0))]:
        x = pipeline.to_model_input([image], TASKS["denoise"])
        untiled = inference.padded(model, x)
        for spec in args.tiles:
            tile, overlap = map(int, spec.split("/"))
            tiled = inference.tiled(model, x, tile, overlap)
            diff = np.abs(tiled - untiled) * 255
            moved = np.abs(levels(tiled) - levels(untiled))
            print(f"| {label} | {tile} / {overlap} | {diff.max():.2f} | {diff.mean():.3f} | "
                  f"{np.mean(moved > 0) * 100:.1f}% (max {moved.max():.0f} levels) |", flush=True)


if __name__ == "__main__":
    main()
