"""Seconds per AdamW training step of a small EAMamba: pure-torch scan vs the Numba autograd scan.

Run:  python benchmarks/bench_train_step.py            (options: --help)

Model: the small denoising configuration (dim 16, blocks [1, 1, 1, 1], 1 refinement block,
d_state 8, expand 2, 8 diagonal directions merged by 'concate', Simple mixer, FFN factor 2;
~0.72 M parameters). One step = forward on a batch of noisy 64 x 64 patches, L1 loss, backward,
AdamW update, with torch on 2 threads and denormals flushed.

The two scan modes of ``torch_ref`` are timed in the same run, on two copies of the same model:
(a) 'chunked', autograd through the chunked pure-torch scan; (b) 'numba', the autograd Function
of ``eamamba_ref.pytorch.scan_function``. Steps alternate a, b, a, b, ... so that load from other jobs on
the machine hits both alike; the median of the timed steps is reported. CPU time per step (all
threads of this process) is printed too: on a shared machine it is less disturbed by other jobs.

The scan's share of a step is measured inside the same steps: every selective_scan call of the
MHSSM is timed (forward), and identity autograd nodes on its inputs and outputs timestamp the
moment the gradient reaches its outputs and the moment it has passed through to all its inputs
(backward; autograd runs the nodes of one scan together, as they were recorded together).
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from eamamba_ref import pytorch as tr
from eamamba_ref.pytorch import mamba as mamba_module

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


class _Stamp(torch.autograd.Function):
    """Identity on tensors; its backward appends the time to ``stamps`` and passes grads on."""

    @staticmethod
    def forward(ctx, stamps, *tensors):
        ctx.stamps = stamps
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        ctx.stamps.append(time.perf_counter())
        return (None, *grads)


class ScanClock:
    """Replaces the MHSSM's selective_scan by a timed one; ``seconds()`` = forward + backward."""

    def __init__(self):
        self.forward = 0.0
        self.backward_spans = []          # [(grad reaches the output, grad left the inputs)]
        self._original = mamba_module.selective_scan

    def __enter__(self):
        def timed(*args, **kwargs):
            grad_in, grad_out = [], []
            self.backward_spans.append((grad_out, grad_in))
            names = [k for k, v in kwargs.items() if torch.is_tensor(v)]
            stamped = _Stamp.apply(grad_in, *args, *(kwargs[k] for k in names))
            args = stamped[:len(args)]
            kwargs.update(zip(names, stamped[len(args):]))
            start = time.perf_counter()
            y = self._original(*args, **kwargs)
            self.forward += time.perf_counter() - start
            (y,) = _Stamp.apply(grad_out, y)
            return y

        mamba_module.selective_scan = timed
        return self

    def __exit__(self, *exc):
        mamba_module.selective_scan = self._original

    def seconds(self):
        backward = sum(max(grad_in) - min(grad_out) for grad_out, grad_in in self.backward_spans)
        return self.forward + backward


def train_step(model, opt, noisy, clean, mode):
    """One AdamW step; returns (loss, seconds spent in the scan's forward + backward)."""
    tr.set_scan_mode(mode)
    opt.zero_grad(set_to_none=True)
    with ScanClock() as clock:
        loss = F.l1_loss(model(noisy), clean)
        loss.backward()
    opt.step()
    return loss.item(), clock.seconds()


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

    wall = {mode: [] for mode in MODES}
    cpu = {mode: [] for mode in MODES}
    share = {mode: [] for mode in MODES}
    losses = {mode: [] for mode in MODES}
    try:
        for i in range(args.warmup + args.steps):
            noisy, clean = make_batch(args.batch, args.size, seed=i)
            for mode in MODES:
                start, start_cpu = time.perf_counter(), time.process_time()
                loss, scan = train_step(models[mode], opts[mode], noisy, clean, mode)
                elapsed = time.perf_counter() - start
                elapsed_cpu = time.process_time() - start_cpu
                losses[mode].append(loss)
                if i >= args.warmup:
                    wall[mode].append(elapsed)
                    cpu[mode].append(elapsed_cpu)
                    share[mode].append(scan / elapsed)
                if args.verbose:
                    print(f"  step {i} {mode:8s} {elapsed:.3f} s (CPU {elapsed_cpu:.3f} s), "
                          f"scan {scan:.3f} s", flush=True)
    finally:
        tr.set_scan_mode("chunked")

    med = {mode: statistics.median(wall[mode]) for mode in MODES}
    med_cpu = {mode: statistics.median(cpu[mode]) for mode in MODES}
    for label, mode in (("(a) autograd through 'chunked'", "chunked"),
                        ("(b) Numba Function 'numba'", "numba")):
        print(f"{label:32s} {med[mode]:.3f} s/step (median of {args.steps}, min "
              f"{min(wall[mode]):.3f}; CPU {med_cpu[mode]:.3f} s); scan forward+backward "
              f"{100 * statistics.median(share[mode]):.0f}% of a step")
    print(f"speed-up (a)/(b): {med['chunked'] / med['numba']:.2f}x wall, "
          f"{med_cpu['chunked'] / med_cpu['numba']:.2f}x CPU time")
    print(f"first-step losses (same weights and batch): chunked {losses['chunked'][0]:.6f}, "
          f"numba {losses['numba'][0]:.6f}")


if __name__ == "__main__":
    main()
