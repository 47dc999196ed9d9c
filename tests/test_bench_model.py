"""The parts of benchmarks/bench_model.py that decide what the PyTorch reference row measures: its
candidate scans compute the reference's selective scan, and denormals are flushed on every thread.
(Run in child processes: the benchmark module sets up its imports for its own children.)"""
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(code):
    pytest.importorskip("torch")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, 'benchmarks')\n" + code],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.split()


def test_every_candidate_scan_matches_the_sequential_reference():
    # check_scan raises unless the relative error against the reference's sequential scan is
    # < 1e-5 (l = 300: no chunk length divides it, so the padded last chunk is exercised too)
    out = _run("import bench_model as b\n"
               "names = sorted(b.torch_scan_candidates())\n"
               "[b.check_scan(b.torch_scan_candidates()[n]) for n in names]\n"
               "print(len(names), sum(n.startswith('in-place') for n in names))")
    assert int(out[-2]) >= 4 and int(out[-1]) >= 2


def test_a_wrong_scan_is_caught():
    out = _run("import bench_model as b, functools\n"
               "from eamamba_ref import pytorch as torch_ref\n"
               "bad = lambda *a, **k: 1.001 * torch_ref.selective_scan(*a, mode='sequential', **k)\n"
               "try:\n    b.check_scan(bad)\nexcept AssertionError:\n    print('caught')")
    assert out[-1] == "caught"


def test_denormals_flushed_on_all_of_torchs_threads():
    out = _run("import torch, bench_model as b\n"
               "print(b.flush_denormals_everywhere(2), torch.get_num_threads())")
    assert out[-2:] == ["True", "2"]


def test_peak_memory_is_the_peak_inside_the_block():
    # A 400 MB array freed before the block must not count; a 200 MB one made and freed inside
    # must (its pages are touched, so they were resident). Runs without torch.
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    code = ("import sys; sys.path.insert(0, 'benchmarks')\n"
            "import numpy as np, bench_model as b\n"
            "big = np.ones(100 << 20, np.float32); del big\n"
            "base = b.rss_mib()\n"
            "with b.PeakRss() as p:\n"
            "    a = np.ones(50 << 20, np.float32); a += 1; del a\n"
            "print(p.peak - base, p.how)")
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    growth = float(done.stdout.split()[0])
    assert 150 < growth < 350, done.stdout


def _bench_model():
    """The benchmark module, imported in this process (its top level imports nothing heavy when it
    is not a child)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_model", ROOT / "benchmarks" / "bench_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_spread_line_compares_host_settings_with_identical_processes():
    """Hand-worked: settings 1.00 / 1.10 / 1.05 s (medians) -> 10.0 %; best 0.90 / 0.99 / 0.95 -> 10.0 %;
    the control process 1.02 / 0.90 s against the first row's 1.00 / 0.90 s -> 2.0 % / 0.0 %.
    A failed row is left out, and without a control the line says nothing about one."""
    res = {"eamamba_ref": {"median": 1.00, "min": 0.90},
           "eamamba_ref_numpy_first": {"median": 1.10, "min": 0.99},
           "eamamba_ref_torch_first": {"median": 1.05, "min": 0.95},
           "eamamba_ref_again": {"median": 1.02, "min": 0.90},
           "torch": {"median": 9.0, "min": 8.0}}
    spreads = _bench_model().spreads
    line = spreads(128, res)
    assert "host settings: medians 10.0%, best 10.0%" in line
    assert "(control): medians 2.0%, best 0.0%" in line
    res["eamamba_ref_numpy_first"] = {"error": "killed"}
    del res["eamamba_ref_again"]
    line = spreads(128, res)
    assert "host settings: medians 5.0%, best 5.6%" in line
    assert "control" not in line
