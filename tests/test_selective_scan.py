"""Tests of eamamba_ref.runtime.backends.selective_scan: the three backends against independent evaluations.

Oracles: a float64 loop written here independently of the package (one (batch, channel) pair
at a time, with math.log1p / math.exp), a sequential torch loop (torch's own softplus and SiLU),
and, for the kernels, the NumPy backend.

Error measure, used throughout: max |got - want| / max |want| over the whole output ("relative
to the output's scale"; elementwise relative errors are meaningless where y crosses zero).
Tolerances: float32 vs the float64 oracle 1e-5; numba or cuda vs numpy 1e-5. A float32 step
rounds at ~6e-8 and the decays (|exp(delta A)| < 1) keep rounding errors from growing along the
sequence: over 60 random problems the largest error seen was 4e-7 against float64 and 7e-7
between numba and numpy. Deliberate bugs planted in the NumPy scan (channels mapped to the wrong
group, B and C read one step late, a softplus threshold of 5) gave errors of 0.18 to 1.2.
"""

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from eamamba_ref.runtime import backends as ssm
from eamamba_ref.kernels.cpu.fastexp import TINY

RTOL = 1e-5  # see the module docstring
REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------
# Independent float64 oracle

def scan_float64(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """The recurrence in float64, one (batch, channel) pair and one time step at a time."""
    u, delta, A = (np.asarray(x, np.float64) for x in (u, delta, A))
    B, C = np.asarray(B, np.float64), np.asarray(C, np.float64)
    batch, dim, length = u.shape
    n_state = A.shape[1]

    def coefficient(M, b, d, t):
        if M.ndim == 2:  # (D, N)
            return M[d]
        if M.ndim == 3:  # (batch, N, L)
            return M[b, :, t]
        return M[b, d // (dim // M.shape[1]), :, t]  # (batch, G, N, L)

    y = np.zeros((batch, dim, length))
    last = np.zeros((batch, dim, n_state))
    for b in range(batch):
        for d in range(dim):
            h = np.zeros(n_state)
            for t in range(length):
                dt = delta[b, d, t] + (0.0 if delta_bias is None else float(delta_bias[d]))
                if delta_softplus and dt <= 20.0:
                    dt = math.log1p(math.exp(dt))
                h = np.exp(dt * A[d]) * h + dt * coefficient(B, b, d, t) * u[b, d, t]
                out = float(coefficient(C, b, d, t) @ h)
                if D is not None:
                    out += float(D[d]) * u[b, d, t]
                if z is not None:
                    out *= z[b, d, t] / (1.0 + math.exp(-z[b, d, t]))
                y[b, d, t] = out
            last[b, d] = h
    return y, last


def scaled_error(got, want):
    want = np.asarray(want, np.float64)
    scale = np.max(np.abs(want)) if want.size else 0.0
    return float(np.max(np.abs(np.asarray(got, np.float64) - want)) / max(scale, 1e-30))


# ------------------------------------------------------------------------------------------------
# Random problems

def make_problem(seed, batch, dim, length, n_state, b_form, c_form, groups_b=1, groups_c=1,
                 softplus=True, with_d=True, with_z=False, with_bias=True):
    """Keyword arguments for selective_scan; b_form / c_form are 'dn', 'bnl' or 'grouped'."""
    rng = np.random.default_rng(seed)
    f32 = np.float32

    def input_matrix(form, groups):
        if form == "dn":
            return rng.standard_normal((dim, n_state)).astype(f32)
        if form == "bnl":
            return rng.standard_normal((batch, n_state, length)).astype(f32)
        return rng.standard_normal((batch, groups, n_state, length)).astype(f32)

    if softplus:
        delta = rng.standard_normal((batch, dim, length)) - 1.0
        bias = 0.5 * rng.standard_normal(dim)
    else:  # positive steps, so that the recurrence stays stable without softplus
        delta = rng.uniform(0.0, 1.0, (batch, dim, length))
        bias = rng.uniform(0.0, 0.5, dim)
    return dict(
        u=rng.standard_normal((batch, dim, length)).astype(f32),
        delta=delta.astype(f32),
        A=(-np.exp(rng.standard_normal((dim, n_state)))).astype(f32),
        B=input_matrix(b_form, groups_b),
        C=input_matrix(c_form, groups_c),
        D=rng.standard_normal(dim).astype(f32) if with_d else None,
        z=rng.standard_normal((batch, dim, length)).astype(f32) if with_z else None,
        delta_bias=bias.astype(f32) if with_bias else None,
        delta_softplus=softplus,
    )


@st.composite
def problems(draw, max_dim, max_length, max_state):
    """Arguments for make_problem (kept small, so that hypothesis reports them readably)."""
    groups_b = draw(st.integers(1, 3))
    groups_c = draw(st.sampled_from([1, groups_b]))
    per_group = draw(st.integers(1, max(1, max_dim // (groups_b * groups_c))))
    dim = groups_b * groups_c * per_group  # a multiple of both group counts
    return dict(
        seed=draw(st.integers(0, 2**31 - 1)),
        batch=draw(st.integers(1, 3)),
        dim=dim,
        length=draw(st.integers(1, max_length)),
        n_state=draw(st.integers(1, max_state)),
        b_form=draw(st.sampled_from(["dn", "bnl", "grouped"])),
        c_form=draw(st.sampled_from(["dn", "bnl", "grouped"])),
        groups_b=groups_b,
        groups_c=groups_c,
        softplus=draw(st.booleans()),
        with_d=draw(st.booleans()),
        with_z=draw(st.booleans()),
        with_bias=draw(st.booleans()),
    )


# The cases the task names explicitly, for both comparisons.
NAMED_CASES = {
    "L=1": dict(batch=2, dim=4, length=1, n_state=5, b_form="grouped", c_form="grouped",
                groups_b=2, groups_c=2),
    "N=1": dict(batch=1, dim=3, length=40, n_state=1, b_form="grouped", c_form="dn",
                groups_b=3),
    "batch=3": dict(batch=3, dim=4, length=20, n_state=4, b_form="bnl", c_form="bnl"),
    "no softplus, no D": dict(batch=1, dim=4, length=30, n_state=3, b_form="dn", c_form="dn",
                              softplus=False, with_d=False, with_bias=False),
    "with z": dict(batch=2, dim=4, length=25, n_state=6, b_form="grouped", c_form="grouped",
                   groups_b=4, groups_c=2, with_z=True),
    "EAMamba-like": dict(batch=1, dim=16, length=150, n_state=16, b_form="grouped",
                         c_form="grouped", groups_b=8, groups_c=8),
    "N=17 (two state blocks)": dict(batch=1, dim=2, length=140, n_state=17, b_form="grouped",
                                    c_form="grouped", groups_b=1, groups_c=1, with_z=True),
}


# ------------------------------------------------------------------------------------------------
# Correctness

@pytest.mark.parametrize("name", list(NAMED_CASES))
def test_numpy_and_numba_match_float64_oracle_on_named_cases(name):
    problem = make_problem(seed=1, **NAMED_CASES[name])
    want_y, want_h = scan_float64(**problem)
    for backend in ("numpy", "numba"):
        y, h = ssm.selective_scan(**problem, return_last_state=True, backend=backend)
        assert y.dtype == np.float32 and h.dtype == np.float32
        assert y.shape == want_y.shape and h.shape == want_h.shape
        assert scaled_error(y, want_y) < RTOL, backend
        assert scaled_error(h, want_h) < RTOL, backend


@settings(max_examples=25, deadline=None)
@given(problems(max_dim=12, max_length=40, max_state=8))
def test_numpy_matches_float64_oracle(params):
    problem = make_problem(**params)
    want_y, want_h = scan_float64(**problem)
    y, h = ssm.selective_scan(**problem, return_last_state=True, backend="numpy")
    assert scaled_error(y, want_y) < RTOL
    assert scaled_error(h, want_h) < RTOL


@settings(max_examples=40, deadline=None)
@given(problems(max_dim=40, max_length=300, max_state=20))
def test_numba_matches_numpy(params):
    problem = make_problem(**params)
    # Shapes span several time chunks (128 steps), tasks (8 channels) and state blocks (16).
    want_y, want_h = ssm.selective_scan(**problem, return_last_state=True, backend="numpy")
    y, h = ssm.selective_scan(**problem, return_last_state=True, backend="numba")
    assert scaled_error(y, want_y) < RTOL
    assert scaled_error(h, want_h) < RTOL


def test_return_last_state_flag():
    problem = make_problem(seed=2, batch=2, dim=4, length=9, n_state=3, b_form="grouped",
                           c_form="grouped", groups_b=2, groups_c=2)
    for backend in ("numpy", "numba"):
        y = ssm.selective_scan(**problem, backend=backend)
        y2, h = ssm.selective_scan(**problem, return_last_state=True, backend=backend)
        assert isinstance(y, np.ndarray) and np.array_equal(y, y2)
        assert h.shape == (2, 4, 3)


def test_time_invariant_and_grouped_forms_agree():
    """B, C as (D, N) equal the same matrices repeated over time, one group per channel."""
    problem = make_problem(seed=3, batch=2, dim=6, length=50, n_state=5, b_form="dn",
                           c_form="dn")
    grouped = dict(problem)
    for key in ("B", "C"):
        grouped[key] = np.broadcast_to(problem[key][None, :, :, None], (2, 6, 5, 50)).copy()
    for backend in ("numpy", "numba"):
        y1 = ssm.selective_scan(**problem, backend=backend)
        y2 = ssm.selective_scan(**grouped, backend=backend)
        assert scaled_error(y1, y2) < RTOL


def test_softplus_of_delta():
    """One step from h = 0 with u = B = C = 1 gives y = softplus(delta): check it directly,
    including above the threshold 20, where delta is used as it is (and exp would overflow)."""
    for backend in ("numpy", "numba"):
        for raw in (-30.0, -3.0, 0.0, 2.5, 19.0, 100.0):
            u = np.ones((1, 1, 1), np.float32)
            delta = np.full((1, 1, 1), raw, np.float32)
            A = np.full((1, 1), -1e-3, np.float32)
            B = np.ones((1, 1), np.float32)
            y = ssm.selective_scan(u, delta, A, B, B, delta_softplus=True, backend=backend)
            want = raw if raw > 20 else math.log1p(math.exp(raw))
            assert y[0, 0, 0] == pytest.approx(want, rel=1e-6), (backend, raw)


def test_decayed_states_are_flushed_not_denormal():
    """After the input stops, states decay below float32's normal range; numba flushes them."""
    length, dim, n_state = 400, 2, 4
    u = np.zeros((1, dim, length), np.float32)
    u[:, :, :5] = 1.0
    delta = np.ones((1, dim, length), np.float32)
    A = np.full((dim, n_state), -3.0, np.float32)  # decays by e^-3 per step
    B = np.ones((dim, n_state), np.float32)
    want_y, want_h = ssm.selective_scan(u, delta, A, B, B, return_last_state=True,
                                        backend="numpy")
    y, h = ssm.selective_scan(u, delta, A, B, B, return_last_state=True, backend="numba")
    assert np.all(h == 0.0)  # e^-1185 underflows in both, numba by its flush
    # where the reference still has tiny states, numba differs by less than the flush threshold
    assert np.max(np.abs(y - want_y)) <= 2 * n_state * TINY + 1e-6 * np.max(np.abs(want_y))
    mid = want_y[0, 0, 20:40]
    assert np.any((mid != 0) & (np.abs(mid) < TINY))  # the test does reach the flushed range


def test_float64_and_integer_inputs_give_float32():
    problem = make_problem(seed=4, batch=1, dim=2, length=6, n_state=2, b_form="dn",
                           c_form="dn")
    as64 = {k: (v.astype(np.float64) if isinstance(v, np.ndarray) else v)
            for k, v in problem.items()}
    for backend in ("numpy", "numba"):
        y = ssm.selective_scan(**as64, backend=backend)
        assert y.dtype == np.float32
        assert scaled_error(y, ssm.selective_scan(**problem, backend=backend)) < RTOL


def test_empty_sequence():
    for backend in ("numpy", "numba"):
        y, h = ssm.selective_scan(np.zeros((2, 3, 0)), np.zeros((2, 3, 0)), -np.ones((3, 4)),
                                  np.ones((3, 4)), np.ones((3, 4)), return_last_state=True,
                                  backend=backend)
        assert y.shape == (2, 3, 0) and h.shape == (2, 3, 4) and not h.any()


def test_numpy_matches_sequential_torch_loop():
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    problem = make_problem(seed=5, batch=2, dim=6, length=64, n_state=5, b_form="grouped",
                           c_form="grouped", groups_b=3, groups_c=3, with_z=True)
    t = {k: torch.from_numpy(v) for k, v in problem.items() if isinstance(v, np.ndarray)}
    delta = F.softplus(t["delta"] + t["delta_bias"][:, None])  # torch's threshold is 20 too
    B = t["B"].repeat_interleave(2, dim=1)  # (b, g, n, l) -> (b, d, n, l)
    C = t["C"].repeat_interleave(2, dim=1)
    h = torch.zeros(2, 6, 5)
    ys = []
    for i in range(64):
        h = torch.exp(delta[:, :, i, None] * t["A"]) * h + (
            delta[:, :, i, None] * B[:, :, :, i] * t["u"][:, :, i, None])
        ys.append((h * C[:, :, :, i]).sum(-1))
    want = (torch.stack(ys, dim=-1) + t["D"][:, None] * t["u"]) * F.silu(t["z"])

    y, last = ssm.selective_scan(**problem, return_last_state=True, backend="numpy")
    assert scaled_error(y, want.numpy()) < RTOL
    assert scaled_error(last, h.numpy()) < RTOL


def test_fast_exp_softplus_silu_accuracy():
    """The vectorisable float32 functions of the numba kernel, against float64 NumPy."""
    from numba import njit

    from eamamba_ref.kernels.cpu import fastexp

    @njit
    def apply(x):
        out = np.empty((4, x.size), np.float32)
        for i in range(x.size):
            out[0, i] = fastexp.fexp(x[i])
            out[1, i] = fastexp.decay_exp2(x[i])
            out[2, i] = fastexp.softplus(x[i])
            out[3, i] = fastexp.silu(x[i])
        return out

    x = np.concatenate([np.linspace(-90, 90, 200_001), [-1e30, -87.0, 0.0, 20.0, 1e30]])
    x = x.astype(np.float32)
    got = apply(x).astype(np.float64)
    x64 = x.astype(np.float64)

    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):  # float64 oracles
        want_exp, want_exp2 = np.exp(x64), np.exp2(x64)
        want_softplus, want_silu = np.logaddexp(0.0, x64), x64 / (1.0 + np.exp(-x64))

    def max_rel(a, b, where):
        return np.max(np.abs(a[where] - b[where]) / np.abs(b[where]))

    assert max_rel(got[0], want_exp, (x64 > -87.3) & (x64 < 88.0)) < 5e-7
    assert np.all(got[0][x64 < -87.4] == 0.0) and np.all(np.isfinite(got[0]))
    assert max_rel(got[1], want_exp2, (x64 >= -63) & (x64 <= 127)) < 3e-7
    assert np.all(got[1][x64 < -63] == 2.0**-63)  # the floor that keeps products normal
    assert max_rel(got[2], want_softplus, x64 > -80) < 1e-6
    assert max_rel(got[3], want_silu, (np.abs(x64) > 1e-3) & (x64 > -80)) < 1e-6


# ------------------------------------------------------------------------------------------------
# The CUDA kernel, in numba's simulator (which must be switched on before numba.cuda is imported,
# hence a fresh interpreter)

CUDA_SIM_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    try:
        from numba import cuda
    except ImportError:
        sys.exit(77)  # numba-cuda not installed: the test is skipped
    from eamamba_ref.runtime import backends as ssm
    from tests.test_selective_scan import make_problem, scaled_error

    assert "cuda" in ssm.available_backends(), "the simulator should make 'cuda' available"
    cases = [
        dict(batch=2, dim=6, length=5, n_state=3, b_form="grouped", c_form="grouped",
             groups_b=3, groups_c=3),
        dict(batch=1, dim=4, length=1, n_state=1, b_form="dn", c_form="bnl", with_z=True),
        dict(batch=2, dim=2, length=4, n_state=2, b_form="bnl", c_form="dn", softplus=False,
             with_d=False, with_bias=False),
    ]
    failures = []
    for i, case in enumerate(cases):
        problem = make_problem(seed=i, **case)
        want = ssm.selective_scan(**problem, return_last_state=True, backend="numpy")
        got = ssm.selective_scan(**problem, return_last_state=True, backend="cuda")
        for part, g, w in zip(("y", "last_state"), got, want):
            if not isinstance(g, np.ndarray) or g.shape != w.shape or scaled_error(g, w) > 1e-5:
                failures.append(f"case {i} {part}: error {scaled_error(g, w):.3g}")

    # several time chunks (the three-launch path), forced on short sequences: chunks of 1 and 3
    from eamamba_ref.kernels.cuda import scan as gpu_scan
    gpu_scan.TARGET_THREADS = 10**6
    for min_chunk in (1, 3):
        gpu_scan.MIN_CHUNK = min_chunk
        for i, case in enumerate([dict(cases[0], length=10), dict(cases[1], length=7),
                                  dict(cases[2], length=9)]):
            problem = make_problem(seed=20 + i, **case)
            want = ssm.selective_scan(**problem, return_last_state=True, backend="numpy")
            got = ssm.selective_scan(**problem, return_last_state=True, backend="cuda")
            for part, g, w in zip(("y", "last_state"), got, want):
                if scaled_error(g, w) > 1e-5:
                    failures.append(f"chunks of {min_chunk}, case {i} {part}: error {scaled_error(g, w):.3g}")
    gpu_scan.TARGET_THREADS, gpu_scan.MIN_CHUNK = 16384, 32

    # device arrays in -> device arrays out
    problem = make_problem(seed=9, **cases[0])
    on_device = {k: (cuda.to_device(v) if isinstance(v, np.ndarray) else v)
                 for k, v in problem.items()}
    y_dev = ssm.selective_scan(**on_device, backend="cuda")
    if isinstance(y_dev, np.ndarray):
        failures.append("device input gave a host result")
    elif scaled_error(y_dev.copy_to_host(), ssm.selective_scan(**problem, backend="numpy")) > 1e-5:
        failures.append("device input: wrong result")

    # N above the kernel's local-array size is refused clearly
    try:
        ssm.selective_scan(np.ones((1, 1, 2)), np.ones((1, 1, 2)), -np.ones((1, 65)),
                           np.ones((1, 65)), np.ones((1, 65)), backend="cuda")
        failures.append("N = 65 was accepted")
    except ValueError as e:
        if "64" not in str(e):
            failures.append(f"unclear message for N = 65: {e}")

    if failures:
        print("\\n".join(failures), file=sys.stderr)
        sys.exit(1)
    print("cuda simulator: all cases match")
""")


def test_cuda_kernel_in_simulator():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", CUDA_SIM_SCRIPT], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    if result.returncode == 77:
        pytest.skip("numba-cuda is not installed")
    assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------------------------------------------------------
# Bad input and backend selection

def _good():
    return make_problem(seed=6, batch=1, dim=4, length=5, n_state=3, b_form="grouped",
                        c_form="grouped", groups_b=2, groups_c=2)


@pytest.mark.parametrize("change, message", [
    (dict(B=np.zeros((1, 3, 3, 5), np.float32)), "multiple of G"),
    (dict(C=np.zeros((1, 3, 3, 5), np.float32)), "multiple of G"),
    (dict(delta=np.zeros((1, 4, 6), np.float32)), "delta"),
    (dict(u=np.zeros((4, 5), np.float32)), "u must have shape"),
    (dict(A=np.zeros((3, 3), np.float32)), "A must have shape"),
    (dict(A=np.zeros((4, 0), np.float32)), "at least one state"),
    (dict(B=np.zeros((1, 2, 4, 5), np.float32)), "B must have shape"),
    (dict(C=np.zeros((1, 2, 3, 6), np.float32)), "C must have shape"),
    (dict(B=np.zeros((4, 2), np.float32)), "B must have shape"),
    (dict(C=np.zeros((5,), np.float32)), "C must have shape"),
    (dict(D=np.zeros(3, np.float32)), "D must have shape"),
    (dict(z=np.zeros((1, 4, 4), np.float32)), "z must have shape"),
    (dict(delta_bias=np.zeros((4, 1), np.float32)), "delta_bias must have shape"),
    (dict(A=np.zeros((4, 3), np.complex64)), "complex"),
])
@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_bad_input_raises_value_error(change, message, backend):
    problem = {**_good(), **change}
    with pytest.raises(ValueError, match=message):
        ssm.selective_scan(**problem, backend=backend)


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown selective-scan backend 'torch'"):
        ssm.selective_scan(**_good(), backend="torch")
    with pytest.raises(ValueError, match="unknown"):
        ssm.set_default_backend("fortran")


def test_default_backend_selection(monkeypatch):
    monkeypatch.delenv("EAMAMBA_BACKEND", raising=False)
    assert ssm.get_default_backend() == "numba"
    assert {"numpy", "numba"} <= set(ssm.available_backends())

    monkeypatch.setenv("EAMAMBA_BACKEND", "numpy")
    assert ssm.get_default_backend() == "numpy"
    monkeypatch.setenv("EAMAMBA_BACKEND", "julia")
    with pytest.raises(ValueError, match="EAMAMBA_BACKEND"):
        ssm.selective_scan(**_good())

    try:
        ssm.set_default_backend("numpy")  # overrides the (bad) environment variable
        assert ssm.get_default_backend() == "numpy"
        y = ssm.selective_scan(**_good())
        assert scaled_error(y, ssm.selective_scan(**_good(), backend="numba")) < RTOL
    finally:
        ssm.set_default_backend(None)
    monkeypatch.delenv("EAMAMBA_BACKEND")
    assert ssm.get_default_backend() == "numba"


def test_cuda_backend_refused_without_gpu():
    if "cuda" in ssm.available_backends():
        pytest.skip("a GPU (or the simulator) is present")
    with pytest.raises(RuntimeError, match="not available"):
        ssm.set_default_backend("cuda")
    with pytest.raises(RuntimeError, match="not available"):
        ssm.selective_scan(**_good(), backend="cuda")
