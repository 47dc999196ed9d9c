"""Weights files without torch: any channel count, the task a file records, and the convert command's
handling of its output (never replaces a file without --overwrite, never the input, atomic, umask).

Checkpoints are written with tests/pth_files.py (torch-free writers of the official .pth layout)
and `save_converted`; the reference for a loaded model is the same parameters given to `EAMamba`.
"""
import os
import stat

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pth_files import ARGS, T, official, write_pth

from eamamba_ref.apps import convert
from eamamba_ref.io.checkpoint import CheckpointError, load_converted, save_converted
from eamamba_ref.io.config import ConfigError, ModelConfig
from eamamba_ref.io.loading import infer_config, load
from eamamba_ref.runtime.model import EAMamba
from eamamba_ref.reference.parameters import init_params
from eamamba_ref.apps.tasks import TASKS, TaskMismatchError, check_task

GRAY = dict(ARGS, inp_channels=1, out_channels=1)


# ----------------------------------------------------------------------------------------------------
# Channels: nothing in loading assumes RGB (a 1-channel gray denoiser, as 'denoise_gray' will ship)


@pytest.mark.parametrize("kind", ["converted", "official", "bare"])
def test_one_channel_model_loads_and_runs(tmp_path, kind):
    cfg = ModelConfig.from_args("eamamba", GRAY)
    params = init_params(cfg, seed=3)
    if kind == "converted":
        path = tmp_path / "gray.npz"
        save_converted(path, cfg.name, cfg.to_args(), params, meta={"task": "denoise_gray"})
    else:
        sd = {k: T(v) for k, v in params.items()}
        path = write_pth(tmp_path / "gray.pth", official(args=GRAY, sd=sd) if kind == "official" else sd)
    model, info = load(path, return_info=True)
    assert model.config.inp_channels == 1 and model.config.out_channels == 1
    if kind == "bare":
        assert infer_config(params) == model.config
    x = np.random.default_rng(0).random((1, 1, 16, 24), dtype=np.float32)
    y = model(x)
    assert y.shape == (1, 1, 16, 24)
    np.testing.assert_array_equal(y, EAMamba(cfg, params)(x))      # same weights, same network
    assert check_task(info["meta"], "denoise_gray") == ("denoise_gray" if kind == "converted" else None)


# ----------------------------------------------------------------------------------------------------
# Tasks recorded in weights files


@pytest.mark.parametrize("task", [t for t in TASKS.values() if t.bundled])
def test_bundled_weights_record_their_task(task):
    model, info = load(task.bundled_path(), return_info=True)
    assert info["meta"]["task"] == task.name
    assert check_task(info["meta"], task) == task.name
    other = next(t for t in TASKS.values() if t.name != task.name)
    with pytest.raises(TaskMismatchError, match=f"trained for task '{task.name}', not '{other.name}'") as err:
        check_task(info["meta"], other)
    assert isinstance(err.value, CheckpointError) and "\n" not in str(err.value)


def test_check_task_without_a_record_and_with_a_malformed_one():
    assert check_task(None, "motion-deblur") is None                  # official checkpoints record none
    assert check_task({"source": "x.pth"}, TASKS["derain"]) is None
    with pytest.raises(TaskMismatchError, match="not a name"):
        check_task({"task": ["denoise"]}, "denoise")


