"""Tests of eamamba_ref.pytorch.scan_function: the differentiable Numba selective scan.

Goldens: torch autograd through the float64 'sequential' scan of torch_ref (an independent
implementation of the forward pass, differentiated by torch), torch.autograd.gradcheck (finite
differences), and a hand-worked denormal case.
"""

import pathlib
import platform
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from eamamba_ref import pytorch as tr  # noqa: E402
from eamamba_ref.pytorch.scan_function import SelectiveScanFn, selective_scan_numba  # noqa: E402

FAST = settings(max_examples=30, deadline=None)
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def divisors(d):
    return [g for g in range(1, d + 1) if d % g == 0]


def make_inputs(seed, b, d, gB, gC, n, l, with_D=True, with_z=True, with_bias=True, softplus=True):
    """float64 scan inputs in a numerically sane range (decays in (0, 1], states O(1))."""
    gen = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float64)

    if softplus:
        delta = r(b, d, l)
    else:  # without softplus delta is the step itself: keep it positive, else states explode
        delta = 0.05 + torch.rand(b, d, l, generator=gen, dtype=torch.float64)
    x = dict(u=r(b, d, l), delta=delta, A=-torch.exp(r(d, n)), B=r(b, gB, n, l), C=r(b, gC, n, l),
             D=r(d) if with_D else None, z=r(b, d, l) if with_z else None,
             delta_bias=0.3 * r(d) if with_bias else None)
    if with_bias and not softplus:
        x["delta_bias"] = x["delta_bias"].abs()
    return x


def grads_of(fn, x, weights, dtype, **kw):
    """(out, last, {name: grad}) of sum(out * w_out) + sum(last * w_last) through ``fn``."""
    leaves = {k: v.to(dtype).clone().requires_grad_(True) for k, v in x.items() if v is not None}
    out, last = fn(**{k: leaves.get(k) for k in NAMES}, return_last_state=True, **kw)
    loss = (out * weights[0].to(dtype)).sum() + (last * weights[1].to(dtype)).sum()
    loss.backward()
    return out, last, {k: v.grad for k, v in leaves.items()}


def rel_err(got, want):
    """max |got - want| / max |want| (0 / 0 counts as 0)."""
    scale = want.abs().max().item()
    diff = (got.double() - want).abs().max().item()
    return diff / scale if scale > 0 else diff


@FAST
@given(data=st.data(), b=st.integers(1, 2), d=st.integers(1, 8), n=st.integers(1, 16),
       l=st.integers(1, 40), seed=st.integers(0, 2**16), with_D=st.booleans(),
       with_z=st.booleans(), with_bias=st.booleans(), softplus=st.booleans(),
       chunk=st.one_of(st.none(), st.integers(1, 17)))
def test_forward_and_gradients_match_torch_autograd(data, b, d, n, l, seed, with_D, with_z,
                                                    with_bias, softplus, chunk):
    gB = data.draw(st.sampled_from(divisors(d)), label="gB")
    gC = data.draw(st.sampled_from(divisors(d)), label="gC")
    x = make_inputs(seed, b, d, gB, gC, n, l, with_D, with_z, with_bias, softplus)
    gen = torch.Generator().manual_seed(seed + 1)
    weights = (torch.randn(b, d, l, generator=gen, dtype=torch.float64),
               torch.randn(b, d, n, generator=gen, dtype=torch.float64))
    want_out, want_last, want = grads_of(tr.selective_scan, x, weights, torch.float64,
                                         delta_softplus=softplus, mode="sequential")

    # float32, the training path: within 1e-5 of the float64 golden, per tensor.
    out, last, got = grads_of(selective_scan_numba, x, weights, torch.float32,
                              delta_softplus=softplus, chunk_size=chunk)
    assert out.dtype == torch.float32 and out.shape == (b, d, l)
    assert rel_err(out, want_out) < 1e-5
    assert rel_err(last, want_last) < 1e-5
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == torch.float32 and got[k].shape == want[k].shape, k
        # Gradients that are sums over time (A, D, delta_bias) or over a group's channels (B, C)
        # can cancel: dA = -0.0025 from O(0.1) terms was seen 1.5e-5 off relative to itself while
        # every per-step gradient was within 1.5e-7. Their float32 bound is therefore 1e-4 of the
        # result; the per-element gradients (u, delta, z) keep 1e-5.
        bound = 1e-5 if k in ("u", "delta", "z") else 1e-4
        assert rel_err(got[k], want[k]) < bound, k

    # float64 computes in float64: agreement to rounding.
    out, last, got = grads_of(selective_scan_numba, x, weights, torch.float64,
                              delta_softplus=softplus, chunk_size=chunk)
    assert rel_err(out, want_out) < 1e-12 and rel_err(last, want_last) < 1e-12
    for k in want:
        assert rel_err(got[k], want[k]) < 1e-12, k


