"""From official checkpoints to outputs: `eamamba_ref.load` and `python -m eamamba_ref.convert`.

Checkpoints are written by the PyTorch reference in the official format (torch.save of
{'model': {'name', 'args', 'sd', 'sd_e'}, 'optimizer', 'current_iter', 'state'}); the expected
outputs are the reference's forward pass on the EMA weights, as the official test script does.
Tolerance as in test_model.py: relative error <= 1e-4.
"""
import numpy as np
import pytest

from eamamba_ref.apps import convert
from eamamba_ref.io.checkpoint import CheckpointError, load_converted
from eamamba_ref.io.config import ModelConfig
from eamamba_ref.io.loading import infer_config, load

torch = pytest.importorskip("torch")
torch_ref = pytest.importorskip("eamamba_ref.pytorch")

ARGS = dict(inp_channels=3, out_channels=3, dim=16, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1,
            ffn_expansion_factor=2, bias=False, LayerNorm_type="WithBias", channel_mixer_type="Simple",
            checkpoint_percentage=0.0,
            mamba_cfg=dict(scan_type="Diagonal", scan_count=8, scan_merge_method="concate",
                           disable_z_branch=False, d_state=4, d_conv=3, expand=1, conv_2d=True))
SR_ARGS = dict(ARGS, num_blocks=[1, 1], upscale=2, ffn_expansion_factor=1)


def rel_err(a, b):
    return float(np.max(np.abs(a.astype(np.float64) - b)) / np.max(np.abs(b)))


def official_checkpoint(tmp_path, name="eamamba", args=ARGS, seed=0):
    """An official-format checkpoint whose EMA weights differ from its raw weights."""
    torch.manual_seed(seed)
    raw = torch_ref.build_from_args(name, args).eval()
    ema = torch_ref.build_from_args(name, args).eval()
    path = tmp_path / f"{name}.pth"
    torch_ref.save_official_checkpoint(raw, path, name, args, ema_state_dict=ema.state_dict())
    return path, raw, ema


@pytest.mark.parametrize("name, args, shape", [("eamamba", ARGS, (1, 3, 16, 24)),
                                               ("eamambasr", SR_ARGS, (1, 3, 9, 11))])
def test_official_checkpoint_reproduces_reference_output(tmp_path, name, args, shape):
    path, raw, ema = official_checkpoint(tmp_path, name, args)
    x = torch.rand(*shape)
    with torch.no_grad():
        want_ema, want_raw = ema(x).numpy(), raw(x).numpy()
    got_ema = load(path)(x.numpy())                    # default: EMA weights, as the official test.py
    got_raw = load(path, weights="raw")(x.numpy())
    assert rel_err(got_ema, want_ema) <= 1e-4
    assert rel_err(got_raw, want_raw) <= 1e-4
    assert rel_err(got_ema, want_raw) > 1e-2           # the two weight sets really differ


def test_convert_cli_round_trip(tmp_path, capsys):
    path, _, ema = official_checkpoint(tmp_path)
    out = tmp_path / "model.npz"
    assert convert.main([str(path), str(out)]) == 0
    report = capsys.readouterr().out
    assert "eamamba (dim 16" in report and "diagonal x8" in report and "ema" in report
    assert f"{sum(p.numel() for p in ema.parameters()):,}" in report
    x = torch.rand(1, 3, 8, 16)
    with torch.no_grad():
        want = ema(x).numpy()
    assert rel_err(load(out)(x.numpy()), want) <= 1e-4
    assert load_converted(out).meta["weights"] == "ema"
    # never overwrites without being asked
    before = out.read_bytes()
    assert convert.main([str(path), str(out)]) == 2
    assert "exists" in capsys.readouterr().err and out.read_bytes() == before


@pytest.mark.parametrize("name, args", [
    ("eamamba", ARGS),
    ("eamamba", dict(ARGS, channel_mixer_type="GDFN", LayerNorm_type="BiasFree", bias=True,
                     mamba_cfg=dict(ARGS["mamba_cfg"], scan_count=4, scan_merge_method="add", expand=2,
                                    conv_2d=False, d_conv=4, disable_z_branch=True))),
    ("eamamba", dict(ARGS, dual_pixel_task=True, inp_channels=6, channel_mixer_type="CCA")),
    ("eamambasr", dict(SR_ARGS, upscale=3, channel_mixer_type="FFN")),
    ("eamambasr", dict(SR_ARGS, upscale=4)),
])
def test_bare_state_dict_architecture_is_inferred(tmp_path, name, args):
    torch.manual_seed(0)
    model = torch_ref.build_from_args(name, args)
    path = tmp_path / "bare.pth"
    torch.save(model.state_dict(), path)
    expected = ModelConfig.from_args(name, args)
    # LayerNorm_type is ignored by the official constructor (it reads layernorm_type): WithBias
    assert infer_config(load(path).params) == expected
    loaded, info = load(path, return_info=True)
    assert loaded.config == expected and info["kind"] == "bare state dict"


def test_unusable_upsample_of_the_official_default_is_ignored(tmp_path):
    torch.manual_seed(0)
    model = torch_ref.build_from_args("eamamba", ARGS)
    sd = dict(model.state_dict())
    sd["upsample.0.weight"] = torch.zeros(12, 3, 3, 3)      # what upscale=2 (the default) builds
    sd["upsample.0.bias"] = torch.zeros(12)
    path = tmp_path / "with_upsample.pth"
    torch.save({"model": {"name": "eamamba", "args": ARGS, "sd": sd, "sd_e": sd}}, path)
    loaded, info = load(path, return_info=True)
    assert any("upsample" in note for note in info["notes"])
    assert "upsample.0.weight" not in loaded.params


def test_checkpoint_of_another_architecture_is_one_clear_error(tmp_path):
    torch.manual_seed(0)
    model = torch_ref.build_from_args("eamamba", ARGS)
    path = tmp_path / "mismatch.pth"
    # args claim d_state 8 but the weights were made with d_state 4
    wrong = dict(ARGS, mamba_cfg=dict(ARGS["mamba_cfg"], d_state=8))
    torch_ref.save_official_checkpoint(model, path, "eamamba", wrong)
    with pytest.raises(CheckpointError, match="shape") as err:
        load(path)
    assert "\n" not in str(err.value)
    # a checkpoint of a different network altogether
    other = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 64)}, other)
    with pytest.raises(CheckpointError, match="not an EAMamba"):
        load(other)


def test_partial_mamba_cfg_means_the_official_defaults(tmp_path):
    # mamba_cfg keys left out take ExtendedMamba's defaults (d_conv 4, 1-D conv, expand 2, d_state 16)
    args = dict(ARGS, mamba_cfg=dict(scan_type="hilbert", scan_count=4, scan_merge_method="add"))
    path, _, ema = official_checkpoint(tmp_path, "eamamba", args)
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        want = ema(x).numpy()
    model = load(path)
    m = model.config.mamba
    assert (m.d_conv, m.conv_2d, m.expand, m.d_state) == (4, False, 2, 16)
    assert rel_err(model(x.numpy()), want) <= 1e-4