def test_convert_records_and_checks_the_task(tmp_path, capsys):
    cfg = ModelConfig.from_args("eamamba", ARGS)
    source = write_pth(tmp_path / "ck.pth", official())
    first = tmp_path / "a.npz"
    assert convert.main([source, str(first), "--task", "motion-deblur"]) == 0
    assert "task         : motion-deblur" in capsys.readouterr().out
    assert load_converted(first).meta["task"] == "motion-deblur"
    # re-converting a converted file keeps its task; asking for another one is refused
    assert convert.main([str(first), str(tmp_path / "b.npz")]) == 0
    assert load_converted(tmp_path / "b.npz").meta["task"] == "motion-deblur"
    capsys.readouterr()
    assert convert.main([str(first), str(tmp_path / "c.npz"), "--task", "denoise"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "trained for task 'motion-deblur', not 'denoise'" in err
    assert not (tmp_path / "c.npz").exists()
    assert load(first).config == cfg


# ----------------------------------------------------------------------------------------------------
# The convert command's output file


@pytest.fixture
def source(tmp_path):
    return write_pth(tmp_path / "ck.pth", official())


def test_convert_never_overwrites_without_the_flag(tmp_path, source, capsys):
    out = tmp_path / "m.npz"
    out.write_bytes(b"precious")
    assert convert.main([source, str(out)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {out} exists; pass --overwrite to replace it\n"     # the CLI flag, one line
    assert out.read_bytes() == b"precious"
    assert convert.main([source, str(out), "--overwrite"]) == 0
    assert load_converted(out).name == "eamamba"
    assert sorted(os.listdir(tmp_path)) == ["ck.pth", "m.npz"]                # no temporary files left


def test_convert_never_writes_over_its_input(tmp_path, source, capsys):
    before = open(source, "rb").read()
    link = tmp_path / "link.pth"
    os.symlink(source, link)
    for out in (source, str(link)):
        assert convert.main([source, out, "--overwrite"]) == 2
        assert "is the input file" in capsys.readouterr().err
    assert open(source, "rb").read() == before


@pytest.mark.parametrize("out, match", [("missing/m.npz", "output folder .*missing does not exist"),
                                        (".", "is a folder")])
def test_convert_bad_output_paths(tmp_path, source, capsys, out, match):
    import re
    assert convert.main([source, str(tmp_path / out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(match, err)


def test_convert_is_atomic(tmp_path, source, monkeypatch, capsys):
    """A write that fails half-way leaves the old file as it was and no temporary file behind."""
    out = tmp_path / "m.npz"
    assert convert.main([source, str(out)]) == 0
    before = out.read_bytes()
    calls = []

    def failing_write(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise OSError(28, "No space left on device")
        return real_write(*args, **kwargs)
    real_write = np.lib.format.write_array
    monkeypatch.setattr(np.lib.format, "write_array", failing_write)
    assert convert.main([source, str(out), "--overwrite"]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert out.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["ck.pth", "m.npz"]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_convert_output_has_the_umask_permissions(tmp_path, source, umask):
    old = os.umask(umask)
    try:
        out = tmp_path / "m.npz"
        assert convert.main([source, str(out)]) == 0
        assert convert.main([source, str(out), "--overwrite"]) == 0     # replaced: still the umask's
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o666 & ~umask


# ----------------------------------------------------------------------------------------------------
# Config types: any wrong type is one ConfigError line, never a TypeError from deep inside

JUNK = st.one_of(st.none(), st.text(max_size=8), st.lists(st.integers(), max_size=3),
                 st.dictionaries(st.text(max_size=3), st.integers(), max_size=2), st.floats(allow_nan=True),
                 st.booleans(), st.integers(-10**30, 10**30))
FIELDS = ["inp_channels", "out_channels", "dim", "num_blocks", "num_refinement_blocks", "ffn_expansion_factor",
          "bias", "layernorm_type", "channel_mixer_type", "dual_pixel_task", "mamba_cfg"]
MAMBA = ["scan_type", "scan_count", "scan_merge_method", "disable_z_branch", "d_state", "d_conv", "expand",
         "conv_2d", "dt_rank", "conv_bias", "bias"]


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(FIELDS + ["mamba_cfg." + f for f in MAMBA]), JUNK)
def test_property_any_field_value_gives_a_config_or_one_line_error(field, value):
    args = dict(GRAY, mamba_cfg=dict(GRAY["mamba_cfg"]))
    if field.startswith("mamba_cfg."):
        args["mamba_cfg"][field[len("mamba_cfg."):]] = value
    else:
        args[field] = value
    try:
        cfg = ModelConfig.from_args("eamamba", args)
    except ConfigError as err:
        assert "\n" not in str(err) and len(str(err)) < 500
    else:                                  # accepted: then it is a config the model can be built from
        assert cfg.validate() is cfg and cfg.dim <= 1024 and max(cfg.num_blocks) <= 64


def test_config_limits_name_the_field():
    for change, match in [(dict(num_blocks=[100_000_000, 0, 0, 0]), "blocks per level 100000000"),
                          (dict(dim=4096), "dim 4096 is outside"),
                          (dict(inp_channels=0), "inp_channels 0 is outside"),
                          (dict(mamba_cfg=dict(ARGS["mamba_cfg"], d_state=10**6)), "d_state 1000000"),
                          (dict(ffn_expansion_factor=float("nan")), "ffn_expansion_factor must be a number"),
                          (dict(num_blocks=list(range(1000))), "num_blocks must be a short list")]:
        with pytest.raises(ConfigError, match=match):
            ModelConfig.from_args("eamamba", dict(ARGS, **change))
    with pytest.raises(ConfigError, match="args must be a dict"):
        ModelConfig.from_args("eamamba", [1, 2])
