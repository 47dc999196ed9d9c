"""The teaching notebooks run top to bottom; they are committed without outputs; the figures script works.

Each notebook in notebooks/ is executed with nbclient in a fresh kernel of this interpreter (working
directory notebooks/, as a reader opening it there), with a per-cell timeout. An exception in any cell
fails the test and shows that cell's traceback; outputs are never written back to the files.
Notebooks 3 and 4 use the bundled demo weights when they exist and say so when they fall back to
random weights, so these tests pass in either case (set EAMAMBA_DEMO_WEIGHTS to try other weights).
"""
import importlib.util
import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
EXPECTED = ["01_scan_orderings.ipynb", "02_selective_scan.ipynb",
            "03_local_pixel_forgetting.ipynb", "04_restore_an_image.ipynb"]
CELL_TIMEOUT = 600   # seconds per cell; each notebook takes well under two minutes on 2 cores


def test_the_four_notebooks_are_there():
    assert [p.name for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, "a notebook without code cells"
    with_outputs = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not with_outputs, f"cells {with_outputs} have outputs: clear them before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_top_to_bottom(path):
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    client.execute()                    # raises CellExecutionError with the traceback of a failing cell
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code), "some code cells did not run"
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors
    # every notebook draws something: at least one figure came back from the kernel
    assert any("image/png" in o.get("data", {}) for c in code for o in c.outputs)


def _make_figures():
    spec = importlib.util.spec_from_file_location("make_figures", ROOT / "scripts" / "make_figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_figures_writes_the_cheap_figures(tmp_path):
    make_figures = _make_figures()
    assert make_figures.main(["--out", str(tmp_path), "--only", "scans", "diagrams"]) == 0
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["mhssm.png", "scan_directions_diagonal8.png", "scan_orderings.png", "unet.png"]
    for p in tmp_path.iterdir():
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_make_figures_rejects_unknown_figure_names(tmp_path, capsys):
    make_figures = _make_figures()
    with pytest.raises(SystemExit):
        make_figures.main(["--out", str(tmp_path), "--only", "nonsense"])
    assert "invalid choice" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
