"""EAMamba (U-Net restoration) and EAMambaSR (super-resolution) in PyTorch.

Module and parameter names follow the official code, so ``state_dict()`` keys and shapes are the
official ones (``encoder_level1.0.mamba.in_proj.weight``, ``encoder_level1.0.norm1.body.weight``,
``down1_2.body.0.weight``, ``layers.0.blocks.0.mamba.A_logs``, ``conv_before_upsample.0.weight``,
``upsample.0.weight``, ...). Modules are built in the official order, so with the same seed a model
gets the same initial weights as the official one.

Deliberate differences from the official classes:

* ``EAMamba(upscale=...)`` defaults to 1 and only accepts 1. The official default is 2, which
  builds an ``upsample`` head (Conv out_channels -> 4 out_channels + PixelShuffle) that its forward
  pass then feeds with dim*2 channels, so it cannot run at any upscale > 1; restoration checkpoints
  are upscale 1 and super-resolution is ``EAMambaSR``. (:func:`..checkpoint.load_official_checkpoint`
  drops such unused ``upsample.*`` weights.)
* ``checkpoint_percentage`` (gradient checkpointing) is accepted and ignored.
* Invalid configurations and inputs raise ``ValueError`` up front (the official code asserts or
  fails somewhere inside the forward pass).
* Like the official constructor, ``LayerNorm_type`` (the YAML spelling) is ignored: only
  ``layernorm_type`` is read, so the released configs all run with 'WithBias'.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from eamamba_ref.pytorch.mamba import ExtendedMamba
from eamamba_ref.pytorch.scan import ScanTransform

__all__ = [
    "LayerNorm",
    "SimpleFFN",
    "GDFN",
    "FFN",
    "CCABlock",
    "MambaFormerBlock",
    "Downsample",
    "Upsample",
    "Upscale",
    "ResidualGroup",
    "EAMamba",
    "EAMambaSR",
    "CHANNEL_MIXERS",
    "LAYERNORM_TYPES",
    "DEFAULT_MAMBA_CFG",
]

CHANNEL_MIXERS = ("simple", "gdfn", "ffn", "cca")
LAYERNORM_TYPES = ("WithBias", "BiasFree")

# The MHSSM settings of every released config (denoise, deblur, derain, dehaze, SR: d_state 10 for
# the light SR models). Used when mamba_cfg is None; the official constructor requires mamba_cfg.
DEFAULT_MAMBA_CFG = {
    "scan_type": "diagonal",
    "scan_count": 8,
    "scan_merge_method": "concate",
    "disable_z_branch": False,
    "d_state": 16,
    "d_conv": 3,
    "expand": 1,
    "conv_2d": True,
}


# ---------------------------------------------------------------- normalisation

class _NormParams(nn.Module):
    """Holds the LayerNorm parameters under the official names (``body.weight``, ``body.bias``)."""

    def __init__(self, dim: int, with_bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if with_bias else None


class LayerNorm(nn.Module):
    """Channel LayerNorm of a feature map: normalise the C values of every pixel, ``(B, C, H, W)``.

    'WithBias': ``(x - mean) / sqrt(var + 1e-5) * weight + bias``. 'BiasFree' (Restormer's variant):
    ``x / sqrt(var + 1e-5) * weight`` -- the variance is still taken about the mean, but the mean is
    not subtracted. var is the biased (population) variance.
    """

    eps = 1e-5

    def __init__(self, dim: int, layernorm_type: str = "WithBias"):
        super().__init__()
        # Like the official code, anything other than 'BiasFree' means WithBias.
        self.body = _NormParams(dim, with_bias=layernorm_type != "BiasFree")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.body.weight[:, None, None]
        var = x.var(dim=1, keepdim=True, unbiased=False)          # (B, 1, H, W)
        if self.body.bias is None:
            return x / torch.sqrt(var + self.eps) * w
        mu = x.mean(dim=1, keepdim=True)
        return (x - mu) / torch.sqrt(var + self.eps) * w + self.body.bias[:, None, None]


# ---------------------------------------------------------------- channel mixers

class SimpleFFN(nn.Module):
    """'Simple' mixer (NAFNet's SimpleGate): 1x1 conv C -> C f, halves multiplied, 1x1 conv -> C."""

    def __init__(self, dim: int, bias: bool, ffn_expansion_factor: float = 2):
        super().__init__()
        hidden = int(dim * ffn_expansion_factor)
        if hidden % 2:
            raise ValueError(f"the Simple mixer needs dim * ffn_expansion_factor even, got {hidden}")
        self.project_in = nn.Conv2d(dim, hidden, 1, bias=bias)
        self.project_out = nn.Conv2d(hidden // 2, dim, 1, bias=bias)

    def forward(self, x):                                         # (B, C, H, W)
        a, b = self.project_in(x).chunk(2, dim=1)                 # (B, C f / 2, H, W) each
        return self.project_out(a * b)


class GDFN(nn.Module):
    """Restormer's gated-dconv FFN: 1x1 conv C -> 2 h, 3x3 depthwise, gelu(first half) * second."""

    def __init__(self, dim: int, ffn_expansion_factor: float, bias: bool):
        super().__init__()
        hidden = int(dim * ffn_expansion_factor)
        self.project_in = nn.Conv2d(dim, 2 * hidden, 1, bias=bias)
        self.dwconv = nn.Conv2d(2 * hidden, 2 * hidden, 3, padding=1, groups=2 * hidden, bias=bias)
        self.project_out = nn.Conv2d(hidden, dim, 1, bias=bias)

    def forward(self, x):
        a, b = self.dwconv(self.project_in(x)).chunk(2, dim=1)
        return self.project_out(F.gelu(a) * b)


class FFN(nn.Module):
    """Plain FFN: 1x1 conv C -> C f, GELU, 1x1 conv -> C."""

    def __init__(self, dim: int, bias: bool, ffn_expansion_factor: float = 2):
        super().__init__()
        hidden = int(dim * ffn_expansion_factor)
        self.project_in = nn.Conv2d(dim, hidden, 1, bias=bias)
        self.project_out = nn.Conv2d(hidden, dim, 1, bias=bias)

    def forward(self, x):
        return self.project_out(F.gelu(self.project_in(x)))


class CCABlock(nn.Module):
    """Conv + channel attention: 1x1 conv, 3x3 depthwise, * sigmoid(MLP(avg-pool)), 1x1 conv.

    Ignores ffn_expansion_factor (all widths are C).
    """

    def __init__(self, dim: int, bias: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 1, bias=bias)
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=bias)
        self.ca = nn.Sequential(                                  # indices 1 and 3 hold weights
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(dim, dim, 1, bias=bias),
            nn.ReLU(),
            nn.Conv2d(dim, dim, 1, bias=bias),
            nn.Sigmoid(),
        )
        self.conv3 = nn.Conv2d(dim, dim, 1, bias=bias)

    def forward(self, x):
        x = self.conv2(self.conv1(x))
        return self.conv3(x * self.ca(x))


def channel_mixer(kind: str, dim: int, ffn_expansion_factor: float, bias: bool) -> nn.Module:
    """The channel mixer named ``kind`` (case-insensitive: Simple, GDFN, FFN, CCA)."""
    kind = _mixer_name(kind)
    if kind == "simple":
        return SimpleFFN(dim, bias, ffn_expansion_factor)
    if kind == "gdfn":
        return GDFN(dim, ffn_expansion_factor, bias)
    if kind == "ffn":
        return FFN(dim, bias, ffn_expansion_factor)
    return CCABlock(dim, bias)


def _mixer_name(kind) -> str:
    name = kind.lower() if isinstance(kind, str) else kind
    if name not in CHANNEL_MIXERS:
        raise ValueError(f"channel_mixer_type must be one of Simple, GDFN, FFN, CCA; got {kind!r}")
    return name


# ---------------------------------------------------------------- blocks

class MambaFormerBlock(nn.Module):
    """``x + MHSSM(LN(x))``, then ``+ mixer(LN(x))`` on ``(B, C, H, W)``."""

    def __init__(self, dim, ffn_expansion_factor, bias, layernorm_type, scan_transform, mamba_cfg,
                 channel_mixer_type="simple"):
        super().__init__()
        self.norm1 = LayerNorm(dim, layernorm_type)
        self.mamba = ExtendedMamba(dim, scan_transform, **mamba_cfg)
        self.norm2 = LayerNorm(dim, layernorm_type)
        self.ffn = channel_mixer(channel_mixer_type, dim, ffn_expansion_factor, bias)

    def forward(self, x):
        B, C, H, W = x.shape
        tokens = self.norm1(x).reshape(B, C, H * W).transpose(1, 2)       # (B, L, C) row-major
        x = x + self.mamba(tokens, (H, W)).transpose(1, 2).reshape(B, C, H, W)
        return x + self.ffn(self.norm2(x))


def _blocks(n: int, dim: int, shared: dict) -> nn.Sequential:
    return nn.Sequential(*(MambaFormerBlock(dim, **shared) for _ in range(n)))


class Downsample(nn.Module):
    """3x3 conv C -> C/2, then PixelUnshuffle(2): ``(B, C, H, W) -> (B, 2C, H/2, W/2)``."""

    def __init__(self, n_feat: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(n_feat, n_feat // 2, 3, padding=1, bias=False),
                                  nn.PixelUnshuffle(2))

    def forward(self, x):
        return self.body(x)


class Upsample(nn.Module):
    """3x3 conv C -> 2C, then PixelShuffle(2): ``(B, C, H, W) -> (B, C/2, 2H, 2W)``."""

    def __init__(self, n_feat: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(n_feat, n_feat * 2, 3, padding=1, bias=False),
                                  nn.PixelShuffle(2))

    def forward(self, x):
        return self.body(x)


class Upscale(nn.Sequential):
    """SR head: for scale 2^k, k times (3x3 conv C -> 4C, PixelShuffle 2); for 3, conv C -> 9C,
    PixelShuffle 3; scale 1 is empty (identity). Convs have biases."""

    def __init__(self, scale: int, num_feat: int):
        layers = []
        if scale >= 1 and scale & (scale - 1) == 0:
            for _ in range(scale.bit_length() - 1):
                layers += [nn.Conv2d(num_feat, 4 * num_feat, 3, padding=1), nn.PixelShuffle(2)]
        elif scale == 3:
            layers += [nn.Conv2d(num_feat, 9 * num_feat, 3, padding=1), nn.PixelShuffle(3)]
        else:
            raise ValueError(f"upscale must be a power of two or 3, got {scale!r}")
        super().__init__(*layers)


class ResidualGroup(nn.Module):
    """EAMambaSR stage: blocks, then a 3x3 conv, plus the stage input."""

    def __init__(self, num_blocks: int, dim: int, shared: dict):
        super().__init__()
        self.blocks = _blocks(num_blocks, dim, shared)
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x):
        return self.conv(self.blocks(x)) + x


def _shared_settings(ffn_expansion_factor, bias, layernorm_type, channel_mixer_type, mamba_cfg):
    """Validate the options every block shares; build the one ScanTransform they all use."""
    if layernorm_type not in LAYERNORM_TYPES:
        raise ValueError(f"layernorm_type must be one of {LAYERNORM_TYPES}, got {layernorm_type!r}")
    mamba_cfg = dict(DEFAULT_MAMBA_CFG if mamba_cfg is None else mamba_cfg)
    for key in ("scan_type", "scan_count", "scan_merge_method"):
        mamba_cfg.setdefault(key, None)
    scan_transform = ScanTransform(
        mamba_cfg["scan_type"], mamba_cfg["scan_count"], mamba_cfg["scan_merge_method"]
    )
    return dict(
        ffn_expansion_factor=ffn_expansion_factor,
        bias=bias,
        layernorm_type=layernorm_type,
        scan_transform=scan_transform,
        mamba_cfg=mamba_cfg,
        channel_mixer_type=_mixer_name(channel_mixer_type),
    )


def _check_image(x: torch.Tensor, channels: int, multiple: int, model: str) -> None:
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(f"{model} expects (B, {channels}, H, W), got {tuple(x.shape)}")
    if x.shape[2] % multiple or x.shape[3] % multiple:
        raise ValueError(f"{model} needs H and W divisible by {multiple}, got {tuple(x.shape[2:])}")


# ---------------------------------------------------------------- models

class EAMamba(nn.Module):
    """The restoration U-Net (denoise, deblur, derain, dehaze, real SR at equal size).

    ``(B, inp_channels, H, W) -> (B, out_channels, H, W)`` with H, W multiples of 8. Levels run at
    dim, 2 dim, 4 dim, 8 dim (latent); decoder level 1 and the refinement run at 2 dim. Output =
    3x3 conv + input (no input residual for the dual-pixel task, which adds a 1x1 skip instead).
    """

    def __init__(
        self,
        inp_channels: int = 3,
        out_channels: int = 3,
        dim: int = 64,
        num_blocks=(4, 6, 6, 7),
        num_refinement_blocks: int = 2,
        ffn_expansion_factor: float = 2.0,
        bias: bool = False,
        layernorm_type: str = "WithBias",
        dual_pixel_task: bool = False,
        checkpoint_percentage: float = 0.0,
        channel_mixer_type: str = "Simple",
        upscale: int = 1,
        mamba_cfg: dict | None = None,
        **ignored,
    ):
        super().__init__()
        if upscale != 1:
            raise ValueError(
                f"EAMamba supports upscale=1 only (the official upscale>1 path cannot run); "
                f"use EAMambaSR for super-resolution, got upscale={upscale!r}"
            )
        if len(num_blocks) != 4:
            raise ValueError(f"num_blocks must have 4 entries, got {list(num_blocks)}")
        self.upscale = 1
        self.inp_channels = inp_channels
        self.dual_pixel_task = dual_pixel_task
        shared = _shared_settings(ffn_expansion_factor, bias, layernorm_type, channel_mixer_type, mamba_cfg)
        self.mamba_cfg = shared["mamba_cfg"]
        d1, d2, d3, d4 = dim, dim * 2, dim * 4, dim * 8

        self.patch_embed = _PatchEmbed(inp_channels, d1)
        self.encoder_level1 = _blocks(num_blocks[0], d1, shared)
        self.down1_2 = Downsample(d1)
        self.encoder_level2 = _blocks(num_blocks[1], d2, shared)
        self.down2_3 = Downsample(d2)
        self.encoder_level3 = _blocks(num_blocks[2], d3, shared)
        self.down3_4 = Downsample(d3)
        self.latent = _blocks(num_blocks[3], d4, shared)

        self.up4_3 = Upsample(d4)
        self.reduce_chan_level3 = nn.Conv2d(d4, d3, 1, bias=bias)
        self.decoder_level3 = _blocks(num_blocks[2], d3, shared)
        self.up3_2 = Upsample(d3)
        self.reduce_chan_level2 = nn.Conv2d(d3, d2, 1, bias=bias)
        self.decoder_level2 = _blocks(num_blocks[1], d2, shared)
        self.up2_1 = Upsample(d2)
        # No channel reduction at level 1: decoder level 1 and refinement run at 2 dim.
        self.decoder_level1 = _blocks(num_blocks[0], d2, shared)
        self.refinement = _blocks(num_refinement_blocks, d2, shared)

        if dual_pixel_task:
            self.skip_conv = nn.Conv2d(d1, d2, 1, bias=bias)
        self.output = nn.Conv2d(d2, out_channels, 3, padding=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, inp_channels, H, W)`` -> ``(B, out_channels, H, W)``; H, W multiples of 8."""
        _check_image(x, self.inp_channels, 8, "EAMamba")
        emb = self.patch_embed(x)                                 # (B, d, H, W)
        enc1 = self.encoder_level1(emb)                           # (B, d, H, W)
        enc2 = self.encoder_level2(self.down1_2(enc1))            # (B, 2d, H/2, W/2)
        enc3 = self.encoder_level3(self.down2_3(enc2))            # (B, 4d, H/4, W/4)
        lat = self.latent(self.down3_4(enc3))                     # (B, 8d, H/8, W/8)

        dec3 = self.reduce_chan_level3(torch.cat([self.up4_3(lat), enc3], 1))
        dec3 = self.decoder_level3(dec3)                          # (B, 4d, H/4, W/4)
        dec2 = self.reduce_chan_level2(torch.cat([self.up3_2(dec3), enc2], 1))
        dec2 = self.decoder_level2(dec2)                          # (B, 2d, H/2, W/2)
        dec1 = self.decoder_level1(torch.cat([self.up2_1(dec2), enc1], 1))  # (B, 2d, H, W)
        dec1 = self.refinement(dec1)

        if self.dual_pixel_task:
            return self.output(dec1 + self.skip_conv(emb))
        return self.output(dec1) + x


class _PatchEmbed(nn.Module):
    """Overlapping patch embedding: a 3x3 conv, no bias (official ``OverlapPatchEmbed``)."""

    def __init__(self, in_c: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_c, embed_dim, 3, padding=1, bias=False)

    def forward(self, x):
        return self.proj(x)


class EAMambaSR(nn.Module):
    """The lightweight super-resolution model: ``(B, inp, H, W) -> (B, out, s H, s W)``.

    conv_first -> residual groups -> LayerNorm -> conv_after_body (+ conv_first output) ->
    conv + LeakyReLU -> Upscale(s) -> conv_last. No bicubic skip.
    """

    def __init__(
        self,
        inp_channels: int = 3,
        out_channels: int = 3,
        dim: int = 64,
        num_blocks=(4, 4, 4, 4),
        ffn_expansion_factor: float = 2.0,
        bias: bool = False,
        layernorm_type: str = "WithBias",
        checkpoint_percentage: float = 0.0,
        channel_mixer_type: str = "Simple",
        upscale: int = 2,
        mamba_cfg: dict | None = None,
        **ignored,
    ):
        super().__init__()
        self.upscale = upscale
        self.inp_channels = inp_channels
        shared = _shared_settings(ffn_expansion_factor, bias, layernorm_type, channel_mixer_type, mamba_cfg)
        self.mamba_cfg = shared["mamba_cfg"]
        if not (isinstance(upscale, int) and upscale >= 1 and (upscale & (upscale - 1) == 0 or upscale == 3)):
            raise ValueError(f"upscale must be a power of two or 3, got {upscale!r}")

        self.conv_first = nn.Conv2d(inp_channels, dim, 3, padding=1, bias=bias)
        self.layers = nn.ModuleList(ResidualGroup(n, dim, shared) for n in num_blocks)
        self.norm = LayerNorm(dim, layernorm_type)
        self.conv_after_body = nn.Conv2d(dim, dim, 3, padding=1, bias=bias)
        self.conv_before_upsample = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1), nn.LeakyReLU())
        self.upsample = Upscale(upscale, dim)
        self.conv_last = nn.Conv2d(dim, out_channels, 3, padding=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, inp_channels, H, W)`` -> ``(B, out_channels, upscale H, upscale W)``."""
        _check_image(x, self.inp_channels, 1, "EAMambaSR")
        x = self.conv_first(x)                                    # (B, dim, H, W)
        feats = x
        for layer in self.layers:
            feats = layer(feats)
        x = self.conv_after_body(self.norm(feats)) + x
        x = self.conv_before_upsample(x)
        return self.conv_last(self.upsample(x))                   # (B, out, sH, sW)
