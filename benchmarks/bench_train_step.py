"""Seconds per AdamW training step of a small EAMamba: pure-torch scan vs the Numba autograd scan.

Run:  python benchmarks/bench_train_step.py            (options: --help)

Model: the small denoising configuration (dim 16, blocks [1, 1, 1, 1], 1 refinement block,
d_state 8, expand 2, 8 diagonal directions merged by 'concate', Simple mixer, FFN factor 2;
~0.72 M parameters). One step = forward on a batch of noisy 64 x 64 patches, L1 loss, backward,
AdamW update, with torch on 2 threads and denormals flushed.

The two scan modes of ``torch_ref`` are timed in the same run, on two copies of the same model:
(a) 'chunked', autograd through the chunked pure-torch scan; (b) 'numba', the autograd Function
of ``eamamba_ref.torch_ext``. Steps alternate a, b, a, b, ... so that load from other jobs on
the machine hits both alike; the median of the timed steps is reported.

The scan's share of a step: the arguments of every scan call of one step are recorded, and those
calls are replayed (forward, then backward from a random gradient) in the same mode and timed.
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from eamamba_ref import torch_ref as tr
from eamamba_ref.torch_ref import mamba as mamba_module

MODEL_ARGS = dict(
    inp_channels=3, out_channels=3, dim=16, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1,
    ffn_expansion_factor=2, bias=False, channel_mixer_type="Simple",
    mamba_cfg={"scan_type": "diagonal", "scan_count": 8, "scan_merge_method": "concate",
               "disable_z_branch": False, "d_state": 8, "d_conv": 3, "expand": 2, "conv_2d": True},
)
MODES = ("chunked", "numba")


def make_batch(batch, size, seed):
    """(noisy, clean) pairs ``(batch, 3, size, size)``: smooth random images plus noise, sigma 25."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, size // 8, size // 8, generator=gen)
    clean = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    noisy = clean + (25 / 255) * torch.randn(clean.shape, generator=gen)
    return noisy, clean


def train_step(model, opt, noisy, clean, mode):
    tr.set_scan_mode(mode)
    opt.zero_grad(set_to_none=True)
    loss = F.l1_loss(model(noisy), clean)
    loss.backward()
    opt.step()
    return loss.item()


def record_scan_calls(model, noisy, mode):
    """Arguments of every selective_scan call in one forward pass (detached copies)."""
    calls = []
    original = mamba_module.selective_scan

    def recorder(*args, **kwargs):
        calls.append(([a.detach().clone() for a in args],
                      {k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in kwargs.items()}))
        return original(*args, **kwargs)

    mamba_module.selective_scan = recorder
    try:
        tr.set_scan_mode(mode)
        with torch.no_grad():
            model(noisy)
    finally:
        mamba_module.selective_scan = original
    return calls


def time_scan_calls(calls, mode):
    """Seconds for forward + backward of all recorded scan calls in ``mode``."""
    prepared = []
    for args, kwargs in calls:
        args = [a.clone().requires_grad_(a.is_floating_point()) for a in args]
        kwargs = {k: (v.clone().requires_grad_(True) if torch.is_tensor(v) else v)
                  for k, v in kwargs.items()}
        grad = torch.randn(args[0].shape)
        prepared.append((args, kwargs, grad))
    start = time.perf_counter()
    for args, kwargs, grad in prepared:
        out = tr.selective_scan(*args, **kwargs, mode=mode)
        out.backward(grad)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=7, help="timed steps per mode (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per mode first")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--verbose", action="store_true", help="print every step's time")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    base = tr.build_from_args("eamamba", MODEL_ARGS)
    models, opts = {}, {}
    for mode in MODES:
        models[mode] = tr.build_from_args("eamamba", MODEL_ARGS)
        models[mode].load_state_dict(base.state_dict())
        opts[mode] = torch.optim.AdamW(models[mode].parameters(), lr=2e-4, weight_decay=1e-4)
    n_params = sum(p.numel() for p in base.parameters())
    print(f"EAMamba {n_params / 1e6:.3f} M parameters; batch {args.batch} x 3 x {args.size}^2; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)

    times = {mode: [] for mode in MODES}
    losses = {mode: [] for mode in MODES}
    try:
        for i in range(args.warmup + args.steps):
            noisy, clean = make_batch(args.batch, args.size, seed=i)
            for mode in MODES:
                start = time.perf_counter()
                losses[mode].append(train_step(models[mode], opts[mode], noisy, clean, mode))
                elapsed = time.perf_counter() - start
                if i >= args.warmup:
                    times[mode].append(elapsed)
                if args.verbose:
                    print(f"  step {i} {mode:8s} {elapsed:.3f} s", flush=True)

        # Scan share: replay one step's scan calls, alternating modes, median of 3.
        noisy, _ = make_batch(args.batch, args.size, seed=0)
        scan_times = {mode: [] for mode in MODES}
        calls = {mode: record_scan_calls(models[mode], noisy, mode) for mode in MODES}
        for _ in range(3):
            for mode in MODES:
                scan_times[mode].append(time_scan_calls(calls[mode], mode))
    finally:
        tr.set_scan_mode("chunked")

    step = {mode: statistics.median(times[mode]) for mode in MODES}
    for label, mode in (("(a) autograd through 'chunked'", "chunked"), ("(b) Numba Function 'numba'", "numba")):
        scan = statistics.median(scan_times[mode])
        print(f"{label:32s} {step[mode]:.3f} s/step (median of {args.steps}, "
              f"min {min(times[mode]):.3f}); scan fwd+bwd {scan:.3f} s = "
              f"{100 * scan / step[mode]:.0f}% of a step ({len(calls[mode])} calls)")
    print(f"speed-up (a)/(b): {step['chunked'] / step['numba']:.2f}x")
    print(f"first-step losses: chunked {losses['chunked'][0]:.5f}, numba {losses['numba'][0]:.5f}")


if __name__ == "__main__":
    main()
