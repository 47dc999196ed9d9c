"""Tests of the PyTorch reference (eamamba_ref.pytorch), the oracle for the NumPy model.

Goldens come from independent sources: a float64 step-by-step loop written here from the
recurrence, hand-worked orderings, the numpy-hilbert-curve package, and the parameter count of the
released denoising model.
"""

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from eamamba_ref import pytorch as tr  # noqa: E402
from eamamba_ref.pytorch import scan as scans  # noqa: E402

FAST = settings(max_examples=25, deadline=None)

DENOISE_ARGS = {  # configs/denoise-eamamba.yaml, model.args
    "inp_channels": 3, "out_channels": 3, "dim": 64, "num_blocks": [4, 6, 6, 7],
    "num_refinement_blocks": 2, "ffn_expansion_factor": 2, "bias": False,
    "LayerNorm_type": "WithBias", "dual_pixel_task": False, "checkpoint_percentage": 0.0,
    "channel_mixer_type": "Simple",
    "mamba_cfg": {"scan_type": "diagonal", "scan_count": 8, "scan_merge_method": "concate",
                  "disable_z_branch": False, "d_state": 16, "d_conv": 3, "expand": 1, "conv_2d": True},
}


def tiny_args(**mamba):
    cfg = dict(DENOISE_ARGS["mamba_cfg"], d_state=4, **mamba)
    return dict(DENOISE_ARGS, dim=16, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, mamba_cfg=cfg)


# ----------------------------------------------------------------------------- selective scan

def naive_scan(u, delta, A, B, C, D, z, delta_bias, softplus):
    """Golden: the recurrence one channel and one step at a time, float64, grouped B/C (b, g, n, l)."""
    b, d, l = u.shape
    g = B.shape[1]
    out = torch.zeros(b, d, l, dtype=torch.float64)
    last = torch.zeros(b, d, A.shape[1], dtype=torch.float64)
    for bi in range(b):
        for di in range(d):
            grp = di // (d // g)
            h = torch.zeros(A.shape[1], dtype=torch.float64)
            for t in range(l):
                dt = delta[bi, di, t] + (0 if delta_bias is None else delta_bias[di])
                if softplus:
                    dt = dt if dt > 20 else math.log1p(math.exp(dt))
                h = torch.exp(dt * A[di]) * h + dt * B[bi, grp, :, t] * u[bi, di, t]
                y = (C[bi, grp, :, t] * h).sum() + (0 if D is None else D[di] * u[bi, di, t])
                if z is not None:
                    y = y * z[bi, di, t] * torch.sigmoid(z[bi, di, t])
                out[bi, di, t] = y
            last[bi, di] = h
    return out, last


def random_scan_inputs(seed, b, g, h, n, l, with_z=True, big_delta=False):
    gen = torch.Generator().manual_seed(seed)
    d = g * h

    def r(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float64)

    delta = r(b, d, l) * (15 if big_delta else 1)  # big: exercises the softplus threshold
    A = -torch.exp(r(d, n))
    return dict(u=r(b, d, l), delta=delta, A=A, B=r(b, g, n, l), C=r(b, g, n, l), D=r(d),
                z=r(b, d, l) if with_z else None, delta_bias=r(d))


@FAST
@given(b=st.integers(1, 2), g=st.integers(1, 3), h=st.integers(1, 3), n=st.integers(1, 4),
       l=st.integers(1, 40), chunk=st.integers(1, 17), seed=st.integers(0, 2**16),
       with_z=st.booleans(), big=st.booleans())
def test_chunked_equals_sequential_equals_naive(b, g, h, n, l, chunk, seed, with_z, big):
    x = random_scan_inputs(seed, b, g, h, n, l, with_z, big)
    want, want_last = naive_scan(**x, softplus=True)
    for mode, cs in (("sequential", None), ("chunked", chunk), ("chunked", None)):
        got, last = tr.selective_scan(**x, delta_softplus=True, return_last_state=True,
                                      mode=mode, chunk_size=cs)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(last, want_last, rtol=1e-10, atol=1e-10)


