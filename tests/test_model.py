"""The whole network (eamamba_ref.reference.model) against the PyTorch reference (eamamba_ref.pytorch).

The reference is an independent torch implementation of the official modules (same state-dict
names), itself checked against the official code; here it builds each configuration with the
official random initialisation, and the NumPy model runs on the very same weights.

Tolerance: relative error max|a - b| / max|b| <= 1e-4 on the output. Both sides compute in
float32; the difference is accumulation order (BLAS vs torch kernels, our scan vs the torch
scan), ~1e-6 per layer, growing through ~10-20 residual layers of tiny models.
"""
import numpy as np
import pytest

from eamamba_ref.io.config import ConfigError, ModelConfig
from eamamba_ref.runtime.model import EAMamba
from eamamba_ref.reference.parameters import init_params, parameter_shapes

torch = pytest.importorskip("torch")
torch_ref = pytest.importorskip("eamamba_ref.pytorch")


def rel_err(a, b):
    return float(np.max(np.abs(a.astype(np.float64) - b)) / np.max(np.abs(b)))


def tiny_args(**over):
    mamba = dict(scan_type="diagonal", scan_count=8, scan_merge_method="concate", disable_z_branch=False,
                 d_state=4, d_conv=3, expand=1, conv_2d=True)
    mamba.update(over.pop("mamba", {}))
    args = dict(inp_channels=3, out_channels=3, dim=16, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1,
                ffn_expansion_factor=2, bias=False, layernorm_type="WithBias", channel_mixer_type="Simple",
                mamba_cfg=mamba)
    args.update(over)
    return args


CASES = [
    ("eamamba", tiny_args(), (16, 24)),
    ("eamamba", tiny_args(mamba=dict(scan_type="hilbert", scan_count=4, scan_merge_method="add")), (16, 16)),
    ("eamamba", tiny_args(mamba=dict(scan_type="zigzag", scan_count=2, conv_2d=False, d_conv=4)), (24, 16)),
    ("eamamba", tiny_args(mamba=dict(scan_type=None, scan_count=4, disable_z_branch=True, expand=2)), (16, 16)),
    ("eamamba", tiny_args(channel_mixer_type="GDFN", layernorm_type="BiasFree", bias=True), (16, 16)),
    ("eamamba", tiny_args(channel_mixer_type="FFN"), (8, 8)),
    ("eamamba", tiny_args(channel_mixer_type="CCA"), (16, 8)),
    ("eamamba", tiny_args(dual_pixel_task=True, inp_channels=6), (16, 16)),
    ("eamambasr", dict(tiny_args(num_blocks=[1, 2]), upscale=2), (10, 12)),
    ("eamambasr", dict(tiny_args(num_blocks=[1]), upscale=3), (7, 9)),
    ("eamambasr", dict(tiny_args(num_blocks=[1], mamba=dict(d_state=10)), upscale=4), (8, 8)),
]


@pytest.mark.parametrize("name, args, size", CASES)
def test_numpy_model_matches_pytorch_reference(name, args, size):
    torch.manual_seed(0)
    ref = torch_ref.build_from_args(name, args).eval()
    sd = {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()}
    cfg = ModelConfig.from_args(name, args)
    assert {k: tuple(v.shape) for k, v in sd.items()} == parameter_shapes(cfg)
    model = EAMamba(cfg, sd)
    x = torch.rand(2, cfg.inp_channels, *size)
    with torch.no_grad():
        expected = ref(x).numpy()
    got = model(x.numpy())
    assert got.shape == expected.shape and got.dtype == np.float32
    assert rel_err(got, expected) <= 1e-4


def test_official_denoise_config_has_the_published_parameter_count():
    cfg = ModelConfig.from_args("eamamba", {"dim": 64, "num_blocks": [4, 6, 6, 7], "num_refinement_blocks": 2,
                                            "mamba_cfg": {"scan_type": "Diagonal", "scan_count": 8,
                                                          "scan_merge_method": "concate", "d_state": 16,
                                                          "d_conv": 3, "expand": 1, "conv_2d": True}})
    assert sum(int(np.prod(s)) for s in parameter_shapes(cfg).values()) == 25_320_512


def test_unet_rejects_sizes_not_divisible_by_8():
    cfg = ModelConfig.from_args("eamamba", tiny_args())
    model = EAMamba(cfg, init_params(cfg))
    with pytest.raises(ValueError, match="divisible by 8"):
        model(np.zeros((1, 3, 12, 16), np.float32))
    with pytest.raises(ValueError, match="input channels"):
        model(np.zeros((1, 1, 16, 16), np.float32))


@pytest.mark.parametrize("args, match", [
    (tiny_args(channel_mixer_type="MLP"), "channel_mixer_type"),
    (tiny_args(mamba=dict(scan_count=3)), "scan_count"),
    (tiny_args(mamba=dict(scan_type="spiral")), "scan_type"),
    (tiny_args(upscale=2), "EAMambaSR"),
    (tiny_args(dual_pixel_task=True), "inp_channels=6"),
    (tiny_args(dim=12, mamba=dict(scan_count=8)), "divisible by scan_count"),
])
def test_invalid_configs_raise_one_clear_error(args, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_args("eamamba", args)


def test_config_json_round_trip():
    cfg = ModelConfig.from_args("eamambasr", dict(tiny_args(num_blocks=[2, 2]), upscale=3))
    assert ModelConfig.from_json(cfg.to_json()) == cfg

