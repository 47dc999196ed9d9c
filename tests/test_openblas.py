"""Importing eamamba_ref sets nothing in the process, and the import order does not matter: no
environment variable appears, and with NumPy imported first the model runs without a warning
(OpenBLAS is held to one thread by `runtime` while a forward runs, whenever it was loaded).

(Bits across thread counts and import orders: tests/test_threads.py. Speed: benchmarks/bench_model.py.)
"""
import os
import subprocess
import sys

import pytest

_SCRIPT = """
import os
before = dict(os.environ)
{first}
import eamamba_ref
import numpy as np, warnings
from eamamba_ref.io.config import ModelConfig
from eamamba_ref.runtime.model import EAMamba
from eamamba_ref.reference.parameters import init_params
imported = dict(os.environ)
cfg = ModelConfig.from_args("eamamba", dict(dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=0))
model = EAMamba(cfg, init_params(cfg, 0))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    model(np.zeros((1, 3, 8, 8), np.float32))
print(imported == before, dict(os.environ) == before, sum(issubclass(w.category, RuntimeWarning) for w in caught))
"""


@pytest.mark.parametrize("first", ["", "import numpy", "import torch"])
def test_import_changes_no_environment_and_the_model_does_not_warn(first):
    if first == "import torch":
        pytest.importorskip("torch")
    environ = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_THREAD_TIMEOUT", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", _SCRIPT.format(first=first)], env=environ,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-1000:]
    assert out.stdout.split()[-3:] == ["True", "True", "0"]