def test_scan_b_c_layouts_agree():
    # (b, n, l) means one group; (d, n) means constant over time, one "group" per channel.
    x = random_scan_inputs(3, b=2, g=1, h=5, n=3, l=23)
    ref = tr.selective_scan(**x, delta_softplus=True, mode="sequential")
    got = tr.selective_scan(**dict(x, B=x["B"][:, 0], C=x["C"][:, 0]), delta_softplus=True, chunk_size=4)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    Bc = torch.randn(5, 3, dtype=torch.float64)
    want = tr.selective_scan(**dict(x, B=Bc[None, :, :, None].expand(2, 5, 3, 23)), delta_softplus=True,
                             mode="sequential")
    got = tr.selective_scan(**dict(x, B=Bc), delta_softplus=True, chunk_size=5)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_scan_float32_close_to_float64_and_default_mode():
    x = random_scan_inputs(7, b=1, g=4, h=2, n=8, l=300)
    want = tr.selective_scan(**x, delta_softplus=True, mode="sequential")
    x32 = {k: (v.float() if v is not None else None) for k, v in x.items()}
    assert tr.get_scan_mode() == "chunked"
    got = tr.selective_scan(**x32, delta_softplus=True)
    assert got.dtype == torch.float32
    assert ((got.double() - want).abs().max() / want.abs().max()).item() < 1e-5


def test_scan_gradients_match_between_modes():
    x = random_scan_inputs(11, b=1, g=2, h=2, n=3, l=19)
    grads = []
    for mode in ("sequential", "chunked"):
        leaves = {k: v.clone().requires_grad_(True) for k, v in x.items() if v is not None}
        tr.selective_scan(**leaves, delta_softplus=True, mode=mode, chunk_size=4).square().sum().backward()
        grads.append({k: v.grad for k, v in leaves.items()})
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-10, atol=1e-10)


def test_scan_mode_setting_and_bad_inputs():
    x = random_scan_inputs(0, 1, 1, 2, 2, 5)
    tr.set_scan_mode("sequential")
    try:
        assert tr.get_scan_mode() == "sequential"
    finally:
        tr.set_scan_mode("chunked")
    with pytest.raises(ValueError, match="scan mode"):
        tr.set_scan_mode("parallel")
    with pytest.raises(ValueError, match="delta"):
        tr.selective_scan(**dict(x, delta=x["delta"][..., :3]))
    with pytest.raises(ValueError, match="B must"):
        tr.selective_scan(**dict(x, B=x["B"][..., :3]))
    with pytest.raises(ValueError, match="A must"):
        tr.selective_scan(**dict(x, A=x["A"][:1]))
    with pytest.raises(ValueError, match="chunk_size"):
        tr.selective_scan(**x, chunk_size=0)


def test_flush_denormals_restores_previous_state():
    def flushed():
        return (torch.tensor([1e-39], dtype=torch.float32) * 1.0).item() == 0.0

    before = flushed()
    with tr.flush_denormals():
        assert flushed()
    assert flushed() == before
    tr.selective_scan(**random_scan_inputs(0, 1, 1, 2, 2, 5))
    assert flushed() == before


# ----------------------------------------------------------------------------- orderings

def test_orderings_hand_worked():
    # 2 x 3 grid, pixels numbered 0 1 2 / 3 4 5.
    assert scans.diagonal_order(2, 3).tolist() == [0, 1, 3, 2, 4, 5]
    # 3 x 3: anti-diagonals alternate direction; with h = 3 the second one goes up (3 then 1).
    assert scans.zigzag_order(3, 3).tolist() == [0, 3, 1, 2, 4, 6, 7, 5, 8]
    # h = 2: the parity flips, the second anti-diagonal goes down (1 then 3).
    assert scans.zigzag_order(2, 3).tolist() == [0, 1, 3, 4, 2, 5]
    # A real Z curve on 4 x 4.
    assert scans.morton_order(4, 4).tolist() == [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]
    # Hilbert, first order (Skilling, row = most significant axis): index = row << 1 | (row ^ col),
    # so (0,0) (0,1) (1,1) (1,0) as (row, col) -- right, down, left.
    assert scans.hilbert_order(2, 2).tolist() == [0, 1, 3, 2]
    assert scans.hilbert_order(1, 1).tolist() == [0]
    assert scans.raster_order(2, 2).tolist() == [0, 1, 2, 3]


def test_hilbert_index_matches_numpy_hilbert_curve():
    hilbert = pytest.importorskip("hilbert")
    for bits in range(1, 6):
        side = 2 ** bits
        rows, cols = np.divmod(np.arange(side * side), side)
        want = hilbert.encode(np.stack([rows, cols], 1), 2, bits).astype(np.int64)
        assert np.array_equal(scans.hilbert_index(rows, cols, bits), want)


