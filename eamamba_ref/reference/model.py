"""EAMamba (U-Net, every restoration task) and EAMambaSR (lightweight super-resolution), forward passes.

Official source: models/eamamba.py of daidaijr/EAMamba. Parameters are one flat dict keyed by the
official state-dict names (`encoder_level1.0.mamba.in_proj.weight`), so a name grepped from a
checkpoint leads straight to the line that uses it. Activations are `(B, C, H, W)` float32.

U-Net (dim c; levels run at c, 2c, 4c and the latent at 8c):

    x (B, 3, H, W) -> patch_embed 3x3 -> encoder_level1 (c) -> down1_2 -> encoder_level2 (2c)
      -> down2_3 -> encoder_level3 (4c) -> down3_4 -> latent (8c)
      -> up4_3, concat enc3, reduce_chan_level3 1x1 -> decoder_level3 (4c)
      -> up3_2, concat enc2, reduce_chan_level2 1x1 -> decoder_level2 (2c)
      -> up2_1, concat enc1 (no reduction)          -> decoder_level1 (2c) -> refinement (2c)
      -> output 3x3 -> + x
"""
from __future__ import annotations

import numpy as np

from eamamba_ref.runtime import ops, threads as runtime, backends as ssm
from eamamba_ref.runtime.allocator import reuse_freed_memory
from eamamba_ref.io.config import ModelConfig
from eamamba_ref.reference.mhssm import mhssm, mhssm_parameter_shapes
from eamamba_ref.runtime.trace import traced


def sub(params, prefix):
    """The parameters under `prefix.`, with the prefix stripped."""
    n = len(prefix) + 1
    return {k[n:]: v for k, v in params.items() if k.startswith(prefix + ".")}


def _named(a):
    """The module name a layer function was called with (its trace name)."""
    return a["name"]


@traced(_named)
def conv(p, name, x, padding=None, groups=1):
    """Conv2d `name` of `p` on `(B, C, H, W)`; 'same' padding unless given; bias if the dict has one."""
    w = p[name + ".weight"]
    pad = (w.shape[-1] - 1) // 2 if padding is None else padding
    return ops.conv2d(x, w, p.get(name + ".bias"), padding=pad, groups=groups)


@traced(_named)
def norm(p, name, x, backend=None):
    """The blocks' LayerNorm over channels; WithBias if the dict holds `name.body.bias`, else BiasFree."""
    return ops.layer_norm_channels(x, p[name + ".body.weight"], p.get(name + ".body.bias"), backend=backend)


# ------------------------------------------------------------------------- channel mixers
@traced("ffn", scope="ffn")
def channel_mixer(p, x, kind):
    """The block's feed-forward part on `(B, C, H, W)`. kind: simple | gdfn | ffn | cca."""
    if kind == "simple":                  # 1x1 to C*f, SimpleGate (halves multiplied), 1x1 back
        def simple_gate_ffn(x):
            h = conv(p, "project_in", x)
            half = h.shape[1] // 2
            return conv(p, "project_out", h[:, :half] * h[:, half:])
        return ops.by_row_strips(simple_gate_ffn, x)     # per pixel: strips bound the memory
    if kind == "gdfn":                    # Restormer's gated-dconv FFN
        h = conv(p, "project_in", x)
        h = conv(p, "dwconv", h, groups=h.shape[1])
        half = h.shape[1] // 2
        return conv(p, "project_out", ops.gelu(h[:, :half]) * h[:, half:])
    if kind == "ffn":
        return ops.by_row_strips(lambda x: conv(p, "project_out", ops.gelu(conv(p, "project_in", x))), x)
    if kind == "cca":                     # 1x1, depthwise 3x3, channel attention, 1x1
        h = conv(p, "conv2", conv(p, "conv1", x), groups=x.shape[1])
        return conv(p, "conv3", h * channel_attention(p, h))
    raise ValueError(f"unknown channel mixer {kind!r}")