def test_eamamba_sized_scan_float32():
    # The shapes of a level-1 scan of the small training model (8 heads of 4 channels, N = 8),
    # long enough for many chunks and with a strongly decaying channel.
    x = make_inputs(5, b=2, d=32, gB=8, gC=8, n=8, l=300, with_z=False)
    x["delta"][:, 3] += 6.0
    gen = torch.Generator().manual_seed(9)
    weights = (torch.randn(2, 32, 300, generator=gen, dtype=torch.float64),
               torch.zeros(2, 32, 8, dtype=torch.float64))
    want_out, _, want = grads_of(tr.selective_scan, x, weights, torch.float64,
                                 delta_softplus=True, mode="chunked")
    out, _, got = grads_of(selective_scan_numba, x, weights, torch.float32, delta_softplus=True)
    assert rel_err(out, want_out) < 1e-5
    for k in want:
        assert rel_err(got[k], want[k]) < 1e-5, k


@pytest.mark.parametrize("d, gB, gC", [(20, 1, 1), (36, 1, 2), (24, 2, 3)])
def test_groups_split_over_several_tasks(d, gB, gC):
    # More channels per group than one task takes (TASK_CHANNELS), so dL/dB and dL/dC are summed
    # over several per-task slots, including runs of channels that share B but not C.
    x = make_inputs(8, b=2, d=d, gB=gB, gC=gC, n=5, l=30)
    gen = torch.Generator().manual_seed(3)
    weights = (torch.randn(2, d, 30, generator=gen, dtype=torch.float64),
               torch.randn(2, d, 5, generator=gen, dtype=torch.float64))
    want_out, want_last, want = grads_of(tr.selective_scan, x, weights, torch.float64,
                                         delta_softplus=True, mode="sequential")
    out, last, got = grads_of(selective_scan_numba, x, weights, torch.float64,
                              delta_softplus=True, chunk_size=7)
    assert rel_err(out, want_out) < 1e-12 and rel_err(last, want_last) < 1e-12
    for k in want:
        assert rel_err(got[k], want[k]) < 1e-12, k


@pytest.mark.parametrize("case", [
    dict(b=1, d=2, gB=1, gC=2, n=2, l=5, chunk=2),
    dict(b=2, d=3, gB=3, gC=1, n=1, l=4, chunk=64),
])
def test_gradcheck_float64(case):
    chunk = case.pop("chunk")
    x = make_inputs(1, **case)
    leaves = tuple(x[k].clone().requires_grad_(True) for k in NAMES)

    def f(*args):
        return SelectiveScanFn.apply(*args, True, chunk)

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-6, rtol=1e-5)
    # Optional inputs left out, no softplus, only the last state used.
    x = make_inputs(2, **case, with_D=False, with_z=False, with_bias=False, softplus=False)
    leaves = tuple(x[k].clone().requires_grad_(True) for k in ("u", "delta", "A", "B", "C"))

    def g(*args):
        return SelectiveScanFn.apply(*args, None, None, None, False, chunk)[1]

    assert torch.autograd.gradcheck(g, leaves, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_b_c_layouts_match_grouped():
    # (b, n, l) is one group; (d, n) is constant in time, one group per channel.
    x = make_inputs(4, b=2, d=4, gB=1, gC=1, n=3, l=11)
    weights = (torch.randn(2, 4, 11, dtype=torch.float64), torch.randn(2, 4, 3, dtype=torch.float64))
    for B, C in ((x["B"][:, 0], x["C"][:, 0]), (torch.randn(4, 3, dtype=torch.float64), x["C"][:, 0])):
        y = dict(x, B=B, C=C)
        want_out, _, want = grads_of(tr.selective_scan, y, weights, torch.float64,
                                     delta_softplus=True, mode="sequential")
        out, _, got = grads_of(selective_scan_numba, y, weights, torch.float64,
                               delta_softplus=True, chunk_size=4)
        assert got["B"].shape == B.shape and got["C"].shape == C.shape
        assert rel_err(out, want_out) < 1e-12
        for k in want:
            assert rel_err(got[k], want[k]) < 1e-12, k


def test_inputs_without_grad_and_other_dtypes():
    x = make_inputs(6, b=1, d=2, gB=1, gC=1, n=2, l=7)
    u = x["u"].clone().requires_grad_(True)
    out = selective_scan_numba(**dict(x, u=u), delta_softplus=True)
    out.sum().backward()
    want = tr.selective_scan(**x, delta_softplus=True, mode="sequential")
    assert u.grad is not None and torch.allclose(out, want, rtol=1e-12, atol=1e-12)
    # bfloat16 inputs compute in float32 and come back as bfloat16, like torch_ref.
    xb = {k: v.to(torch.bfloat16) for k, v in x.items()}
    got = selective_scan_numba(**xb, delta_softplus=True)
    ref = tr.selective_scan(**xb, delta_softplus=True, mode="sequential")
    assert got.dtype == torch.bfloat16
    assert rel_err(got.double(), ref.double()) < 1e-2


def denormals_flushed():
    """Probe the calling thread's FTZ/DAZ mode: with it, a denormal times one is zero."""
    return (torch.tensor([1e-39], dtype=torch.float32) * 1.0).item() == 0.0


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="FTZ/DAZ is set through the x86 MXCSR")
def test_denormal_states_are_flushed_and_caller_mode_restored():
    # One impulse, then a decay of exp(-0.5) per step with C = 1: y_t = 0.5 exp(-0.5 t) exactly
    # (float64 golden), which passes below the smallest normal float32 (1.2e-38) at t ~ 175.
    # In the kernel the flushed state must read 0 there (no denormal arithmetic), and the
    # caller's floating-point mode must be what it was, flushing or not.
    l = 220
    u = torch.zeros(1, 1, l)
    u[0, 0, 0] = 1.0
    args = dict(delta=torch.full((1, 1, l), 0.5), A=-torch.ones(1, 1),
                B=torch.ones(1, 1, 1, l), C=torch.ones(1, 1, 1, l))
    want = 0.5 * torch.exp(-0.5 * torch.arange(l, dtype=torch.float64))
    normal = want > 1.2e-38
    was_flushing = denormals_flushed()
    try:
        for flush in (False, True):
            torch.set_flush_denormal(flush)
            out = selective_scan_numba(u, **args).double()
            assert denormals_flushed() == flush
            assert rel_err(out[0, 0, normal], want[normal]) < 1e-5
            assert (out[0, 0, want < 1e-39] == 0).all()
    finally:
        torch.set_flush_denormal(was_flushing)


