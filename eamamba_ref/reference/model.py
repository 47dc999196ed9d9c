"""EAMamba (U-Net, every restoration task) and EAMambaSR (lightweight super-resolution), forward passes.

Official source: models/eamamba.py of daidaijr/EAMamba. Parameters are one flat dict keyed by the
official state-dict names (`encoder_level1.0.mamba.in_proj.weight`), so a name grepped from a
checkpoint leads straight to the line that uses it. Activations are `(B, C, H, W)` float32.
Every function takes `ops`, the table of functions the forward pass calls (`reference.ops`): with
`reference.ops.NUMPY` this file runs exactly the NumPy code of this folder.

U-Net (dim c; levels run at c, 2c, 4c and the latent at 8c):

    x (B, 3, H, W) -> patch_embed 3x3 -> encoder_level1 (c) -> down1_2 -> encoder_level2 (2c)
      -> down2_3 -> encoder_level3 (4c) -> down3_4 -> latent (8c)
      -> up4_3, concat enc3, reduce_chan_level3 1x1 -> decoder_level3 (4c)
      -> up3_2, concat enc2, reduce_chan_level2 1x1 -> decoder_level2 (2c)
      -> up2_1, concat enc1 (no reduction)          -> decoder_level1 (2c) -> refinement (2c)
      -> output 3x3 -> + x
"""
from __future__ import annotations

from eamamba_ref.reference.hooks import traced


def sub(params, prefix):
    """The parameters under `prefix.`, with the prefix stripped."""
    n = len(prefix) + 1
    return {k[n:]: v for k, v in params.items() if k.startswith(prefix + ".")}


def _named(a):
    """The module name a layer function was called with (its trace name)."""
    return a["name"]


@traced(_named)
def conv(p, name, x, ops, padding=None, groups=1):
    """Conv2d `name` of `p` on `(B, C, H, W)`; 'same' padding unless given; bias if the dict has one."""
    w = p[name + ".weight"]
    pad = (w.shape[-1] - 1) // 2 if padding is None else padding
    return ops.conv2d(x, w, p.get(name + ".bias"), padding=pad, groups=groups)


@traced(_named)
def norm(p, name, x, ops):
    """The blocks' LayerNorm over channels; WithBias if the dict holds `name.body.bias`, else BiasFree."""
    return ops.layer_norm_channels(x, p[name + ".body.weight"], p.get(name + ".body.bias"))


# ------------------------------------------------------------------------- channel mixers
@traced("ffn", scope="ffn")
def channel_mixer(p, x, kind, ops):
    """The block's feed-forward part on `(B, C, H, W)`. kind: simple | gdfn | ffn | cca."""
    if kind == "simple":                  # 1x1 to C*f, SimpleGate (halves multiplied), 1x1 back
        h = conv(p, "project_in", x, ops)
        half = h.shape[1] // 2
        return conv(p, "project_out", h[:, :half] * h[:, half:], ops)
    if kind == "gdfn":                    # Restormer's gated-dconv FFN
        h = conv(p, "project_in", x, ops)
        h = conv(p, "dwconv", h, ops, groups=h.shape[1])
        half = h.shape[1] // 2
        return conv(p, "project_out", ops.gelu(h[:, :half]) * h[:, half:], ops)
    if kind == "ffn":
        return conv(p, "project_out", ops.gelu(conv(p, "project_in", x, ops)), ops)
    if kind == "cca":                     # 1x1, depthwise 3x3, channel attention, 1x1
        h = conv(p, "conv2", conv(p, "conv1", x, ops), ops, groups=x.shape[1])
        return conv(p, "conv3", h * channel_attention(p, h, ops), ops)
    raise ValueError(f"unknown channel mixer {kind!r}")


# the CCA mixer's nn.Sequential `ca` (pool, 1x1, ReLU, 1x1, sigmoid): its modules' trace names
@traced("ca.0")
def _ca_pool(h, ops):
    return ops.adaptive_avg_pool_1(h)