# the CCA mixer's nn.Sequential `ca` (pool, 1x1, ReLU, 1x1, sigmoid): its modules' trace names
_ca_pool = traced("ca.0")(ops.adaptive_avg_pool_1)
_ca_relu = traced("ca.2")(ops.relu)


@traced(("ca", "ca.4"))
def channel_attention(p, h):
    """The CCA mixer's channel weights: `(B, C, H, W)` -> `(B, C, 1, 1)` in (0, 1)."""
    return ops.sigmoid(conv(p, "ca.3", _ca_relu(conv(p, "ca.1", _ca_pool(h)))))


# ------------------------------------------------------------------------------ blocks
def block(p, x, cfg, backend=None):
    """MambaFormerBlock: x + MHSSM(LN(x)), then + FFN(LN(x)). x: `(B, C, H, W)`."""
    B, C, H, W = x.shape
    tokens = norm(p, "norm1", x, backend).reshape(B, C, H * W)
    mixed = mhssm(sub(p, "mamba"), tokens, (H, W), cfg.mamba, backend)     # (B, C, L)
    x = x + mixed.reshape(B, C, H, W)
    del tokens, mixed                     # full-resolution maps: free them before the FFN's peak
    return x + channel_mixer(sub(p, "ffn"), norm(p, "norm2", x, backend), cfg.channel_mixer_type)


@traced(_named, scope=_named)
def named_block(params, name, x, cfg, backend=None):
    """`block` with the parameters under `name.` (traced as the official module `name`)."""
    return block(sub(params, name), x, cfg, backend)


@traced(lambda a: a["prefix"])
def blocks(params, prefix, count, x, cfg, backend=None):
    """`count` blocks in sequence (an official nn.Sequential named `prefix`)."""
    for i in range(count):
        x = named_block(params, f"{prefix}.{i}", x, cfg, backend)
    return x


# ------------------------------------------------------------------------------ models
def eamamba(params, cfg, x, backend=None):
    """The EAMamba U-Net. x: `(B, inp_channels, H, W)`, H and W multiples of 8 -> `(B, out, H, W)`."""
    B, _, H, W = x.shape
    if H % 8 or W % 8:
        raise ValueError(f"EAMamba needs H and W divisible by 8 (three 2x downsamplings), got "
                         f"{H}x{W}; pad the image first (the restore command does)")
    n1, n2, n3, n4 = cfg.num_blocks
    P = params
    enc1_in = patch_embed(P, x)
    enc1 = blocks(P, "encoder_level1", n1, enc1_in, cfg, backend)
    enc2 = blocks(P, "encoder_level2", n2, downsample(P, "down1_2", enc1), cfg, backend)
    enc3 = blocks(P, "encoder_level3", n3, downsample(P, "down2_3", enc2), cfg, backend)
    latent = blocks(P, "latent", n4, downsample(P, "down3_4", enc3), cfg, backend)

    dec3 = ops.concatenate([upsample(P, "up4_3", latent), enc3], axis=1)
    dec3 = blocks(P, "decoder_level3", n3, conv(P, "reduce_chan_level3", dec3), cfg, backend)
    dec2 = ops.concatenate([upsample(P, "up3_2", dec3), enc2], axis=1)
    dec2 = blocks(P, "decoder_level2", n2, conv(P, "reduce_chan_level2", dec2), cfg, backend)
    dec1 = ops.concatenate([upsample(P, "up2_1", dec2), enc1], axis=1)
    dec1 = blocks(P, "decoder_level1", n1, dec1, cfg, backend)       # stays at 2c: no reduction
    dec1 = blocks(P, "refinement", cfg.num_refinement_blocks, dec1, cfg, backend)

    if cfg.dual_pixel_task:             # defocus deblurring: skip from the embedding, no residual
        return conv(P, "output", dec1 + conv(P, "skip_conv", enc1_in))
    return conv(P, "output", dec1) + x                                # + the input (residual)


