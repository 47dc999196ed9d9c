"""The one script to run when a GPU is lent: the whole-model CUDA path checked, then timed.

    python benchmarks/gpu_check.py                       # official denoising model, 256 and 1024
    python benchmarks/gpu_check.py --sizes 256 --repeats 5 --json gpu.json
    NUMBA_ENABLE_CUDASIM=1 python benchmarks/gpu_check.py --tiny    # rehearsal on the CPU simulator

1. Agreement: the same weights and input through the CPU path (numba kernels) and through
   `EAMamba(..., backend='cuda')` (every layer on the GPU); prints the relative max error
   (bound 1e-4, as for the CPU backends, docs/numerics.md) and exits 1 if it is exceeded.
2. Speed: for each size, the median wall time of `--repeats` whole-model forwards after a warm-up
   (upload of the input and download of the result included), and, when PyTorch sees a GPU, the
   PyTorch reference on the same GPU and weights with its vectorised chunked scan, and the ratio.
   Free GPU memory is read before and after to show the footprint.

The card's name is printed with every figure; copy them into docs/performance.md with it.
"""
import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from eamamba_ref.config import ModelConfig, denoise_config  # noqa: E402
from eamamba_ref.model import EAMamba, init_params  # noqa: E402

TINY = ModelConfig.from_args("eamamba", dict(
    dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1,
    mamba_cfg=dict(scan_type="diagonal", scan_count=8, scan_merge_method="concate", d_state=4, expand=2)))


def median_time(fn, repeats):
    fn()                                                 # warm-up: kernel compilation, uploads
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def torch_gpu_runner(cfg, params):
    """The PyTorch reference on the GPU (chunked scan), or None without torch / a CUDA device."""
    try:
        import torch
        from eamamba_ref import torch_ref
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    torch_ref.set_scan_mode("chunked")
    model = torch_ref.build_from_args(cfg.name, cfg.to_args()).eval().cuda()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in params.items()}, strict=True)

    def run(x):
        with torch.no_grad():
            out = model(torch.from_numpy(x).cuda())
            return out.cpu().numpy()                     # the copy back synchronises
    return run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--check-size", type=int, default=64, help="image size of the agreement check")
    ap.add_argument("--tiny", action="store_true", help="toy model at 8x8 (for the CUDA simulator)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)

    from numba import cuda
    cfg = TINY if args.tiny else denoise_config()
    sizes, check = ([8], 8) if args.tiny else (args.sizes, args.check_size)
    params = init_params(cfg, seed=0)
    from eamamba_ref.gpu.kernels import SIMULATOR
    card = "CUDA simulator" if SIMULATOR else cuda.get_current_device().name
    card = card.decode() if isinstance(card, bytes) else str(card)
    print(f"device: {card}; model: {cfg.name} dim {cfg.dim} blocks {list(cfg.num_blocks)}")
    results = {"device": card, "agreement": None, "timings": []}

    x = np.random.default_rng(1).random((1, cfg.inp_channels, check, check), dtype=np.float32)
    ref = EAMamba(cfg, params, backend="numba")(x)
    gpu_model = EAMamba(cfg, params, backend="cuda")
    rel = float(np.abs(gpu_model(x) - ref).max() / np.abs(ref).max())
    results["agreement"] = {"size": check, "rel_max_err": rel}
    print(f"agreement at {check}x{check}: cuda vs numba CPU, relative max error {rel:.2e} (bound 1e-4)")

    torch_run = None if args.tiny else torch_gpu_runner(cfg, params)
    for size in sizes:
        x = np.random.default_rng(2).random((1, cfg.inp_channels, size, size), dtype=np.float32)
        free_before = cuda.current_context().get_memory_info()[0]
        t_ours = median_time(lambda: gpu_model(x), args.repeats)
        free_after = cuda.current_context().get_memory_info()[0]
        row = {"size": size, "eamamba_ref_cuda_s": t_ours,
               "gpu_mem_held_mib": (free_before - free_after) / 2**20}
        line = f"{size:5d}^2  eamamba_ref cuda {t_ours:8.3f} s"
        if torch_run is not None:
            t_torch = median_time(lambda: torch_run(x), args.repeats)
            row.update(torch_chunked_cuda_s=t_torch, ratio=t_torch / t_ours)
            line += f"   torch chunked (same GPU) {t_torch:8.3f} s   torch/ours {t_torch / t_ours:5.2f}x"
        results["timings"].append(row)
        print(line, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0 if rel < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
