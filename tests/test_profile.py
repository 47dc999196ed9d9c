"""The analytic FLOPs/params profiler (eamamba_ref.apps.profile).

Golden values: parameter counts from `model.parameter_shapes` (the official state-dict shapes,
themselves checked against the torch reference in test_model.py), hand-worked MAC counts of small
layers, and the paper's headline numbers (25.3 M / 137 G for the 8-direction 'concate' MHSSM at
256 x 256, 31.1 M / 286 G for the 'add' merge).
"""
import json

import numpy as np
import pytest

from eamamba_ref.apps import profile as P
from eamamba_ref.io.config import ConfigError, ModelConfig
from eamamba_ref.reference.parameters import parameter_shapes


def tiny_args(**over):
    mamba = dict(scan_type="diagonal", scan_count=8, scan_merge_method="concate", disable_z_branch=False,
                 d_state=4, d_conv=3, expand=1, conv_2d=True)
    mamba.update(over.pop("mamba", {}))
    args = dict(inp_channels=3, out_channels=3, dim=16, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1,
                ffn_expansion_factor=2, bias=False, layernorm_type="WithBias", channel_mixer_type="Simple",
                mamba_cfg=mamba)
    args.update(over)
    return args


CONFIGS = [
    ("eamamba", tiny_args()),
    ("eamamba", tiny_args(mamba=dict(scan_merge_method="add", scan_count=4, scan_type="hilbert"))),
    ("eamamba", tiny_args(mamba=dict(conv_2d=False, d_conv=4, expand=2, disable_z_branch=True, dt_rank=3,
                                     bias=True, conv_bias=False))),
    ("eamamba", tiny_args(channel_mixer_type="GDFN", layernorm_type="BiasFree", bias=True)),
    ("eamamba", tiny_args(channel_mixer_type="FFN", ffn_expansion_factor=2.66)),
    ("eamamba", tiny_args(channel_mixer_type="CCA", bias=True)),
    ("eamamba", tiny_args(dual_pixel_task=True, inp_channels=6)),
    ("eamambasr", dict(tiny_args(num_blocks=[1, 2]), upscale=2)),
    ("eamambasr", dict(tiny_args(num_blocks=[1]), upscale=3)),
    ("eamambasr", dict(tiny_args(num_blocks=[2], bias=True), upscale=8)),
]


def n_params(shapes, prefix=""):
    return sum(int(np.prod(s)) for k, s in shapes.items() if k.startswith(prefix))


@pytest.mark.parametrize("name, args", CONFIGS)
def test_parameter_counts_match_the_state_dict_shapes(name, args):
    cfg = ModelConfig.from_args(name, args)
    shapes = parameter_shapes(cfg)
    prof = P.profile(cfg, 16, 24)
    assert prof.params == n_params(shapes)
    # ... and block by block: every op is named by the state-dict prefix of its parameters
    block_prefixes = {".".join(op.name.split(".")[:4 if cfg.name == "eamambasr" else 2]) + "."
                      for op in prof.ops if ".mamba." in op.name}
    for prefix in block_prefixes:
        assert sum(op.params for op in prof.ops if op.name.startswith(prefix)) == n_params(shapes, prefix)


def test_presets_match_the_published_parameter_counts():
    assert P.profile(P.resolve_config("denoise"), 256).params == 25_320_512
    for preset in ("sr2-light", "sr3-light", "sr4-light"):
        cfg = P.resolve_config(preset)
        assert P.profile(cfg, 64).params == n_params(parameter_shapes(cfg))


def test_mhssm_macs_hand_worked():
    """The latent block of the dim-16 model at 32 x 32: C = d = 128, K = 8 heads of C' = 16,
    N = 4, R = ceil(128 / 16) = 8, on a 4 x 4 map (L = 16)."""
    cfg = ModelConfig.from_args("eamamba", tiny_args())
    ops = {op.name.split(".")[-1]: op for op in P.model_ops(cfg, 32, 32)
           if op.name.startswith("latent.0.mamba.")}            # latent: dim 128 on 4x4
    C, d, K, Cp, N, R, L = 128, 128, 8, 16, 4, 8, 16
    assert ops["in_proj"].macs == 2 * d * C * L
    assert ops["conv"].macs == d * 9 * L
    assert ops["x_proj"].macs == K * (R + 2 * N) * Cp * L
    assert ops["dt_proj"].macs == K * Cp * R * L
    assert ops["selective_scan"].macs == 9 * d * L * N + d * L          # fvcore's estimate
    assert ops["out_norm"].macs == 5 * d * L                             # nn.LayerNorm with affine
    assert ops["out_proj"].macs == C * d * L
    assert ops["selective_scan"].params == d * N + d                     # A_logs, Ds
    assert ops["dt_proj"].params == K * Cp * R + K * Cp                  # weights and bias