def test_torch_thread_count_is_left_alone():
    # Numba's 'omp' threading layer shares the OpenMP runtime with torch and, when it starts
    # (first parallel kernel of a process), sets its thread count; the wrapper must undo that.
    # A fresh process, so that this call is the one that starts the layer.
    script = (
        "import torch\n"
        "torch.set_num_threads(1)\n"
        "from eamamba_ref.pytorch.scan_function import selective_scan_numba\n"
        "u = torch.randn(1, 2, 9, requires_grad=True)\n"
        "selective_scan_numba(u, torch.rand(1, 2, 9), -torch.rand(2, 3), torch.randn(1, 1, 3, 9),\n"
        "                     torch.randn(1, 1, 3, 9)).sum().backward()\n"
        "print(torch.get_num_threads())\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=600, cwd=pathlib.Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "1"


def test_scan_mode_numba_in_extended_mamba():
    # set_scan_mode('numba') routes ExtendedMamba (the MHSSM of every EAMamba block) through the
    # Numba Function; in float64 its output and all gradients equal those of the 'chunked' mode.
    torch.manual_seed(0)
    mhssm = tr.ExtendedMamba(16, tr.ScanTransform("diagonal", 8, "concate"), conv_2d=True,
                             d_state=4, d_conv=3, expand=2).double()
    tokens = torch.randn(2, 12 * 10, 16, dtype=torch.float64)
    results = []
    for mode in ("chunked", "numba"):
        tr.set_scan_mode(mode)
        try:
            mhssm.zero_grad()
            x = tokens.clone().requires_grad_(True)
            out = mhssm(x, (12, 10))
            out.square().mean().backward()
        finally:
            tr.set_scan_mode("chunked")
        grads = {k: p.grad.clone() for k, p in mhssm.named_parameters()}
        grads["tokens"] = x.grad
        results.append((out.detach(), grads))
    assert rel_err(results[1][0], results[0][0]) < 1e-12
    assert {"A_logs", "Ds", "dt_projs_bias", "dt_projs_weight", "x_proj_weight"} <= set(results[0][1])
    for k, want in results[0][1].items():
        assert rel_err(results[1][1][k], want) < 1e-10, k


def test_bad_inputs():
    x = make_inputs(0, b=1, d=2, gB=1, gC=1, n=2, l=5)
    cases = [
        (dict(u=x["u"][0]), "u must"),
        (dict(delta=x["delta"][..., :3]), "delta must"),
        (dict(A=x["A"][:1]), "A must"),
        (dict(B=x["B"][..., :3]), "B must"),
        (dict(C=x["C"][:, :, :1]), "C must"),
        (dict(B=torch.zeros(1, 3, 2, 5, dtype=torch.float64)), "g dividing"),
        (dict(D=torch.zeros(3, dtype=torch.float64)), "D must"),
        (dict(z=x["z"][..., :2]), "z must"),
        (dict(delta_bias=torch.zeros(1, dtype=torch.float64)), "delta_bias must"),
    ]
    for change, msg in cases:
        with pytest.raises(ValueError, match=msg):
            selective_scan_numba(**dict(x, **change))
    with pytest.raises(ValueError, match="chunk_size"):
        selective_scan_numba(**x, chunk_size=0)
    with pytest.raises(ValueError, match="mode"):
        selective_scan_numba(**x, mode="chunked")
    with pytest.raises(ValueError, match="complex"):
        selective_scan_numba(**dict(x, A=x["A"].to(torch.complex128)))
