"""The oracle: named activations of the NumPy model and of the PyTorch reference agree layer by layer,
and a planted error is reported at the layer where it was planted. Tracing records the code that
runs: the fused MHSSM kernels of the default backend stay on while recording, give the same stage
names as the plain composition and the PyTorch reference, and leave the output bitwise unchanged."""
import os

import numpy as np
import pytest

from eamamba_ref.apps import oracle
from eamamba_ref.reference import hooks, layers
from eamamba_ref.reference.ops import NUMPY
from eamamba_ref.runtime import trace
from eamamba_ref.kernels.cpu import fused, scan, strips
from eamamba_ref.apps.tasks import WEIGHTS_DIR
from eamamba_ref.io.checkpoint import save_converted
from eamamba_ref.io.config import ModelConfig
from eamamba_ref.io.loading import load
from eamamba_ref.reference.parameters import init_params

ARGS = dict(dim=16, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1,
            mamba_cfg=dict(scan_type="diagonal", scan_count=8, scan_merge_method="concate", d_state=4,
                           d_conv=3, expand=1, conv_2d=True))


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    cfg = ModelConfig.from_args("eamamba", ARGS)
    path = tmp_path_factory.mktemp("o") / "w.npz"
    save_converted(path, cfg.name, cfg.to_args(), init_params(cfg, seed=3))
    return str(path)


MHSSM_STAGES = ["in_proj", "conv", "act", "all_around", "x_proj", "dt_proj", "selective_scan", "restore",
                "out_norm", "gate", "out_proj"]
DENOISER_BLOCKS = ["encoder_level1.0", "encoder_level2.0", "encoder_level3.0", "latent.0", "decoder_level3.0",
                   "decoder_level2.0", "decoder_level1.0", "refinement.0"]


def x():
    return np.random.default_rng(0).random((1, 3, 16, 16), dtype=np.float32)


def test_numpy_trace_names_every_stage(weights):
    values = oracle.trace_numpy(load(weights), x())
    names = list(values)
    assert names[0] == "patch_embed.proj" and names[-1] == "result"
    for stage in MHSSM_STAGES:
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


# ------------------------------------------------------------------ the trace of the code that runs
@pytest.fixture(scope="module")
def denoiser():
    """The bundled demo denoiser (dim 16, one block per level, diagonal x8 'concate', d_state 8)."""
    return load(os.path.join(WEIGHTS_DIR, "denoise_demo.npz"))


def denoiser_input():
    return np.random.default_rng(1).random((1, 3, 32, 24), dtype=np.float32)


def test_tracing_runs_the_fused_kernels_and_keeps_the_output_bitwise(denoiser, monkeypatch):
    calls = []
    original = fused.directional_scan
    monkeypatch.setattr(fused, "directional_scan", lambda *a, **k: calls.append(1) or original(*a, **k))

    def plain_scan(*args, **kwargs):
        raise AssertionError("the plain composition's selective scan ran")
    monkeypatch.setattr(scan, "selective_scan", plain_scan)      # the scan of the plain composition

    denoiser.backend = "numba"                                   # binds the table now: with plain_scan
    untraced = denoiser(denoiser_input())
    n_untraced = len(calls)
    values = oracle.trace_numpy(denoiser, denoiser_input())
    assert n_untraced == len(DENOISER_BLOCKS) and len(calls) == 2 * n_untraced
    assert np.array_equal(values["result"], untraced)
    assert values["result"].dtype == np.float32 and not any(np.isnan(v).any() for v in values.values())


def test_default_path_trace_matches_the_torch_reference(denoiser):
    pytest.importorskip("torch")
    denoiser.backend = "numba"
    ours = oracle.trace_numpy(denoiser, denoiser_input())
    ref = oracle.trace_torch(oracle._torch_model(denoiser), denoiser_input())
    only_ref, only_ours = oracle.unmatched(ref, ours)
    union = len(ref) + len(only_ours)
    assert (union - len(only_ref) - len(only_ours)) / union >= 0.95, (only_ref, only_ours)
    for block in DENOISER_BLOCKS:
        for stage in MHSSM_STAGES:
            assert f"{block}.mamba.{stage}" in ref and f"{block}.mamba.{stage}" in ours
    first, rows = oracle.compare(ref, ours, tol=1e-4)            # docs/numerics.md: 1e-4 for a network
    assert first is None, [r for r in rows if r[0] == first]


