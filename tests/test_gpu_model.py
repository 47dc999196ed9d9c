"""The whole-model GPU path (`eamamba_ref.gpu`) against the NumPy forward pass.

Run on numba's CUDA simulator in CI (NUMBA_ENABLE_CUDASIM=1 is set for this module's subprocess,
so the rest of the suite keeps the real numba.cuda), and on a GPU by benchmarks/gpu_check.py.
Each case runs in a fresh interpreter because the simulator is chosen when numba.cuda is imported.
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
    from eamamba_ref.config import ModelConfig
    from eamamba_ref.model import EAMamba, init_params
    from eamamba_ref.gpu import DeviceTensor
    from eamamba_ref.gpu import tensor as T
    from eamamba_ref import layers

    name, args, shape = json.loads(sys.argv[1])
    cfg = ModelConfig.from_args(name, args)
    params = init_params(cfg, seed=5)
    x = np.random.default_rng(6).random(shape, dtype=np.float32)
    ref = EAMamba(cfg, params, backend="numpy")(x)
    out = EAMamba(cfg, params, backend="cuda")(x)
    result = {"shape": list(out.shape), "ref_shape": list(ref.shape),
              "rel": float(np.abs(out - ref).max() / np.abs(ref).max())}
    print(json.dumps(result))
""")


def run_case(name, args, shape):
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps([name, args, shape])],
                          capture_output=True, text=True, env=env, timeout=600)
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


def test_gpu_check_script_rehearses_on_the_simulator(tmp_path):
    """benchmarks/gpu_check.py is what a lent GPU runs, once: rehearse it here (toy model)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "gpu.json"
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    proc = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "gpu_check.py"), "--tiny",
                           "--repeats", "1", "--json", str(out)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["device"] == "CUDA simulator"
    assert result["agreement"]["rel_max_err"] < 1e-4
    assert result["timings"][0]["size"] == 8 and result["timings"][0]["eamamba_ref_cuda_s"] > 0