@traced("patch_embed")
def patch_embed(params, x):
    """OverlapPatchEmbed: a 3x3 conv (`patch_embed.proj`)."""
    return conv(params, "patch_embed.proj", x)


def _sequential_names(a):
    """An official nn.Sequential(conv, shuffle) `name`: its output is also `name.body`, `name.body.1`."""
    return a["name"], f"{a['name']}.body", f"{a['name']}.body.1"


@traced(_sequential_names)
def downsample(params, name, x):
    """Downsample `name`: 3x3 conv to C/2 (`name.body.0`), PixelUnshuffle(2). `(B, C, H, W)` ->
    `(B, 2C, H/2, W/2)`."""
    return ops.pixel_unshuffle(conv(params, f"{name}.body.0", x), 2)


@traced(_sequential_names)
def upsample(params, name, x):
    """Upsample `name`: 3x3 conv to 2C (`name.body.0`), PixelShuffle(2). `(B, C, H, W)` ->
    `(B, C/2, 2H, 2W)`."""
    return ops.pixel_shuffle(conv(params, f"{name}.body.0", x), 2)


@traced(lambda a: a["prefix"])
def upscale(params, prefix, x, scale):
    """Official `Upscale`: (conv 3x3 to 4C + PixelShuffle(2)) per factor 2, or conv to 9C + shuffle(3)."""
    steps = [2] * (scale.bit_length() - 1) if scale & (scale - 1) == 0 else [3]
    for i, r in enumerate(steps):
        x = shuffle(f"{prefix}.{2 * i + 1}", conv(params, f"{prefix}.{2 * i}", x), r)
    return x


@traced(_named)
def shuffle(name, x, r):
    """PixelShuffle(r) (the official module `name`)."""
    return ops.pixel_shuffle(x, r)


@traced(lambda a: f"layers.{a['index']}")
def residual_group(params, index, count, x, cfg, backend=None):
    """EAMambaSR's ResidualGroup `layers.index`: `count` blocks, a 3x3 conv, plus the group input."""
    features = blocks(params, f"layers.{index}.blocks", count, x, cfg, backend)
    return conv(params, f"layers.{index}.conv", features) + x


@traced(("conv_before_upsample", "conv_before_upsample.1"))
def conv_before_upsample(params, x):
    """nn.Sequential(3x3 conv, LeakyReLU(0.01)) `conv_before_upsample`."""
    return ops.leaky_relu(conv(params, "conv_before_upsample.0", x), 0.01)


def eamamba_sr(params, cfg, x, backend=None):
    """EAMambaSR. x: `(B, inp_channels, H, W)` (any H, W) -> `(B, out, s*H, s*W)`, s = upscale."""
    P = params
    x = conv(P, "conv_first", x)
    features = x
    for i, count in enumerate(cfg.num_blocks):     # residual groups
        features = residual_group(P, i, count, features, cfg, backend)
    x = conv(P, "conv_after_body", norm(P, "norm", features, backend)) + x
    x = conv_before_upsample(P, x)
    return conv(P, "conv_last", upscale(P, "upsample", x, cfg.upscale))


