"""The oracle: named activations of the NumPy model and of the PyTorch reference agree layer by layer,
and a planted error is reported at the layer where it was planted."""
import numpy as np
import pytest

from eamamba_ref import oracle
from eamamba_ref.checkpoint import save_converted
from eamamba_ref.config import ModelConfig
from eamamba_ref.loading import load
from eamamba_ref.model import init_params

ARGS = dict(dim=16, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1,
            mamba_cfg=dict(scan_type="diagonal", scan_count=8, scan_merge_method="concate", d_state=4,
                           d_conv=3, expand=1, conv_2d=True))


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    cfg = ModelConfig.from_args("eamamba", ARGS)
    path = tmp_path_factory.mktemp("o") / "w.npz"
    save_converted(path, cfg.name, cfg.to_args(), init_params(cfg, seed=3))
    return str(path)


def x():
    return np.random.default_rng(0).random((1, 3, 16, 16), dtype=np.float32)


def test_numpy_trace_names_every_stage(weights):
    values = oracle.trace_numpy(load(weights), x())
    names = list(values)
    assert names[0] == "patch_embed" and names[-1] == "result"
    for stage in ["in_proj", "act", "all_around", "x_proj", "dt_proj", "selective_scan", "restore",
                  "out_norm", "gate", "out_proj"]:
        assert f"encoder_level1.0.mamba.{stage}" in values
    assert names.index("encoder_level1.0.mamba") < names.index("encoder_level1.0.ffn") < names.index("encoder_level1.0")
    assert values["encoder_level1.0.mamba.all_around"].shape == (1, 8, 2, 256)


def test_numpy_and_torch_traces_agree_then_a_planted_error_is_found(weights, tmp_path, capsys):
    pytest.importorskip("torch")
    model = load(weights)
    ref = oracle.trace_torch(oracle._torch_model(model), x())
    ours = oracle.trace_numpy(model, x())
    first, rows = oracle.compare(ref, ours, tol=1e-4)
    assert first is None
    common = {r[0] for r in rows}
    assert {"encoder_level2.0.mamba.in_proj", "encoder_level2.0.mamba.out_norm", "encoder_level2.0.mamba",
            "latent.0", "down1_2", "output", "result"} <= common

    # plant a transposed weight in one MHSSM's output projection (square: 32 x 32)
    bad = dict(model.params)
    key = "encoder_level2.0.mamba.out_proj.weight"
    bad[key] = np.ascontiguousarray(bad[key].T)
    model.params = bad
    wrong = oracle.trace_numpy(model, x())
    assert oracle.compare(ref, wrong, tol=1e-4)[0] == "encoder_level2.0.mamba.out_proj"

    # the same through the files and the CLI
    a, b = tmp_path / "torch.npz", tmp_path / "bad.npz"
    oracle.save_trace(a, ref)
    oracle.save_trace(b, wrong)
    assert oracle.main(["compare", str(a), str(b)]) == 1
    assert "first divergence: encoder_level2.0.mamba.out_proj" in capsys.readouterr().out


def test_cli_run_numpy_and_torch_agree(weights, tmp_path, capsys):
    pytest.importorskip("torch")
    a, b = tmp_path / "n.npz", tmp_path / "t.npz"
    assert oracle.main(["run", weights, "--shape", "1", "3", "16", "24", "-o", str(a)]) == 0
    assert oracle.main(["run", weights, "--shape", "1", "3", "16", "24", "--impl", "torch", "-o", str(b)]) == 0
    assert oracle.main(["compare", str(b), str(a)]) == 0
    assert "agree" in capsys.readouterr().out


def test_internal_stage_divergence_is_named_between_numpy_traces(weights):
    model = load(weights)
    clean = oracle.trace_numpy(model, x())
    bad = dict(model.params)
    key = "encoder_level1.0.mamba.x_proj_weight"
    bad[key] = np.ascontiguousarray(bad[key][::-1])           # heads swapped
    model.params = bad
    assert oracle.compare(clean, oracle.trace_numpy(model, x()))[0] == "encoder_level1.0.mamba.x_proj"


def test_run_never_overwrites_and_writes_ordinary_files(weights, tmp_path, capsys):
    import os

    from eamamba_ref.images import write_image
    png = tmp_path / "p.png"
    write_image(png, np.full((8, 8, 3), 0.5), 8)
    original = png.read_bytes()
    assert oracle.main(["run", weights, "--input", str(png), "-o", str(png)]) == 2     # its own input
    assert "input file" in capsys.readouterr().err and png.read_bytes() == original
    trace = tmp_path / "t.npz"
    assert oracle.main(["run", weights, "--shape", "1", "3", "8", "8", "-o", str(trace)]) == 0
    umask = os.umask(0)
    os.umask(umask)
    assert (trace.stat().st_mode & 0o777) == 0o666 & ~umask
    first = trace.read_bytes()
    assert oracle.main(["run", weights, "--shape", "1", "3", "8", "8", "--seed", "1", "-o", str(trace)]) == 2
    assert "exists" in capsys.readouterr().err and trace.read_bytes() == first
    assert oracle.main(["run", weights, "--shape", "1", "3", "8", "8", "--seed", "1", "-o", str(trace),
                        "--overwrite"]) == 0
    assert trace.read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.png", "t.npz"]


def test_compare_on_something_else_says_it_is_not_a_trace(tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    assert oracle.main(["compare", str(text), str(text)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {text} is not an oracle trace (.npz)"
