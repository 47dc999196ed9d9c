"""The whole-model GPU path (`eamamba_ref.kernels.cuda`) against the NumPy forward pass.

Run on numba's CUDA simulator in CI (NUMBA_ENABLE_CUDASIM=1 is set for this module's subprocess,
so the rest of the suite keeps the real numba.cuda), and on a GPU by benchmarks/gpu_check.py.
Each case runs in a fresh interpreter because the simulator is chosen when numba.cuda is imported.
The models run the kernels a GPU runs, at the GPU's tile size: every product goes through the
tiled 16 x 16 GEMM (several blocks each), every other kernel over several blocks (the cases record
the grids, and the tests check them). The simulator is slow at that (each simulated thread is a
Python thread): the toy U-Net's ~470 GEMM blocks take ~100 s of CPU time.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("numba.cuda")

SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    from eamamba_ref.io.config import ModelConfig
    from eamamba_ref.runtime.model import EAMamba
    from eamamba_ref.reference.parameters import init_params
    from eamamba_ref.kernels.cuda import kernels as K
    from eamamba_ref.kernels.cuda import scan as gpu_scan

    gpu_scan.POISON_OUTPUTS = True      # outputs start as NaN: an element left unwritten fails

    # record the grids: GEMM blocks (tiled) and plain-GEMM uses, grid-stride blocks
    grids = {"gemm_launches": 0, "gemm_max_blocks": 0, "simple_gemm_launches": 0, "max_blocks": 0}
    _gemm_launch, _launch, _matmul_kernel = K.gemm_launch, K.launch, K.matmul_kernel
    def gemm_launch(z, m, n):
        blocks, threads = _gemm_launch(z, m, n)
        grids["gemm_launches"] += 1
        grids["gemm_max_blocks"] = max(grids["gemm_max_blocks"], blocks)
        return blocks, threads
    def launch(n):
        blocks, threads = _launch(n)
        grids["max_blocks"] = max(grids["max_blocks"], blocks)
        return blocks, threads
    def matmul_kernel(z, m, n, tiled=True):
        grids["simple_gemm_launches"] += not tiled
        return _matmul_kernel(z, m, n, tiled)
    K.gemm_launch, K.launch, K.matmul_kernel = gemm_launch, launch, matmul_kernel

    name, args, shape = json.loads(sys.argv[1])
    cfg = ModelConfig.from_args(name, args)
    params = init_params(cfg, seed=5)
    x = np.random.default_rng(6).random(shape, dtype=np.float32)
    ref = EAMamba(cfg, params, backend="numpy")(x)
    out = EAMamba(cfg, params, backend="cuda")(x)
    result = {"shape": list(out.shape), "ref_shape": list(ref.shape),
              "rel": float(np.abs(out - ref).max() / np.abs(ref).max()), "tile": K.TILE, **grids}
    print(json.dumps(result))
""")


def run_case(name, args, shape):
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps([name, args, shape])],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


MAMBA = dict(scan_type="diagonal", scan_count=8, scan_merge_method="concate", d_state=4, d_conv=3,
             expand=2, conv_2d=True)


@pytest.mark.parametrize("case", [
    # the demo denoiser's layout at toy size: U-Net, every level, 'concate' 8-direction MHSSM
    ("eamamba", dict(dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, mamba_cfg=MAMBA), (1, 3, 8, 8)),
    # the SR model, 'add' merge over zigzag x2, 1-D causal conv, GDFN mixer (erfc GELU, depthwise conv)
    ("eamambasr", dict(dim=4, num_blocks=[1], upscale=2, channel_mixer_type="GDFN",
                       mamba_cfg=dict(MAMBA, scan_type="zigzag", scan_count=2, scan_merge_method="add",
                                      conv_2d=False, d_conv=4, expand=1, bias=True)), (2, 3, 5, 6)),
    # CCA mixer (pooling, sigmoid), BiasFree norms, Hilbert x4
    ("eamambasr", dict(dim=4, num_blocks=[1], upscale=3, channel_mixer_type="CCA", layernorm_type="BiasFree",
                       mamba_cfg=dict(MAMBA, scan_type="hilbert", scan_count=4, expand=1)), (1, 3, 4, 4)),
])
def test_gpu_model_matches_numpy(case):
    name, args, shape = case
    r = run_case(name, args, shape)
    assert r["shape"] == r["ref_shape"]
    assert r["rel"] < 1e-4, r
    # the GPU's kernels at the GPU's tile: tiled GEMM only, several blocks per launch
    assert r["tile"] == 16 and r["gemm_launches"] > 0 and r["simple_gemm_launches"] == 0, r
    assert r["gemm_max_blocks"] >= 2 and r["max_blocks"] >= 2, r


def test_gpu_check_script_rehearses_on_the_simulator(tmp_path):
    """benchmarks/gpu_check.py is what a lent GPU runs, once: rehearse every stage here (--tiny:
    small kernel checks, one toy model, a 4x4 'timing'; torch, if installed, runs on the CPU)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "gpu.json"
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    proc = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "gpu_check.py"), "--tiny",
                           "--repeats", "1", "--out", str(out)], capture_output=True, text=True, env=env,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "GPU CHECK: PASS (CUDA simulator)"
    result = json.loads(out.read_text())
    assert result["verdict"] == "PASS" and not result["errors"]
    assert result["environment"]["device"] == "CUDA simulator"
    kernels = result["kernels"]
    assert {"gemm_tiled", "gemm_simple", "conv_depthwise", "layer_norm_channels", "pixel_shuffle",
            "all_around_hilbert", "restore_zigzag", "scan_one_chunk", "scan_chunked"} <= set(kernels)
    assert all(k["ok"] and k["rel_err"] <= k["tol"] for k in kernels.values())
    assert result["models"]["sr_cca_hilbert"]["rel_err"] < 1e-4
    assert result["timings"][0]["size"] == 4 and result["timings"][0]["eamamba_ref_cuda_s"] > 0
    if result["environment"]["packages"]["torch"]:
        assert result["models"]["cuda_vs_torch_4"]["ok"] and result["timings"][0]["torch_s"] > 0


def test_cuda_is_the_default_only_on_a_real_gpu(monkeypatch):
    """restore/evaluate run the whole model on the GPU where numba-cuda sees one, never in the
    simulator and never without one; the scan function's own default stays 'numba'."""
    from eamamba_ref.apps import restore
    from eamamba_ref.runtime import backends as ssm

    monkeypatch.delenv("EAMAMBA_BACKEND", raising=False)
    monkeypatch.delenv("NUMBA_ENABLE_CUDASIM", raising=False)
    monkeypatch.setattr(ssm, "_cuda_available", lambda: True)     # as on a machine with a GPU
    assert restore.default_backend() == "cuda" and ssm.get_default_backend() == "numba"
    monkeypatch.setenv("NUMBA_ENABLE_CUDASIM", "1")
    assert restore.default_backend() == "numba"
    monkeypatch.delenv("NUMBA_ENABLE_CUDASIM")
    monkeypatch.setattr(ssm, "_cuda_available", lambda: False)
    assert restore.default_backend() == "numba"
