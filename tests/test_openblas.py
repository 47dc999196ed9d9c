"""`import eamamba_ref` before NumPy makes OpenBLAS's idle threads sleep; otherwise the model says so once.

(The speed effect itself is measured by benchmarks/bench_model.py, not here.)
"""
import os
import subprocess
import sys

import numpy as np
import pytest


_OPENBLAS_SCRIPT = """
import eamamba_ref
import numpy as np, warnings
from eamamba_ref.config import ModelConfig
from eamamba_ref.model import EAMamba, init_params
cfg = ModelConfig.from_args("eamamba", dict(dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=0))
model = EAMamba(cfg, init_params(cfg, 0))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    model(np.zeros((1, 3, 8, 8), np.float32))
    model(np.zeros((1, 3, 8, 8), np.float32))
print(sum("OPENBLAS_THREAD_TIMEOUT" in str(w.message) for w in caught))
"""


@pytest.mark.parametrize("numpy_first, env, expected", [(True, {}, 1), (False, {}, 0),
                                                         (True, {"OPENBLAS_THREAD_TIMEOUT": "4"}, 0)])
def test_openblas_spin_warning_once_when_numpy_came_first(numpy_first, env, expected):
    import subprocess
    import sys

    blas = str(np.__config__.CONFIG["Build Dependencies"]["blas"]["name"]).lower()
    if "openblas" not in blas:
        pytest.skip("this NumPy is not built with OpenBLAS")   # the warning is about OpenBLAS only
    script = ("import numpy\n" if numpy_first else "") + _OPENBLAS_SCRIPT
    environ = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"} | env
    out = subprocess.run([sys.executable, "-c", script], env=environ, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-500:]
    assert int(out.stdout.strip().splitlines()[-1]) == expected


@pytest.mark.parametrize("preset", [{}, {"OMP_WAIT_POLICY": "active", "OPENBLAS_THREAD_TIMEOUT": "20"}])
def test_import_sets_the_idle_thread_settings_unless_the_user_did(preset):
    script = ("import os, eamamba_ref\n"
              "print(os.environ['OMP_WAIT_POLICY'], os.environ['OPENBLAS_THREAD_TIMEOUT'], "
              "sorted(eamamba_ref.THREAD_ENV_SET))")
    environ = {k: v for k, v in os.environ.items()
               if k not in ("OMP_WAIT_POLICY", "OPENBLAS_THREAD_TIMEOUT")} | preset
    out = subprocess.run([sys.executable, "-c", script], env=environ, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-500:]
    if preset:
        assert out.stdout.split() == ["active", "20", "[]"]
    else:
        assert out.stdout.strip() == "passive 4 ['OMP_WAIT_POLICY', 'OPENBLAS_THREAD_TIMEOUT']"