def test_hilbert_order_is_a_curve():
    # Consecutive pixels of a Hilbert order on a power-of-two square are 4-neighbours.
    order = scans.hilbert_order(16, 16)
    r, c = np.divmod(order, 16)
    assert np.all(np.abs(np.diff(r)) + np.abs(np.diff(c)) == 1)


def test_official_zorder_is_not_morton_but_a_permutation():
    # The official bit spread is mis-masked: on 8 x 8 only 52 distinct codes (see scan.py).
    codes = scans._official_zorder_code(np.arange(8))
    assert len(set((codes[:, None] | (codes[None, :] << 1)).ravel().tolist())) == 52
    order = scans.zorder_order(8, 8)
    assert sorted(order.tolist()) == list(range(64))
    assert order.tolist() != scans.morton_order(8, 8).tolist()


def test_diagonal_heads_start_at_the_documented_corners():
    h, w = 4, 5
    o = scans.direction_orders("diagonal", 8, h, w)
    rc = [divmod(int(v), w) for v in o[:, 0]]
    # heads 0-3: top-left, bottom-right, top-right, bottom-left; 4-7: raster, reversed, column-major, reversed.
    assert rc == [(0, 0), (h - 1, w - 1), (0, w - 1), (h - 1, 0), (0, 0), (h - 1, w - 1), (0, 0), (h - 1, w - 1)]
    assert o[4].tolist() == list(range(h * w))
    assert o[6].tolist() == np.arange(h * w).reshape(h, w).T.ravel().tolist()
    # An odd head is the ordering of the 180-degree-rotated grid. For the diagonal order that
    # happens to equal reading head 0 backwards; for Hilbert it does not.
    assert o[1].tolist() == o[0][::-1].tolist()
    hil = scans.direction_orders("hilbert", 2, 4, 4)
    assert hil[1].tolist() == (15 - scans.hilbert_order(4, 4)).tolist()
    assert hil[1].tolist() != hil[0][::-1].tolist()


@FAST
@given(scan_type=st.sampled_from(scans.SCAN_TYPES), K=st.sampled_from(scans.SCAN_COUNTS),
       merge=st.sampled_from(scans.MERGE_METHODS), h=st.integers(1, 9), w=st.integers(1, 9),
       seed=st.integers(0, 1000))