# -------------------------------------------------------------------- parameter shapes
def _block_shapes(prefix, dim, cfg):
    f = cfg.ffn_expansion_factor
    bias = cfg.bias
    shapes = {f"{prefix}.norm1.body.weight": (dim,), f"{prefix}.norm2.body.weight": (dim,)}
    if cfg.layernorm_type == "WithBias":
        shapes[f"{prefix}.norm1.body.bias"] = (dim,)
        shapes[f"{prefix}.norm2.body.bias"] = (dim,)
    for name, shape in mhssm_parameter_shapes(dim, cfg.mamba).items():
        shapes[f"{prefix}.mamba.{name}"] = shape
    convs = {   # name -> (out, in_per_group, k)
        "simple": {"project_in": (int(dim * f), dim, 1), "project_out": (dim, int(dim * f) // 2, 1)},
        "gdfn": {"project_in": (2 * int(dim * f), dim, 1), "dwconv": (2 * int(dim * f), 1, 3),
                 "project_out": (dim, int(dim * f), 1)},
        "ffn": {"project_in": (int(dim * f), dim, 1), "project_out": (dim, int(dim * f), 1)},
        "cca": {"conv1": (dim, dim, 1), "conv2": (dim, 1, 3), "ca.1": (dim, dim, 1),
                "ca.3": (dim, dim, 1), "conv3": (dim, dim, 1)},
    }[cfg.channel_mixer_type]
    for name, (o, i, k) in convs.items():
        shapes[f"{prefix}.ffn.{name}.weight"] = (o, i, k, k)
        if bias:
            shapes[f"{prefix}.ffn.{name}.bias"] = (o,)
    return shapes


def _conv_shape(shapes, name, out, inp, k, bias):
    shapes[f"{name}.weight"] = (out, inp, k, k)
    if bias:
        shapes[f"{name}.bias"] = (out,)


def parameter_shapes(cfg: ModelConfig):
    """Every official state-dict name of the model -> its shape, in the official order."""
    c = cfg.dim
    shapes = {}
    if cfg.name == "eamamba":
        _conv_shape(shapes, "patch_embed.proj", c, cfg.inp_channels, 3, False)
        widths = {"encoder_level1": c, "encoder_level2": 2 * c, "encoder_level3": 4 * c, "latent": 8 * c}
        counts = dict(zip(widths, cfg.num_blocks))

        def add_blocks(prefix, n, dim):
            for i in range(n):
                shapes.update(_block_shapes(f"{prefix}.{i}", dim, cfg))

        add_blocks("encoder_level1", counts["encoder_level1"], c)
        _conv_shape(shapes, "down1_2.body.0", c // 2, c, 3, False)
        add_blocks("encoder_level2", counts["encoder_level2"], 2 * c)
        _conv_shape(shapes, "down2_3.body.0", c, 2 * c, 3, False)
        add_blocks("encoder_level3", counts["encoder_level3"], 4 * c)
        _conv_shape(shapes, "down3_4.body.0", 2 * c, 4 * c, 3, False)
        add_blocks("latent", counts["latent"], 8 * c)
        _conv_shape(shapes, "up4_3.body.0", 16 * c, 8 * c, 3, False)
        _conv_shape(shapes, "reduce_chan_level3", 4 * c, 8 * c, 1, cfg.bias)
        add_blocks("decoder_level3", counts["encoder_level3"], 4 * c)
        _conv_shape(shapes, "up3_2.body.0", 8 * c, 4 * c, 3, False)
        _conv_shape(shapes, "reduce_chan_level2", 2 * c, 4 * c, 1, cfg.bias)
        add_blocks("decoder_level2", counts["encoder_level2"], 2 * c)
        _conv_shape(shapes, "up2_1.body.0", 4 * c, 2 * c, 3, False)
        add_blocks("decoder_level1", counts["encoder_level1"], 2 * c)
        add_blocks("refinement", cfg.num_refinement_blocks, 2 * c)
        if cfg.dual_pixel_task:
            _conv_shape(shapes, "skip_conv", 2 * c, c, 1, cfg.bias)
        _conv_shape(shapes, "output", cfg.out_channels, 2 * c, 3, cfg.bias)
        return shapes

    _conv_shape(shapes, "conv_first", c, cfg.inp_channels, 3, cfg.bias)
    for g, n in enumerate(cfg.num_blocks):
        for i in range(n):
            shapes.update(_block_shapes(f"layers.{g}.blocks.{i}", c, cfg))
        _conv_shape(shapes, f"layers.{g}.conv", c, c, 3, True)
    shapes["norm.body.weight"] = (c,)
    if cfg.layernorm_type == "WithBias":
        shapes["norm.body.bias"] = (c,)
    _conv_shape(shapes, "conv_after_body", c, c, 3, cfg.bias)
    _conv_shape(shapes, "conv_before_upsample.0", c, c, 3, True)
    s = cfg.upscale
    steps = [2] * (s.bit_length() - 1) if s & (s - 1) == 0 else [3]
    for i, r in enumerate(steps):
        _conv_shape(shapes, f"upsample.{2 * i}", r * r * c, c, 3, True)
    _conv_shape(shapes, "conv_last", cfg.out_channels, c, 3, cfg.bias)
    return shapes


def init_params(cfg: ModelConfig, seed=0):
    """Random parameters shaped like the official model (for tests, benchmarks and demos).

    Weights ~ N(0, 1/fan_in) scaled down, norms at identity, and the SSM parameters initialised as
    the official code does (A_log = log(1..N) per channel, D = 1, dt bias = softplus^-1 of dt drawn
    log-uniformly in [1e-3, 1e-1]) so that activations and scan dynamics look like a real model's.
    """
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in parameter_shapes(cfg).items():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "A_logs":
            value = np.log(np.broadcast_to(np.arange(1, shape[1] + 1, dtype=np.float32), shape))
        elif leaf == "Ds":
            value = np.ones(shape)
        elif leaf == "dt_projs_bias":
            dt = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), shape)).clip(min=1e-4)
            value = dt + np.log(-np.expm1(-dt))
        elif name.endswith(".body.weight") or name.endswith("out_norm.weight"):   # LayerNorms
            value = np.ones(shape)
        elif name.endswith(".body.bias") or name.endswith("out_norm.bias") or leaf == "bias":
            value = np.zeros(shape) if "norm" in name else rng.uniform(-0.02, 0.02, shape)
        else:
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
            value = rng.standard_normal(shape) / np.sqrt(fan_in)
        params[name] = np.ascontiguousarray(value, dtype=np.float32)
    return params


