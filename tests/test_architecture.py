"""The house: each folder of the package is one layer, and every import points down.

    reference  <  kernels  <  runtime  <  io  <  apps          (pytorch: a side room)

Read from the source (every `import` statement, also those inside functions), so an arrow that runs
only on some code path counts too. Plus: importing the package does nothing to the process.
"""
from __future__ import annotations

import ast
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "eamamba_ref"
LAYERS = ["reference", "kernels", "runtime", "io", "apps"]
# Third-party modules each layer may import (the standard library is always allowed).
THIRD_PARTY = {
    "reference": {"numpy", "scipy"},
    "kernels": {"numpy", "numba", "llvmlite"},
    "runtime": {"numpy", "numba", "threadpoolctl"},
    "io": {"numpy", "PIL", "skimage", "tifffile", "imageio", "png"},
    "apps": {"numpy", "scipy", "skimage", "matplotlib", "tqdm", "dask", "distributed", "tifffile", "PIL",
             "bm3d", "torch", "yaml"},
    "pytorch": {"numpy", "torch", "numba", "llvmlite"},
}


def module_name(path):
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports():
    """{module: {imported module or package, ...}} for every module of the package."""
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
                for alias in node.names:          # `from pkg import module` names a module
                    sub = f"{base}.{alias.name}"
                    is_module = (ROOT / (sub.replace(".", "/") + ".py")).exists() or \
                        (ROOT / sub.replace(".", "/")).is_dir()
                    found.add(sub if is_module else base)
        graph[name] = found
    return graph


def room(module):
    """The folder (layer) of a package module, '' for the package root and the command aliases."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS + ["pytorch"]) else ""


GRAPH = imports()


def test_the_package_has_the_six_rooms():
    rooms = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert rooms == set(LAYERS) | {"pytorch"}
    loose = sorted(p.stem for p in PACKAGE.glob("*.py"))
    # the top level: the package's API and the documented `python -m eamamba_ref.<command>` names
    assert loose == ["__init__", "convert", "draw", "evaluate", "oracle", "profile", "restore"]


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if room(m) in LAYERS))
def test_every_arrow_points_down(module):
    mine = LAYERS.index(room(module))
    for target in GRAPH[module]:
        if not target.startswith("eamamba_ref"):
            continue
        there = room(target)
        assert there != "", f"{module} imports the package root or a command alias ({target})"
        if there == "pytorch":
            assert module == "eamamba_ref.apps.oracle", f"{module} imports the PyTorch room ({target})"
            continue
        assert LAYERS.index(there) <= mine, f"{module} ({room(module)}) imports {target} ({there}), a layer above"


def test_the_pytorch_room_imports_no_model_code():
    """The PyTorch reference is an independent re-implementation: it may share the CPU kernels'
    fast exp and denormal switch (its Numba scan uses them) but none of the NumPy model."""
    for module in (m for m in GRAPH if room(m) == "pytorch"):
        for target in GRAPH[module]:
            if target.startswith("eamamba_ref"):
                assert room(target) == "pytorch" or target in (
                    "eamamba_ref.kernels.cpu.fastexp", "eamamba_ref.kernels.cpu.fpenv"), (module, target)


@pytest.mark.parametrize("layer", sorted(THIRD_PARTY))
def test_each_layer_uses_only_its_libraries(layer):
    stdlib = sys.stdlib_module_names
    for module in (m for m in GRAPH if room(m) == layer):
        for target in GRAPH[module]:
            top = target.split(".")[0]
            if top in ("eamamba_ref", "__future__") or top in stdlib:
                continue
            assert top in THIRD_PARTY[layer], f"{module} imports {target}"


def test_no_import_cycle():
    state = {}

    def visit(module, path):
        state[module] = "open"
        for target in sorted(GRAPH.get(module, ())):
            if target not in GRAPH:
                continue
            if state.get(target) == "open":
                raise AssertionError("import cycle: " + " -> ".join(path + [target]))
            if target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])


def test_the_reference_reads_without_a_backend_switch():
    """reference/ names no backend and no device (only ops.py, which describes the tables): the
    model code runs whatever table it is given."""
    for path in (PACKAGE / "reference").glob("*.py"):
        if path.name == "ops.py":
            continue
        text = path.read_text(encoding="utf-8")
        for word in ("backend", "cuda", "numba", "DeviceTensor", "ndarray)"):
            assert word not in text, f"{path.name} mentions {word!r}"


def run_python(script):
    """Run `script` in a fresh interpreter on this checkout; assert it printed 'ok'."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_importing_the_package_changes_nothing_in_the_process():
    """No environment variable written, no library threads started, no numba.cuda or torch loaded."""
    script = (
        "import os, sys, threading\n"
        "before = dict(os.environ); threads = threading.active_count()\n"
        "import eamamba_ref, eamamba_ref.apps.restore, eamamba_ref.apps.distributed\n"
        "assert dict(os.environ) == before, set(os.environ.items()) ^ set(before.items())\n"
        "assert threading.active_count() == threads\n"
        "assert 'torch' not in sys.modules and 'numba.cuda' not in sys.modules\n"
        "print('ok')\n")
    run_python(script)


def test_the_pytorch_room_loads_none_of_the_numpy_model():
    """`import eamamba_ref.pytorch` (the oracle side, next to torch) loads only that room: the
    package's names are resolved on first use."""
    script = (
        "import sys\n"
        "import eamamba_ref.pytorch\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('eamamba_ref'))\n"
        "assert all(m == 'eamamba_ref' or m.startswith('eamamba_ref.pytorch') for m in loaded), loaded\n"
        "assert 'numba' not in sys.modules\n"
        "import eamamba_ref\n"
        "assert eamamba_ref.EAMamba.__module__ == 'eamamba_ref.runtime.model'\n"
        "print('ok')\n")
    run_python(script)