@traced("ca.2")
def _ca_relu(h, ops):
    return ops.relu(h)


@traced(("ca", "ca.4"))
def channel_attention(p, h, ops):
    """The CCA mixer's channel weights: `(B, C, H, W)` -> `(B, C, 1, 1)` in (0, 1)."""
    return ops.sigmoid(conv(p, "ca.3", _ca_relu(conv(p, "ca.1", _ca_pool(h, ops), ops), ops), ops))


# ------------------------------------------------------------------------------ blocks
def block(p, x, cfg, ops):
    """MambaFormerBlock: x + MHSSM(LN(x)), then + FFN(LN(x)). x: `(B, C, H, W)`."""
    x = ops.block_mhssm(p, x, cfg, ops)
    return ops.block_ffn(p, x, cfg, ops)


def block_mhssm(p, x, cfg, ops):
    """The block's first half, `x + MHSSM(norm1(x))`, on `(B, C, H, W)`."""
    B, C, H, W = x.shape
    tokens = norm(p, "norm1", x, ops).reshape(B, C, H * W)
    mixed = ops.mhssm(sub(p, "mamba"), tokens, (H, W), cfg.mamba, ops)          # (B, C, L)
    return x + mixed.reshape(B, C, H, W)


def block_ffn(p, x, cfg, ops):
    """The block's second half, `x + FFN(norm2(x))`, on `(B, C, H, W)`."""
    return x + ops.channel_mixer(sub(p, "ffn"), norm(p, "norm2", x, ops), cfg.channel_mixer_type, ops)


def _block_name(a):
    """The official module name of block `index` of an nn.Sequential named `prefix`."""
    return f"{a['prefix']}.{a['index']}"


@traced(_block_name, scope=_block_name)
def named_block(level, prefix, index, x, cfg, ops):
    """`block` with the parameters of block `index` of `level` (the parameters under `prefix.`,
    prefix stripped), traced as the official module `prefix.index`."""
    return block(sub(level, str(index)), x, cfg, ops)


@traced(lambda a: a["prefix"])
def blocks(params, prefix, count, x, cfg, ops):
    """`count` blocks in sequence (an official nn.Sequential named `prefix`)."""
    level = sub(params, prefix)      # one pass over all the parameters, then over this level's only
    for i in range(count):
        x = named_block(level, prefix, i, x, cfg, ops)
    return x


# ------------------------------------------------------------------------------ models
def eamamba(params, cfg, x, ops):
    """The EAMamba U-Net. x: `(B, inp_channels, H, W)`, H and W multiples of 8 -> `(B, out, H, W)`.

    cfg: `io.config.ModelConfig`; ops: the functions to run (`reference.ops.NUMPY`: this folder).
    """
    B, _, H, W = x.shape
    if H % 8 or W % 8:
        raise ValueError(f"EAMamba needs H and W divisible by 8 (three 2x downsamplings), got "
                         f"{H}x{W}; pad the image first (the restore command does)")
    n1, n2, n3, n4 = cfg.num_blocks
    P = params
    enc1_in = patch_embed(P, x, ops)
    enc1 = blocks(P, "encoder_level1", n1, enc1_in, cfg, ops)
    enc2 = blocks(P, "encoder_level2", n2, downsample(P, "down1_2", enc1, ops), cfg, ops)
    enc3 = blocks(P, "encoder_level3", n3, downsample(P, "down2_3", enc2, ops), cfg, ops)
    latent = blocks(P, "latent", n4, downsample(P, "down3_4", enc3, ops), cfg, ops)

    dec3 = ops.concatenate([upsample(P, "up4_3", latent, ops), enc3], axis=1)
    dec3 = blocks(P, "decoder_level3", n3, conv(P, "reduce_chan_level3", dec3, ops), cfg, ops)
    dec2 = ops.concatenate([upsample(P, "up3_2", dec3, ops), enc2], axis=1)
    dec2 = blocks(P, "decoder_level2", n2, conv(P, "reduce_chan_level2", dec2, ops), cfg, ops)
    dec1 = ops.concatenate([upsample(P, "up2_1", dec2, ops), enc1], axis=1)
    dec1 = blocks(P, "decoder_level1", n1, dec1, cfg, ops)            # stays at 2c: no reduction
    dec1 = blocks(P, "refinement", cfg.num_refinement_blocks, dec1, cfg, ops)

    if cfg.dual_pixel_task:             # defocus deblurring: skip from the embedding, no residual
        return conv(P, "output", dec1 + conv(P, "skip_conv", enc1_in, ops), ops)
    return conv(P, "output", dec1, ops) + x                           # + the input (residual)


