"""Gray photos: restored by a 1-channel model where the task has one, written back as they came.

The models here are small random-weight networks saved as converted files (torch-free); the
reference for each output is the same parameters run directly by `EAMamba` on the same input, so
these tests check the routing (which model, which channels, which output layout), not a network.
"""
import os

import numpy as np
import pytest

from eamamba_ref.apps import pipeline, restore, tasks
from eamamba_ref.io.checkpoint import save_converted
from eamamba_ref.io.config import ModelConfig
from eamamba_ref.io.images import Image, read_image, write_image
from eamamba_ref.runtime.model import EAMamba
from eamamba_ref.reference.parameters import init_params

ARGS = dict(dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, ffn_expansion_factor=2, bias=False,
            layernorm_type="WithBias", channel_mixer_type="Simple",
            mamba_cfg=dict(scan_type="diagonal", scan_count=8, scan_merge_method="concate", d_state=4,
                           d_conv=3, expand=1, conv_2d=True))


def _model_file(path, channels, seed, task="denoise"):
    cfg = ModelConfig.from_args("eamamba", dict(ARGS, inp_channels=channels, out_channels=channels))
    params = init_params(cfg, seed=seed)
    save_converted(path, cfg.name, cfg.to_args(), params, meta={"task": task})
    return EAMamba(cfg, params)


@pytest.fixture
def bundled(tmp_path, monkeypatch):
    """The denoise task's bundled colour and gray models, replaced by small random ones."""
    folder = tmp_path / "weights"
    folder.mkdir()
    colour = _model_file(folder / "denoise_demo.npz", 3, seed=1)
    gray = _model_file(folder / "denoise_gray_demo.npz", 1, seed=2)
    monkeypatch.setattr(tasks, "WEIGHTS_DIR", str(folder))
    return colour, gray


def _run(args, capsys):
    rc = restore.main(args)
    out, err = capsys.readouterr()
    return rc, out, err


def _gray_image(rng):
    return rng.random((16, 24, 1)).astype(np.float32)


def test_a_gray_png_goes_to_the_gray_model_and_comes_back_gray(tmp_path, bundled, capsys):
    colour, gray = bundled
    rng = np.random.default_rng(0)
    for bits in (8, 16):
        src = tmp_path / f"g{bits}.png"
        write_image(src, _gray_image(rng), bits)
        dst = tmp_path / f"g{bits}_out.png"
        rc, _, err = _run([str(src), "-o", str(dst)], capsys)
        assert rc == 0, err
        out = read_image(dst)
        assert out.pixels.shape == (16, 24, 1) and out.bit_depth == bits
        x = read_image(src).pixels.transpose(2, 0, 1)[None]
        ref = np.clip(gray(x)[0, 0], 0, 1)
        top = 255 if bits == 8 else 65535
        assert np.abs(out.pixels[..., 0] - ref).max() <= 0.5 / top + 1e-6      # one rounding to the file
        # and not what the colour model makes of (g, g, g)
        assert np.abs(out.pixels[..., 0] - np.clip(colour(np.repeat(x, 3, 1))[0].mean(0), 0, 1)).max() > 1e-3


def test_gray_with_alpha_keeps_its_alpha(tmp_path, bundled, capsys):
    _, gray = bundled
    rng = np.random.default_rng(1)
    src = tmp_path / "ga.png"
    alpha = (rng.random((16, 24)) * 255).astype(np.uint8)
    write_image(src, _gray_image(rng), 8, alpha=alpha)
    rc, _, err = _run([str(src), "-o", str(tmp_path / "ga_out.png")], capsys)
    assert rc == 0, err
    out = read_image(tmp_path / "ga_out.png")
    assert out.pixels.shape[2] == 1 and np.array_equal(out.alpha, alpha)
    x = read_image(src).pixels.transpose(2, 0, 1)[None]
    assert np.abs(out.pixels[..., 0] - np.clip(gray(x)[0, 0], 0, 1)).max() <= 0.5 / 255 + 1e-6