class EAMamba:
    """A ready model: config + parameters; `model(x)` runs the forward pass.

    x: float32 `(B, C, H, W)` NumPy array; returns `(B, out_channels, H', W')` as NumPy. `backend`
    picks the selective-scan kernel ('numpy', 'numba'; None = the process default) or, with
    'cuda', runs the whole network on the GPU: the parameters are uploaded once, the input once,
    and every layer reads and writes device memory (`eamamba_ref.kernels.cuda`) until the result comes back.
    """

    def __init__(self, config: ModelConfig, params: dict, backend=None):
        self.config = config.validate()
        self.params = params
        self.backend = backend
        self._device_params = None

    def __call__(self, x):
        x = np.asarray(x)
        cfg = self.config
        if x.ndim != 4:
            raise ValueError(f"input must be (B, C, H, W), got shape {x.shape}")
        if x.shape[1] != cfg.inp_channels:
            raise ValueError(f"this model takes {cfg.inp_channels} input channels, got {x.shape[1]}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        forward = eamamba if cfg.name == "eamamba" else eamamba_sr
        backend = ssm.resolve_backend(self.backend)
        if backend == "cuda":
            from eamamba_ref.kernels.cuda import DeviceTensor
            if self._device_params is None:
                self._device_params = {k: DeviceTensor.from_host(v) for k, v in self.params.items()}
            return forward(self._device_params, cfg, DeviceTensor.from_host(x), "cuda").to_host()
        # threads owned by `runtime` (BLAS on one, GEMM blocks on its pool: same bits for any count);
        # no page faults for the large temporaries (allocator.py)
        with runtime.forward_threads(), reuse_freed_memory():
            return forward(self.params, cfg, x, self.backend)

    @property
    def num_params(self):
        return int(sum(v.size for v in self.params.values()))

    def __repr__(self):
        m = self.config.mamba
        return (f"EAMamba({self.config.name}, dim={self.config.dim}, blocks={list(self.config.num_blocks)}, "
                f"scan={m.scan_type or 'raster'}x{m.scan_count} {m.scan_merge_method}, "
                f"d_state={m.d_state}, params={self.num_params:,})")