def test_conv_macs_and_flops_hand_worked():
    cfg = P.resolve_config("denoise")
    ops = {op.name: op for op in P.model_ops(cfg, 256, 256, batch=2)}
    down = ops["down1_2.body.0"]                                         # 3x3, 64 -> 32, 256 x 256
    assert down.macs == 2 * 32 * 64 * 9 * 256 * 256
    assert down.flops == 2 * down.macs                                   # no bias: 2 per multiply-add
    assert down.params == 32 * 64 * 9
    ffn_in = ops["encoder_level1.0.ffn.project_in"]                      # 1x1, 64 -> 128
    assert ffn_in.macs == 2 * 128 * 64 * 256 * 256
    # what fvcore does not count costs nothing in the paper's convention, but FLOPs here
    for op in ops.values():
        if op.kind in ("norm", "elementwise"):
            assert op.macs == 0 and op.flops > 0


def test_paper_headline_concate_vs_add():
    cfg = P.resolve_config("denoise")
    concate = P.profile(cfg, 256)
    add = P.profile(P.with_mhssm(cfg, scan_merge_method="add"), 256)
    single = P.profile(P.with_mhssm(cfg, scan_count=1), 256)
    assert round(concate.params / 1e6, 1) == 25.3
    assert round(concate.macs / 1e9, 1) == 137.3
    assert round(add.params / 1e6, 1) == 31.1
    assert round(add.macs / 1e9) == 286
    # the 8 'concate' heads cost exactly what one scan over all channels costs
    scan = lambda p: sum(op.macs for op in p.ops if op.kind == "scan")  # noqa: E731
    assert scan(concate) == scan(single) and concate.macs == single.macs
    assert scan(add) == 8 * scan(concate)


def test_costs_scale_with_pixels_and_batch():
    cfg = P.resolve_config("denoise")
    small, big = P.profile(cfg, 64), P.profile(cfg, 128)
    assert big.macs == 4 * small.macs and big.flops == 4 * small.flops and big.params == small.params
    assert P.profile(cfg, 64, batch=3).macs == 3 * small.macs
    assert P.profile(cfg, 64, 128).macs == 2 * small.macs


def test_bad_sizes_and_configs_raise_value_errors():
    cfg = P.resolve_config("denoise")
    with pytest.raises(ValueError, match="divisible by 8"):
        P.profile(cfg, 60)
    with pytest.raises(ValueError, match="positive integer"):
        P.profile(cfg, 0)
    with pytest.raises(ConfigError, match="neither a preset"):
        P.resolve_config("no-such-model")


def test_config_from_official_yaml_json_and_checkpoint(tmp_path):
    yaml_text = """
model:
  name: eamamba
  args:
    inp_channels: 3
    out_channels: 3
    dim: 64
    num_blocks: [4, 6, 6, 7]
    num_refinement_blocks: 2
    ffn_expansion_factor: 2
    bias: False
    LayerNorm_type: 'WithBias'
    dual_pixel_task: False
    channel_mixer_type: 'Simple'
    mamba_cfg:
      scan_type: 'diagonal'
      scan_count: 8
      scan_merge_method: 'concate'
      disable_z_branch: False
      d_state: 16
      d_conv: 3
      expand: 1
      conv_2d: True
"""
    pytest.importorskip("yaml")
    path = tmp_path / "denoise-eamamba.yaml"
    path.write_text(yaml_text)
    assert P.resolve_config(str(path)) == P.resolve_config("denoise")

    tiny = ModelConfig.from_args("eamamba", tiny_args())
    jpath = tmp_path / "tiny.json"
    jpath.write_text(tiny.to_json())
    assert P.resolve_config(str(jpath)) == tiny

    from eamamba_ref.io.checkpoint import save_converted
    from eamamba_ref.reference.parameters import init_params
    npz = tmp_path / "tiny.npz"
    save_converted(str(npz), tiny.name, tiny.to_args(), init_params(tiny))
    assert P.resolve_config(str(npz)) == tiny


def test_cli_prints_the_table_and_the_merge_comparison(capsys):
    assert P.main(["--config", "denoise", "--size", "256"]) == 0
    out = capsys.readouterr().out
    total = [line for line in out.splitlines() if line.startswith("total")][0]
    assert "25.321 M" in total and "137.27 G" in total
    assert "add (2D-SSM style)" in out and "31.112 M" in out and "285.59 G" in out

    assert P.main(["--config", "denoise", "--var"]) == 0
    out = capsys.readouterr().out
    assert "1024x1024" in out and "32x32" in out

    assert P.main(["--config", "sr2-light", "--size", "48", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["input"] == [1, 3, 48, 48] and data["params"] == sum(v["params"] for v in data["by_kind"].values())

    assert P.main(["--config", "denoise", "--size", "100"]) == 2
    assert "divisible by 8" in capsys.readouterr().err