def test_rgb_with_three_equal_channels_is_restored_as_gray_and_says_so(tmp_path, bundled, capsys):
    _, gray = bundled
    g = _gray_image(np.random.default_rng(2))
    src = tmp_path / "rgb_gray.png"
    write_image(src, np.repeat(g, 3, axis=2), 8)
    rc, out, err = _run([str(src), "-o", str(tmp_path / "o.png")], capsys)
    assert rc == 0, err
    notes = [line for line in out.splitlines() if "restoring it as a gray image" in line]
    assert len(notes) == 1
    result = read_image(tmp_path / "o.png")
    assert result.pixels.shape[2] == 3                              # written as it came: RGB
    assert np.array_equal(result.pixels[..., 0], result.pixels[..., 1])
    assert np.array_equal(result.pixels[..., 0], result.pixels[..., 2])
    x = read_image(src).pixels[..., :1].transpose(2, 0, 1)[None]
    assert np.abs(result.pixels[..., 0] - np.clip(gray(x)[0, 0], 0, 1)).max() <= 0.5 / 255 + 1e-6


def test_a_colour_image_goes_to_the_colour_model(tmp_path, bundled, capsys):
    colour, _ = bundled
    rgb = np.random.default_rng(3).random((16, 24, 3)).astype(np.float32)
    src = tmp_path / "c.png"
    write_image(src, rgb, 8)
    rc, out, err = _run([str(src), "-o", str(tmp_path / "c_out.png")], capsys)
    assert rc == 0, err and "gray" not in out
    result = read_image(tmp_path / "c_out.png").pixels
    ref = np.clip(colour(read_image(src).pixels.transpose(2, 0, 1)[None])[0].transpose(1, 2, 0), 0, 1)
    assert np.abs(result - ref).max() <= 0.5 / 255 + 1e-6


def test_sigma_noise_on_a_gray_image_is_one_channel_of_noise(tmp_path, bundled):
    """--sigma adds noise to what the gray model reads: the image treated as gray first."""
    _, gray = bundled
    g = _gray_image(np.random.default_rng(4))
    image = Image(np.repeat(g, 3, axis=2), None, 8, "x.png")
    models = pipeline.TaskModels(tasks.TASKS["denoise"])
    out, _ = pipeline.restore_images(tasks.TASKS["denoise"], models, [image], sigma=25, seed=7)
    noisy = pipeline.add_noise(Image(g, None, 8), 25, 7).pixels
    ref = gray(noisy.transpose(2, 0, 1)[None])[0, 0]
    np.testing.assert_array_equal(out[..., 0], ref)
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_a_gray_model_refuses_a_colour_image_in_one_line(tmp_path, capsys):
    weights = tmp_path / "gray.npz"
    _model_file(weights, 1, seed=5)
    src = tmp_path / "c.png"
    write_image(src, np.random.default_rng(5).random((16, 24, 3)).astype(np.float32), 8)
    rc, _, err = _run([str(src), "--weights", str(weights), "-o", str(tmp_path / "o.png")], capsys)
    assert rc == 2
    assert err.strip().count("\n") == 0 and "gray (1-channel) model" in err and "colour image" in err
    assert not os.path.exists(tmp_path / "o.png")


def test_user_colour_weights_still_restore_gray_images(tmp_path, capsys):
    """Given colour weights (e.g. an official checkpoint), a gray image is fed as (g, g, g) and
    the output's channels averaged back to gray."""
    weights = tmp_path / "colour.npz"
    colour = _model_file(weights, 3, seed=6)
    src = tmp_path / "g.png"
    write_image(src, _gray_image(np.random.default_rng(6)), 8)
    rc, _, err = _run([str(src), "--weights", str(weights), "-o", str(tmp_path / "o.png")], capsys)
    assert rc == 0, err
    x = np.repeat(read_image(src).pixels.transpose(2, 0, 1)[None], 3, 1)
    ref = np.clip(colour(x)[0].mean(0), 0, 1)
    assert np.abs(read_image(tmp_path / "o.png").pixels[..., 0] - ref).max() <= 0.5 / 255 + 1e-6


def test_weights_recorded_for_another_task_are_refused_in_one_line(tmp_path, capsys):
    src = tmp_path / "c.png"
    write_image(src, np.random.default_rng(7).random((16, 24, 3)).astype(np.float32), 8)
    denoiser = tasks.TASKS["denoise"].bundled_path()
    rc, _, err = _run([str(src), "--task", "motion-deblur", "--weights", denoiser], capsys)
    assert rc == 2 and err.strip().count("\n") == 0
    assert "trained for task 'denoise', not 'motion-deblur'" in err