def test_scan_transform_is_permutation_and_restore_inverts(scan_type, K, merge, h, w, seed):
    orders = scans.direction_orders(scan_type, K, h, w)
    assert orders.shape == (K, h * w)
    for row in orders:
        assert sorted(row.tolist()) == list(range(h * w))
    T = tr.ScanTransform(scan_type, K, merge)
    C = 2 * K
    x = torch.randn(2, C, h * w, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    seqs = T.apply(x, (h, w))
    assert seqs.shape == ((2, K, C, h * w) if merge == "add" else (2, K, 2, h * w))
    back = T.restore(seqs, (h, w))
    torch.testing.assert_close(back, x * (K if merge == "add" else 1), rtol=1e-12, atol=1e-12)
    # Head k really reads x in order orders[k].
    k = K - 1
    src = x if merge == "add" else x[:, k * C // K:(k + 1) * C // K]
    torch.testing.assert_close(seqs[:, k], src[:, :, torch.from_numpy(orders[k])])


def test_scan_transform_bad_arguments():
    with pytest.raises(ValueError, match="scan_type"):
        tr.ScanTransform("spiral", 2, "add")
    with pytest.raises(ValueError, match="scan_count"):
        tr.ScanTransform("diagonal", 3, "add")
    with pytest.raises(ValueError, match="merge"):
        tr.ScanTransform("diagonal", 2, "mean")
    with pytest.raises(ValueError, match="divisible"):
        tr.ScanTransform("diagonal", 4, "concate").apply(torch.zeros(1, 6, 4), (2, 2))
    with pytest.raises(ValueError, match="grid size"):
        scans.diagonal_order(0, 3)


# ----------------------------------------------------------------------------- modules and models

def test_official_denoise_parameter_count_and_names():
    with torch.device("meta"):
        model = tr.build_from_args("eamamba", DENOISE_ARGS)
    assert sum(p.numel() for p in model.parameters()) == 25_320_512
    sd = model.state_dict()
    expect = {
        "patch_embed.proj.weight": (64, 3, 3, 3),
        "encoder_level1.0.norm1.body.weight": (64,),
        "encoder_level1.0.norm1.body.bias": (64,),
        "encoder_level1.0.mamba.in_proj.weight": (128, 64),
        "encoder_level1.0.mamba.conv.weight": (64, 1, 3, 3),
        "encoder_level1.0.mamba.conv.bias": (64,),
        "encoder_level1.0.mamba.x_proj_weight": (8, 4 + 32, 8),
        "encoder_level1.0.mamba.dt_projs_weight": (8, 8, 4),
        "encoder_level1.0.mamba.dt_projs_bias": (8, 8),
        "encoder_level1.0.mamba.A_logs": (64, 16),
        "encoder_level1.0.mamba.Ds": (64,),
        "encoder_level1.0.mamba.out_norm.weight": (64,),
        "encoder_level1.0.mamba.out_proj.weight": (64, 64),
        "encoder_level1.0.ffn.project_in.weight": (128, 64, 1, 1),
        "encoder_level1.0.ffn.project_out.weight": (64, 64, 1, 1),
        "down1_2.body.0.weight": (32, 64, 3, 3),
        "latent.6.mamba.x_proj_weight": (8, 32 + 32, 64),
        "up4_3.body.0.weight": (1024, 512, 3, 3),
        "reduce_chan_level3.weight": (256, 512, 1, 1),
        "decoder_level1.3.mamba.in_proj.weight": (256, 128),
        "refinement.1.ffn.project_out.weight": (128, 128, 1, 1),
        "output.weight": (3, 128, 3, 3),
    }
    for k, shape in expect.items():
        assert tuple(sd[k].shape) == shape, k
    assert not any(k.startswith("upsample") or k.startswith("skip_conv") for k in sd)


def test_mamba_init_follows_the_official_recipe():
    torch.manual_seed(0)
    m = tr.ExtendedMamba(32, tr.ScanTransform("diagonal", 4, "concate"), d_state=6, expand=1, conv_2d=True, d_conv=3)
    assert torch.equal(m.A_logs, torch.log(torch.arange(1.0, 7.0)).repeat(32, 1))
    assert torch.equal(m.Ds, torch.ones(32))
    dt = torch.nn.functional.softplus(m.dt_projs_bias)
    assert dt.shape == (4, 8) and dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    assert m.dt_projs_weight.abs().max() <= 2 ** -0.5  # dt_rank = ceil(32 / 16) = 2
    assert m.x_proj_weight.shape == (4, 2 + 12, 8)


def test_layernorm_types():
    x = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    ln = tr.LayerNorm(5, "WithBias").double()
    y = ln(x)
    torch.testing.assert_close(y.mean(1), torch.zeros(2, 3, 4, dtype=torch.float64), atol=1e-12, rtol=0)
    want = torch.nn.functional.layer_norm(x.permute(0, 2, 3, 1), (5,), eps=1e-5).permute(0, 3, 1, 2)
    torch.testing.assert_close(y, want)
    bf = tr.LayerNorm(5, "BiasFree").double()
    assert bf.body.bias is None
    torch.testing.assert_close(bf(x), x / torch.sqrt(x.var(1, keepdim=True, unbiased=False) + 1e-5))


@pytest.mark.parametrize("mamba", [
    {},
    {"scan_type": "hilbert", "scan_count": 4, "scan_merge_method": "add", "conv_2d": False, "d_conv": 4},
    {"scan_type": None, "scan_count": 2, "disable_z_branch": True, "expand": 2},
])
def test_eamamba_forward_shape_and_finite(mamba):
    torch.manual_seed(0)
    model = tr.build_from_args("eamamba", tiny_args(**mamba)).eval()
    x = torch.rand(1, 3, 16, 24)
    with torch.no_grad():
        y = model(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert not torch.allclose(y, x)


def test_float64_model_is_a_float64_golden_for_the_float32_one():
    torch.manual_seed(1)
    model = tr.build_from_args("eamamba", tiny_args(scan_type="zigzag", scan_count=4)).eval()
    x = torch.rand(1, 3, 8, 8)  # small: float64 convolutions take PyTorch's slow path
    with torch.no_grad():
        y32 = model(x)
        y64 = model.double()(x.double())
    assert y64.dtype == torch.float64
    assert ((y32.double() - y64).abs().max() / y64.abs().max()).item() < 1e-5


@pytest.mark.parametrize("scale", [1, 2, 3, 4])
def test_sr_output_shape(scale):
    args = dict(dim=8, num_blocks=[1], ffn_expansion_factor=1, upscale=scale,
                mamba_cfg=dict(DENOISE_ARGS["mamba_cfg"], d_state=4))
    model = tr.build_from_args("EAMambaSR", args).eval()
    with torch.no_grad():
        y = model(torch.rand(2, 3, 5, 7))
    assert y.shape == (2, 3, 5 * scale, 7 * scale)
    assert sum(k.startswith("upsample.") and k.endswith(".weight") for k in model.state_dict()) == \
        {1: 0, 2: 1, 3: 1, 4: 2}[scale]


def test_dual_pixel_task_has_skip_conv_and_six_inputs():
    model = tr.EAMamba(**dict(tiny_args(), inp_channels=6, dual_pixel_task=True)).eval()
    assert model.skip_conv.weight.shape == (32, 16, 1, 1)
    with torch.no_grad():
        assert model(torch.rand(1, 6, 8, 16)).shape == (1, 3, 8, 16)


def test_model_bad_configurations():
    with pytest.raises(ValueError, match="upscale"):
        tr.EAMamba(**dict(tiny_args(), upscale=2))
    with pytest.raises(ValueError, match="upscale"):
        tr.EAMambaSR(dim=8, num_blocks=[1], upscale=5)
    with pytest.raises(ValueError, match="channel_mixer_type"):
        tr.EAMamba(**dict(tiny_args(), channel_mixer_type="MLP"))
    with pytest.raises(ValueError, match="layernorm_type"):
        tr.EAMamba(**dict(tiny_args(), layernorm_type="RMS"))
    with pytest.raises(ValueError, match="odd d_conv"):
        tr.EAMamba(**tiny_args(d_conv=4))
    with pytest.raises(ValueError, match="even"):
        tr.EAMamba(**dict(tiny_args(scan_merge_method="add"), ffn_expansion_factor=1.5, dim=6))
    with pytest.raises(ValueError, match="model name"):
        tr.build_from_args("restormer", {})
    model = tr.EAMamba(**tiny_args())
    with pytest.raises(ValueError, match="divisible by 8"):
        model(torch.rand(1, 3, 12, 16))
    with pytest.raises(ValueError, match="expects"):
        model(torch.rand(1, 4, 16, 16))


def test_official_checkpoint_roundtrip(tmp_path):
    torch.manual_seed(0)
    args = tiny_args()
    model = tr.build_from_args("eamamba", args).eval()
    ema = {k: v + 0.01 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    path = tmp_path / "ckpt.pth"
    tr.save_official_checkpoint(model, path, "eamamba", args, ema_state_dict=ema, current_iter=300)

    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert set(ckpt) == {"model", "optimizer", "current_iter", "state"}
    assert ckpt["model"]["name"] == "eamamba" and ckpt["model"]["args"] == args
    assert ckpt["current_iter"] == 300 and ckpt["state"].dtype == torch.uint8
    assert ckpt["optimizer"]["name"] == "AdamW" and ckpt["optimizer"]["args"]["lr"] == 3e-4
    opt_sd = ckpt["optimizer"]["sd"]
    assert len(opt_sd["state"]) == len(list(model.parameters()))
    assert set(opt_sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    torch.testing.assert_close(ckpt["model"]["sd"]["output.weight"], model.output.weight.detach())
    torch.testing.assert_close(ckpt["model"]["sd_e"]["output.weight"], ema["output.weight"])

    loaded = tr.load_official_checkpoint(path)            # EMA weights, like the official test.py
    x = torch.rand(1, 3, 8, 8 * 2)
    model.load_state_dict(ema)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_load_drops_the_unusable_upsample_head(tmp_path):
    # An official EAMamba built at its default upscale=2 carries upsample.0.* weights it never uses.
    model = tr.build_from_args("eamamba", tiny_args())
    sd = dict(model.state_dict(), **{"upsample.0.weight": torch.zeros(12, 3, 3, 3),
                                     "upsample.0.bias": torch.zeros(12)})
    path = tmp_path / "official.pth"
    torch.save({"model": {"name": "eamamba", "args": tiny_args(), "sd": sd, "sd_e": sd}}, path)
    loaded = tr.load_official_checkpoint(path, use_ema=False)
    assert not hasattr(loaded, "upsample")
