"""The demo-training recipe's SR start: an untrained x2 EAMambaSR with `bilinear_start` must equal
torch's own bilinear upsampling (an independent implementation) away from the border."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional


def _train_demo():
    path = Path(__file__).resolve().parents[1] / "training" / "train_demo.py"
    spec = importlib.util.spec_from_file_location("train_demo", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bilinear_start_is_bilinear_upsampling():
    td = _train_demo()
    from eamamba_ref.pytorch import build_from_args, set_scan_mode

    set_scan_mode("sequential")
    name, args = td.TASKS["sr2"]
    torch.manual_seed(1)
    model = build_from_args(name, dict(args, dim=8, num_blocks=[1]))
    td.bilinear_start(model)
    x = torch.from_numpy(np.random.default_rng(0).random((1, 3, 12, 10), dtype=np.float32))
    with torch.no_grad():
        out = model(x)
    ref = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    # Zero padding (network) and edge clamping (interpolate) differ only in the outer HR pixels.
    inner = (slice(None), slice(None), slice(2, -2), slice(2, -2))
    err = (out[inner] - ref[inner]).abs().max() / ref[inner].abs().max()
    assert err < 1e-6
    # ...and it is a starting point only: the body and the other channels still carry random weights.
    assert model.conv_after_body.weight[3:].abs().sum() > 0


def test_bilinear_start_rejects_other_scales():
    td = _train_demo()
    with pytest.raises(ValueError, match="x2"):
        td.bilinear_start(object(), scale=3)


def test_gray_from_colour_is_the_colour_model_on_replicated_gray():
    """A gray model started from a colour one equals the colour model fed (g, g, g), channels averaged."""
    td = _train_demo()
    from eamamba_ref.pytorch import build_from_args, set_scan_mode

    set_scan_mode("sequential")
    small = dict(dim=8, num_blocks=[1, 1, 1, 1])
    name, args = td.TASKS["denoise"]
    torch.manual_seed(2)
    colour = build_from_args(name, dict(args, **small))
    gname, gargs = td.TASKS["denoise_gray"]
    gray = build_from_args(gname, dict(gargs, **small))
    td.gray_from_colour(gray, colour.state_dict())
    g = torch.from_numpy(np.random.default_rng(1).random((1, 1, 16, 16), dtype=np.float32))
    with torch.no_grad():
        ref = colour(g.repeat(1, 3, 1, 1)).mean(dim=1, keepdim=True)
        out = gray(g)
    assert out.shape == (1, 1, 16, 16)
    assert float((out - ref).abs().max() / ref.abs().max()) < 1e-5