@traced("patch_embed")
def patch_embed(params, x, ops):
    """OverlapPatchEmbed: a 3x3 conv (`patch_embed.proj`)."""
    return conv(params, "patch_embed.proj", x, ops)


def _sequential_names(a):
    """An official nn.Sequential(conv, shuffle) `name`: its output is also `name.body`, `name.body.1`."""
    return a["name"], f"{a['name']}.body", f"{a['name']}.body.1"


@traced(_sequential_names)
def downsample(params, name, x, ops):
    """Downsample `name`: 3x3 conv to C/2 (`name.body.0`), PixelUnshuffle(2). `(B, C, H, W)` ->
    `(B, 2C, H/2, W/2)`."""
    return ops.pixel_unshuffle(conv(params, f"{name}.body.0", x, ops), 2)


@traced(_sequential_names)
def upsample(params, name, x, ops):
    """Upsample `name`: 3x3 conv to 2C (`name.body.0`), PixelShuffle(2). `(B, C, H, W)` ->
    `(B, C/2, 2H, 2W)`."""
    return ops.pixel_shuffle(conv(params, f"{name}.body.0", x, ops), 2)


@traced(lambda a: a["prefix"])
def upscale(params, prefix, x, scale, ops):
    """Official `Upscale`: (conv 3x3 to 4C + PixelShuffle(2)) per factor 2, or conv to 9C + shuffle(3)."""
    steps = [2] * (scale.bit_length() - 1) if scale & (scale - 1) == 0 else [3]
    for i, r in enumerate(steps):
        x = shuffle(f"{prefix}.{2 * i + 1}", conv(params, f"{prefix}.{2 * i}", x, ops), r, ops)
    return x


@traced(_named)
def shuffle(name, x, r, ops):
    """PixelShuffle(r) (the official module `name`)."""
    return ops.pixel_shuffle(x, r)


@traced(lambda a: f"layers.{a['index']}")
def residual_group(params, index, count, x, cfg, ops):
    """EAMambaSR's ResidualGroup `layers.index`: `count` blocks, a 3x3 conv, plus the group input."""
    features = blocks(params, f"layers.{index}.blocks", count, x, cfg, ops)
    return conv(params, f"layers.{index}.conv", features, ops) + x


@traced(("conv_before_upsample", "conv_before_upsample.1"))
def conv_before_upsample(params, x, ops):
    """nn.Sequential(3x3 conv, LeakyReLU(0.01)) `conv_before_upsample`."""
    return ops.leaky_relu(conv(params, "conv_before_upsample.0", x, ops), 0.01)


def eamamba_sr(params, cfg, x, ops):
    """EAMambaSR. x: `(B, inp_channels, H, W)` (any H, W) -> `(B, out, s*H, s*W)`, s = upscale."""
    P = params
    x = conv(P, "conv_first", x, ops)
    features = x
    for i, count in enumerate(cfg.num_blocks):     # residual groups
        features = residual_group(P, i, count, features, cfg, ops)
    x = conv(P, "conv_after_body", norm(P, "norm", features, ops), ops) + x
    x = conv_before_upsample(P, x, ops)
    return conv(P, "conv_last", upscale(P, "upsample", x, cfg.upscale, ops), ops)
