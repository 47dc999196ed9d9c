"""The scan-drawing CLI writes real PNGs, refuses to overwrite, and fails with one clear line."""
import numpy as np
import pytest

from eamamba_ref.apps import draw


def test_cli_writes_pngs_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "scans.png"
    assert draw.main(["-o", str(out), "--size", "4", "6"]) == 0
    second = tmp_path / "scans_diagonal8.png"
    for path in (out, second):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    before = out.read_bytes()
    assert draw.main(["-o", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    assert out.read_bytes() == before                      # untouched
    assert draw.main(["-o", str(out), "--overwrite", "--scan", "hilbert", "--count", "4"]) == 0
    assert out.read_bytes() != before


def test_cli_bad_ordering_is_one_line_error(tmp_path, capsys):
    assert draw.main(["--scan", "spiral", "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown scan_type") and "\n" not in err
    assert not (tmp_path / "x.png").exists()


def test_plotted_path_follows_the_ordering():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    order = np.array([0, 2, 1, 3])
    draw.plot_path(ax, order, 2, 2)
    segments = ax.collections[0].get_segments()
    # (x, y) = (col, row): 0 -> 2 is (0,0) -> (0,1); 2 -> 1 is (0,1) -> (1,0)
    assert np.allclose(segments[0], [[0, 0], [0, 1]])
    assert np.allclose(segments[1], [[0, 1], [1, 0]])
    plt.close(fig)
