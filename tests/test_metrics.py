"""Metrics (official protocol) and the evaluate command.

SSIM is checked against a float64 transcription of the official calc_ssim (gaussian 11x11 window of
sigma 1.5 from cv2.getGaussianKernel, 'valid' filtering, 0-255 scale), written here with scipy.
"""
import csv

import numpy as np
import pytest
from scipy.signal import correlate2d

from eamamba_ref.apps import evaluate, metrics
from eamamba_ref.io.checkpoint import save_converted
from eamamba_ref.io.config import ModelConfig
from eamamba_ref.io.images import write_image
from eamamba_ref.reference.parameters import init_params


def official_ssim(pred, gt):
    k = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5 ** 2))
    k /= k.sum()                                    # cv2.getGaussianKernel(11, 1.5)
    win = np.outer(k, k)
    maps = []
    for c in range(pred.shape[2]):
        a, b = pred[..., c] * 255.0, gt[..., c] * 255.0
        f = lambda v: correlate2d(v, win, mode="valid")
        mu1, mu2 = f(a), f(b)
        s1, s2, s12 = f(a * a) - mu1 ** 2, f(b * b) - mu2 ** 2, f(a * b) - mu1 * mu2
        c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
        maps.append(((2 * mu1 * mu2 + c1) * (2 * s12 + c2)) / ((mu1 ** 2 + mu2 ** 2 + c1) * (s1 + s2 + c2)))
    return float(np.mean(maps))


def test_psnr_hand_worked():
    gt = np.full((8, 8, 3), 0.5)
    assert metrics.psnr(gt + 0.1, gt) == pytest.approx(20.0)          # MSE 0.01
    assert metrics.psnr(np.full((8, 8, 3), 2.0), np.ones((8, 8, 3))) > 100   # prediction is clipped


def test_ssim_matches_the_official_formula():
    rng = np.random.default_rng(0)
    gt = rng.random((24, 30, 3))
    pred = np.clip(gt + rng.normal(0, 0.1, gt.shape), 0, 1)
    assert metrics.ssim(pred, gt) == pytest.approx(official_ssim(pred, gt), rel=1e-9)
    assert metrics.ssim(gt, gt) == pytest.approx(1.0)


def test_y_channel_and_border():
    assert metrics.rgb_to_y(np.ones((1, 1, 3)))[0, 0, 0] == pytest.approx(235 / 255)
    assert metrics.rgb_to_y(np.zeros((1, 1, 3)))[0, 0, 0] == pytest.approx(16 / 255)
    gt = np.zeros((10, 10, 3))
    pred = gt.copy()
    pred[0] = 1.0                                     # error only in the border row
    assert metrics.psnr(pred, gt, y_only=True, border=2) > 100


def test_evaluate_command_writes_a_row_per_image_and_method(tmp_path, capsys):
    cfg = ModelConfig.from_args("eamamba", dict(dim=16, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1,
                                                mamba_cfg=dict(scan_type="diagonal", scan_count=8, d_state=4,
                                                               scan_merge_method="concate", d_conv=3, expand=1)))
    weights = tmp_path / "w.npz"
    save_converted(weights, cfg.name, cfg.to_args(), init_params(cfg))
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        write_image(data / f"{i}.png", rng.random((24, 16, 3)), 8)
    out = tmp_path / "r.csv"
    assert evaluate.main(["--data", str(data), "--weights", str(weights), "--csv", str(out)]) == 0
    rows = list(csv.DictReader(open(out)))
    methods = {r["method"] for r in rows}
    assert methods == {"EAMamba", "noisy input", "TV", "wavelet", "NL-means"}
    assert len(rows) == 2 * len(methods)
    assert "EAMamba" in capsys.readouterr().out
    assert evaluate.main(["--data", str(tmp_path / "empty"), "--weights", str(weights)]) == 2
    # baselines only: the same rows without the model's, and the same values (same seeded noise)
    out2 = tmp_path / "b.csv"
    assert evaluate.main(["--data", str(data), "--no-model", "--csv", str(out2)]) == 0
    base = list(csv.DictReader(open(out2)))
    assert {r["method"] for r in base} == methods - {"EAMamba"}
    before = {(r["image"], r["method"]): r["psnr"] for r in rows}
    assert all(before[(r["image"], r["method"])] == r["psnr"] for r in base)


def test_eval_table_merges_baseline_and_model_csvs(tmp_path):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "eval_table", Path(__file__).resolve().parents[1] / "scripts" / "eval_table.py")
    et = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(et)

    def write(name, rows):
        with open(tmp_path / name, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["image", "method", "psnr", "ssim", "seconds"])
            w.writeheader()
            w.writerows(dict(image=i, method=m, psnr=p, ssim=0.5, seconds=0) for i, m, p in rows)

    write("Kodak_sigma25_baselines.csv", [("a", "TV", 30), ("b", "TV", 31), ("a", "NL-means", 29), ("b", "NL-means", 29)])
    write("Kodak_sigma25_model.csv", [("a", "EAMamba", 32), ("b", "EAMamba", 33), ("a", "TV", 30), ("b", "TV", 31)])
    text, ok = et.table(et.read_rows(str(tmp_path)), denoise=True)
    assert ok
    assert "| Kodak (2) | 25 | – | 30.50 / 0.500 | – | 29.00 / 0.500 | – | **32.50 / 0.500** |" in text
    write("Set12_gray_sigma25_baselines.csv", [("a", "BM3D", 31), ("a", "NL-means", 28)])
    write("Set12_gray_sigma25_model.csv", [("a", "EAMamba", 30)])
    text, ok = et.table(et.read_rows(str(tmp_path)), denoise=True)
    assert ok and "| Set12_gray (1) | 25 | – | – | – | 28.00 / 0.500 | **31.00 / 0.500** | 30.00 / 0.500 |" in text
    write("Kodak_sigma50_baselines.csv", [("a", "TV", 30)])           # no model row: flagged
    assert et.table(et.read_rows(str(tmp_path)), denoise=True)[1] is False