def test_fused_and_plain_traces_name_the_same_stages_and_agree(denoiser):
    denoiser.backend = "numba"
    fused_trace = oracle.trace_numpy(denoiser, denoiser_input())
    denoiser.backend = "numpy"
    plain_trace = oracle.trace_numpy(denoiser, denoiser_input())
    denoiser.backend = "numba"
    assert list(fused_trace) == list(plain_trace)                 # same names, same forward order
    first, rows = oracle.compare(plain_trace, fused_trace, tol=1e-5)
    assert first is None, [r for r in rows if r[0] == first]
    # stages that are pure data movement in the fused kernel are the plain path's exactly
    for stage in ["in_proj", "all_around"]:
        name = f"encoder_level1.0.mamba.{stage}"
        np.testing.assert_allclose(fused_trace[name], plain_trace[name], rtol=0, atol=1e-6)


def test_a_stage_computed_in_row_strips_is_recorded_whole():
    """The 'numba' FFN runs in row strips; its trace holds whole maps assembled from them."""
    rng = np.random.default_rng(2)
    p = {"project_in.weight": rng.standard_normal((5, 3, 1, 1)).astype(np.float32),
         "project_out.weight": rng.standard_normal((3, 5, 1, 1)).astype(np.float32)}
    x = rng.standard_normal((2, 3, 7, 4)).astype(np.float32)
    with trace.recording() as rec:
        out = strips.channel_mixer(p, x, "ffn", NUMPY, pixels=8)  # strips of 2 rows: 4 calls
    hidden = layers.conv2d(x, p["project_in.weight"])
    np.testing.assert_allclose(rec.values["ffn.project_in"], hidden, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out, layers.conv2d(layers.gelu(hidden), p["project_out.weight"]),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(rec.values["ffn"], out)


def test_traced_records_hooks_scopes_and_parts_in_order():
    @hooks.traced("inner")
    def inner(v):
        return v + 1

    @hooks.traced(lambda a: (a["name"], a["name"] + ".alias"), scope=lambda a: a["name"],
                  before=lambda a: {"pre": a["v"] * 10}, after=lambda a, r: {"post": r - 100},
                  view=lambda r: -r)
    def outer(name, v):
        v[...] = 0                              # overwrites its input: `before` saw it first
        return inner(v) * 3

    @hooks.traced(after=lambda a, r: {"halves": hooks.Part(r, (slice(a["i"], a["i"] + 1),), (3,))})
    def half(i):
        return np.float32(i + 0.5)

    v = np.full(2, 2.0, np.float32)
    assert not hooks.is_recording()
    with trace.recording() as rec:
        assert hooks.is_recording()
        assert np.array_equal(outer("blk", v), [3, 3])
        half(0)
        half(2)
    assert list(rec.values) == ["pre", "blk.inner", "post", "blk", "blk.alias", "halves"]
    assert rec.values["pre"].tolist() == [20, 20] and rec.values["blk.inner"].tolist() == [1, 1]
    assert rec.values["post"].tolist() == [-97, -97] and rec.values["blk"].tolist() == [-3, -3]
    assert rec.values["halves"][0] == 0.5 and np.isnan(rec.values["halves"][1]) and rec.values["halves"][2] == 2.5
    assert np.array_equal(outer("blk", np.ones(2, np.float32)), [3, 3])    # not recording: plain call


def test_compare_reports_names_found_in_one_file_only(tmp_path, capsys):
    a = {"x": np.ones(3, np.float32), "only_a": np.zeros(1, np.float32)}
    b = {"x": np.ones(3, np.float32), "only_b1": np.zeros(1, np.float32), "only_b2": np.zeros(1, np.float32)}
    assert oracle.unmatched(a, b) == (["only_a"], ["only_b1", "only_b2"])
    pa, pb = tmp_path / "a.npz", tmp_path / "b.npz"
    oracle.save_trace(pa, a)
    oracle.save_trace(pb, b)
    assert oracle.main(["compare", str(pa), str(pb)]) == 0
    out = capsys.readouterr().out
    assert f"only in {pa}: 1 name (only_a)" in out
    assert f"only in {pb}: 2 names (only_b1, only_b2)" in out
    assert "agree: 1 common activations" in out


def test_run_never_overwrites_and_writes_ordinary_files(weights, tmp_path, capsys):
    import os

    from eamamba_ref.io.images import write_image
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
