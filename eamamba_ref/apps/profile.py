"""Parameters and FLOPs of EAMamba / EAMambaSR, counted analytically (no torch, no forward pass).

    python -m eamamba_ref.profile --config denoise --size 256
    python -m eamamba_ref.profile --config denoise --size 256 --merge add     # the 'add' variant
    python -m eamamba_ref.profile --config configs/denoise-eamamba.yaml --var # 32^2 .. 1024^2
    python -m eamamba_ref.profile --config model.npz --size 512

Every layer of the network is one `Op` with its parameter count and two cost figures:

* `macs`, the convention of the paper's tables (fvcore's `FlopCountAnalysis` with the official
  `profiling/flops.py` handles): one per multiply-add of a convolution, matmul or einsum (biases
  not counted); `nn.LayerNorm` (the MHSSM's out_norm) 5 per element; the selective scan
  9 B D L N + B D L (the VMamba estimate the official script registers); and nothing for what
  fvcore skips: the blocks' own LayerNorms (written with mean/var, which fvcore does not count),
  activations, gates, residual additions, pixel (un)shuffle and the scan-order gathers.
  This reproduces the paper's headline for the denoising model at 256 x 256: 25.3 M parameters
  and 137.3 G for the 8-direction 'concate' MHSSM, 31.1 M and 286 G for the 'add' merge.
* `flops`, arithmetic operations: 2 per multiply-add of a convolution or matmul (plus the bias
  adds), and for the rest one per elementary operation (exp and log counted as one each; see
  `_SCAN_PER_STATE` and friends below for the per-element figures).

The counts follow `model.py` layer by layer; `tests/test_profile.py` checks every parameter
count against `model.parameter_shapes`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections import OrderedDict
from dataclasses import dataclass

from eamamba_ref.io.config import ConfigError, ModelConfig

__all__ = ["Op", "Profile", "PRESETS", "model_ops", "profile", "resolve_config", "format_profile", "main"]

# Elementary operations per element (the 'flops' convention; fvcore counts none of these).
_SCAN_PER_STATE = 7     # delta*A, exp, *h, (delta*u)*B, +, C*h, running sum
_SCAN_PER_STEP = 7      # + delta_bias, softplus (exp, log1p: 3), delta*u, D*u, +
_LAYERNORM = 7          # mean, -mean, square, var sum, *rstd, *weight, +bias (one less without bias)
_SILU = 4               # neg, exp, +1, divide
_GELU = 8               # erfc counted as 5, *x, *0.5, scale of the argument
_SIGMOID = 3

# Layer types, in the order they are printed.
KINDS = OrderedDict([
    ("conv3x3", "3x3 convs (embed, down/up, output)"),
    ("conv1x1", "1x1 convs (channel reduction, skip)"),
    ("ffn", "channel mixer (FFN) convs"),
    ("in_proj", "MHSSM in_proj"),
    ("dwconv", "MHSSM depthwise conv"),
    ("x_proj", "MHSSM x_proj (dt, B, C)"),
    ("dt_proj", "MHSSM dt_proj"),
    ("scan", "selective scans"),
    ("out_norm", "MHSSM out_norm (nn.LayerNorm)"),
    ("out_proj", "MHSSM out_proj"),
    ("norm", "block LayerNorms"),
    ("elementwise", "activations, gates, residual adds"),
])


@dataclass(frozen=True)
class Op:
    """One layer: official name (state-dict prefix), layer type (a key of KINDS), counts."""
    name: str
    kind: str
    params: int
    macs: int       # paper / fvcore convention
    flops: int      # arithmetic operations


@dataclass(frozen=True)
class Profile:
    """The ops of one model at one input size, with totals per layer type and overall."""
    config: ModelConfig
    batch: int
    height: int
    width: int
    ops: tuple

    @property
    def params(self):
        return sum(op.params for op in self.ops)

    @property
    def macs(self):
        return sum(op.macs for op in self.ops)

    @property
    def flops(self):
        return sum(op.flops for op in self.ops)

    def by_kind(self):
        """kind -> (params, macs, flops), in the order of KINDS (kinds with no op left out)."""
        out = OrderedDict()
        for kind in KINDS:
            ops = [op for op in self.ops if op.kind == kind]
            if ops:
                out[kind] = tuple(sum(getattr(op, f) for op in ops) for f in ("params", "macs", "flops"))
        return out


# ----------------------------------------------------------------------------------- counting
class _Counter:
    """Collects ops while walking the architecture; `L` is always the pixel count of the map."""

    def __init__(self, cfg, batch):
        self.cfg = cfg
        self.B = batch
        self.ops = []

    def add(self, name, kind, params=0, macs=0, flops=0):
        self.ops.append(Op(name, kind, int(params), int(macs), int(flops)))

    def conv(self, name, kind, c_in, c_out, k, pixels, bias, groups=1):
        """k x k conv with 'same' output size; MACs are fvcore's: out * in/groups * k*k per pixel."""
        macs = self.B * pixels * c_out * (c_in // groups) * k * k
        params = c_out * (c_in // groups) * k * k + (c_out if bias else 0)
        self.add(name, kind, params, macs, 2 * macs + (self.B * pixels * c_out if bias else 0))

    def elementwise(self, name, per_element, elements):
        self.add(name, "elementwise", flops=self.B * elements * per_element)

    def layer_norm(self, name, kind, channels, pixels, with_bias, fvcore_counts):
        """fvcore counts nn.LayerNorm (5 per element with affine) but not the blocks' hand-written one."""
        n = self.B * channels * pixels
        self.add(name, kind, channels * (2 if with_bias else 1), 5 * n if fvcore_counts else 0,
                 n * (_LAYERNORM if with_bias else _LAYERNORM - 1))

    # ------------------------------------------------------------------------ the MHSSM
    def mhssm(self, p, C, L):
        m = self.cfg.mamba
        d, N, R = m.d_inner(C), m.d_state, m.resolved_dt_rank(C)
        K, Cp = m.heads(C)
        D = K * Cp                                   # channels of the scan (d for 'concate', K d for 'add')
        B = self.B
        d_in = d if m.disable_z_branch else 2 * d
        self.add(f"{p}.in_proj", "in_proj", d_in * C + (d_in if m.bias else 0), B * L * d_in * C,
                 2 * B * L * d_in * C + (B * L * d_in if m.bias else 0))
        if m.conv_2d:
            self.conv(f"{p}.conv", "dwconv", d, d, m.d_conv, L, m.conv_bias, groups=d)
        else:   # causal 1-D depthwise conv: k taps per output
            macs = B * L * d * m.d_conv
            self.add(f"{p}.conv", "dwconv", d * m.d_conv + (d if m.conv_bias else 0), macs,
                     2 * macs + (B * L * d if m.conv_bias else 0))
        self.elementwise(f"{p}.act", _SILU, d * L)
        self.add(f"{p}.x_proj", "x_proj", K * (R + 2 * N) * Cp, B * L * K * (R + 2 * N) * Cp,
                 2 * B * L * K * (R + 2 * N) * Cp)
        self.add(f"{p}.dt_proj", "dt_proj", K * Cp * R + K * Cp, B * L * K * Cp * R, 2 * B * L * K * Cp * R)
        self.add(f"{p}.selective_scan", "scan", D * N + D, 9 * B * D * L * N + B * D * L,
                 B * D * L * (N * _SCAN_PER_STATE + _SCAN_PER_STEP))
        if m.scan_merge_method == "add" and K > 1:           # restore sums the K directions
            self.elementwise(f"{p}.merge", 1, (K - 1) * d * L)
        self.layer_norm(f"{p}.out_norm", "out_norm", d, L, True, fvcore_counts=True)
        if not m.disable_z_branch:
            self.elementwise(f"{p}.gate", _SILU + 1, d * L)
        self.add(f"{p}.out_proj", "out_proj", C * d + (C if m.bias else 0), B * L * C * d,
                 2 * B * L * C * d + (B * L * C if m.bias else 0))

    # ------------------------------------------------------------------------ blocks
    def channel_mixer(self, p, C, L):
        cfg = self.cfg
        f, bias = cfg.ffn_expansion_factor, cfg.bias
        hidden = int(C * f)
        kind = cfg.channel_mixer_type
        if kind == "simple":
            self.conv(f"{p}.project_in", "ffn", C, hidden, 1, L, bias)
            self.elementwise(f"{p}.gate", 1, hidden // 2 * L)
            self.conv(f"{p}.project_out", "ffn", hidden // 2, C, 1, L, bias)
        elif kind == "gdfn":
            self.conv(f"{p}.project_in", "ffn", C, 2 * hidden, 1, L, bias)
            self.conv(f"{p}.dwconv", "ffn", 2 * hidden, 2 * hidden, 3, L, bias, groups=2 * hidden)
            self.elementwise(f"{p}.gate", _GELU + 1, hidden * L)
            self.conv(f"{p}.project_out", "ffn", hidden, C, 1, L, bias)
        elif kind == "ffn":
            self.conv(f"{p}.project_in", "ffn", C, hidden, 1, L, bias)
            self.elementwise(f"{p}.act", _GELU, hidden * L)
            self.conv(f"{p}.project_out", "ffn", hidden, C, 1, L, bias)
        else:  # cca: 1x1, depthwise 3x3, channel attention on the pooled map, 1x1
            self.conv(f"{p}.conv1", "ffn", C, C, 1, L, bias)
            self.conv(f"{p}.conv2", "ffn", C, C, 3, L, bias, groups=C)
            self.elementwise(f"{p}.pool", 1, C * L)
            self.conv(f"{p}.ca.1", "ffn", C, C, 1, 1, bias)
            self.elementwise(f"{p}.ca.act", 1 + _SIGMOID, C)
            self.conv(f"{p}.ca.3", "ffn", C, C, 1, 1, bias)
            self.elementwise(f"{p}.ca.scale", 1, C * L)
            self.conv(f"{p}.conv3", "ffn", C, C, 1, L, bias)

    def block(self, p, C, L):
        with_bias = self.cfg.layernorm_type == "WithBias"
        self.layer_norm(f"{p}.norm1", "norm", C, L, with_bias, fvcore_counts=False)
        self.mhssm(f"{p}.mamba", C, L)
        self.elementwise(f"{p}.residual1", 1, C * L)
        self.layer_norm(f"{p}.norm2", "norm", C, L, with_bias, fvcore_counts=False)
        self.channel_mixer(f"{p}.ffn", C, L)
        self.elementwise(f"{p}.residual2", 1, C * L)

    def blocks(self, prefix, count, C, L):
        for i in range(count):
            self.block(f"{prefix}.{i}", C, L)

    # ------------------------------------------------------------------------ models
    def unet(self, H, W):
        cfg, c = self.cfg, self.cfg.dim
        n1, n2, n3, n4 = cfg.num_blocks
        L1, L2, L3, L4 = H * W, H * W // 4, H * W // 16, H * W // 64
        self.conv("patch_embed.proj", "conv3x3", cfg.inp_channels, c, 3, L1, False)
        self.blocks("encoder_level1", n1, c, L1)
        self.conv("down1_2.body.0", "conv3x3", c, c // 2, 3, L1, False)
        self.blocks("encoder_level2", n2, 2 * c, L2)
        self.conv("down2_3.body.0", "conv3x3", 2 * c, c, 3, L2, False)
        self.blocks("encoder_level3", n3, 4 * c, L3)
        self.conv("down3_4.body.0", "conv3x3", 4 * c, 2 * c, 3, L3, False)
        self.blocks("latent", n4, 8 * c, L4)
        self.conv("up4_3.body.0", "conv3x3", 8 * c, 16 * c, 3, L4, False)
        self.conv("reduce_chan_level3", "conv1x1", 8 * c, 4 * c, 1, L3, cfg.bias)
        self.blocks("decoder_level3", n3, 4 * c, L3)
        self.conv("up3_2.body.0", "conv3x3", 4 * c, 8 * c, 3, L3, False)
        self.conv("reduce_chan_level2", "conv1x1", 4 * c, 2 * c, 1, L2, cfg.bias)
        self.blocks("decoder_level2", n2, 2 * c, L2)
        self.conv("up2_1.body.0", "conv3x3", 2 * c, 4 * c, 3, L2, False)
        self.blocks("decoder_level1", n1, 2 * c, L1)
        self.blocks("refinement", cfg.num_refinement_blocks, 2 * c, L1)
        if cfg.dual_pixel_task:
            self.conv("skip_conv", "conv1x1", c, 2 * c, 1, L1, cfg.bias)
            self.elementwise("skip_add", 1, 2 * c * L1)
            self.conv("output", "conv3x3", 2 * c, cfg.out_channels, 3, L1, cfg.bias)
        else:
            self.conv("output", "conv3x3", 2 * c, cfg.out_channels, 3, L1, cfg.bias)
            self.elementwise("input_residual", 1, cfg.out_channels * L1)

    def sr(self, H, W):
        cfg, c = self.cfg, self.cfg.dim
        L = H * W
        self.conv("conv_first", "conv3x3", cfg.inp_channels, c, 3, L, cfg.bias)
        for g, n in enumerate(cfg.num_blocks):
            self.blocks(f"layers.{g}.blocks", n, c, L)
            self.conv(f"layers.{g}.conv", "conv3x3", c, c, 3, L, True)
            self.elementwise(f"layers.{g}.residual", 1, c * L)
        self.layer_norm("norm", "norm", c, L, cfg.layernorm_type == "WithBias", fvcore_counts=False)
        self.conv("conv_after_body", "conv3x3", c, c, 3, L, cfg.bias)
        self.elementwise("body_residual", 1, c * L)
        self.conv("conv_before_upsample.0", "conv3x3", c, c, 3, L, True)
        self.elementwise("conv_before_upsample.1", 2, c * L)       # LeakyReLU
        s = cfg.upscale
        steps = [2] * (s.bit_length() - 1) if s & (s - 1) == 0 else [3]
        for i, r in enumerate(steps):                                # conv at the current size, then shuffle
            self.conv(f"upsample.{2 * i}", "conv3x3", c, r * r * c, 3, L, True)
            L *= r * r
        self.conv("conv_last", "conv3x3", c, cfg.out_channels, 3, L, cfg.bias)


def model_ops(cfg: ModelConfig, height: int, width: int | None = None, batch: int = 1):
    """Every layer of `cfg` on a `(batch, inp_channels, height, width)` input, as a list of `Op`."""
    width = height if width is None else width
    for v, what in ((height, "height"), (width, "width"), (batch, "batch")):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{what} must be a positive integer, got {v!r}")
    if cfg.name == "eamamba" and (height % 8 or width % 8):
        raise ValueError(f"EAMamba needs H and W divisible by 8, got {height}x{width}")
    counter = _Counter(cfg, batch)
    (counter.unet if cfg.name == "eamamba" else counter.sr)(height, width)
    return counter.ops


def profile(cfg: ModelConfig, height: int, width: int | None = None, batch: int = 1) -> Profile:
    """The `Profile` of `cfg` at one input size (width defaults to height)."""
    width = height if width is None else width
    return Profile(cfg, batch, height, width, tuple(model_ops(cfg, height, width, batch)))


# ----------------------------------------------------------------------------------- configs
_UNET_ARGS = dict(inp_channels=3, out_channels=3, dim=64, num_blocks=[4, 6, 6, 7], num_refinement_blocks=2,
                  ffn_expansion_factor=2, bias=False, LayerNorm_type="WithBias", dual_pixel_task=False,
                  channel_mixer_type="Simple",
                  mamba_cfg=dict(scan_type="diagonal", scan_count=8, scan_merge_method="concate",
                                 disable_z_branch=False, d_state=16, d_conv=3, expand=1, conv_2d=True))


def _sr_args(scale):
    return dict(inp_channels=3, out_channels=3, dim=64, num_blocks=[4, 4, 4, 4], ffn_expansion_factor=1,
                bias=False, LayerNorm_type="WithBias", channel_mixer_type="Simple", upscale=scale,
                mamba_cfg=dict(scan_type="diagonal", scan_count=8, scan_merge_method="concate",
                               disable_z_branch=False, d_state=10, d_conv=3, expand=1, conv_2d=True))


# The released configurations (configs/*.yaml of the official repository): every restoration task
# trains the same U-Net; the lightweight SR models are EAMambaSR.
PRESETS = {name: ("eamamba", _UNET_ARGS) for name in (
    "denoise", "real-denoise", "motion-deblur", "defocus-deblur", "dehaze-indoor", "dehaze-outdoor",
    "derain", "realsr2", "realsr3", "realsr4")}
PRESETS.update({f"sr{s}-light": ("eamambasr", _sr_args(s)) for s in (2, 3, 4)})
PRESETS.update({f"sr{s}": PRESETS[f"sr{s}-light"] for s in (2, 3, 4)})


def _from_spec(spec, where):
    """{'model': {'name', 'args'}} (an official YAML), {'name', 'args'} or a to_json() dict."""
    if isinstance(spec, dict) and isinstance(spec.get("model"), dict):
        spec = spec["model"]
    if not (isinstance(spec, dict) and "name" in spec and isinstance(spec.get("args"), dict)):
        raise ConfigError(f"{where}: no model name and args found (expected an official config with "
                          f"'model: {{name, args}}')")
    return ModelConfig.from_args(str(spec["name"]).lower(), spec["args"])


def resolve_config(config):
    """A `ModelConfig` from a preset name, an official YAML/JSON config file or a checkpoint.

    Checkpoints (.pth official or bare state dict, .npz converted) go through `loading.load`, so
    their architecture is read (or inferred) exactly as when running them.
    """
    if isinstance(config, ModelConfig):
        return config.validate()
    key = str(config).strip().lower()
    if key in PRESETS:
        name, args = PRESETS[key]
        return ModelConfig.from_args(name, json.loads(json.dumps(args)))
    if not os.path.exists(config):
        raise ConfigError(f"--config {config!r} is neither a preset ({', '.join(sorted(PRESETS))}) "
                          f"nor an existing file")
    ext = os.path.splitext(config)[1].lower()
    if ext in (".yaml", ".yml", ".json"):
        with open(config) as f:
            text = f.read()
        if ext == ".json":
            spec = json.loads(text)
        else:
            import yaml   # PyYAML: only needed for official YAML configs
            spec = yaml.safe_load(text)
        return _from_spec(spec, config)
    if ext in (".pth", ".pt", ".npz"):
        from eamamba_ref.io.loading import load
        return load(config).config
    raise ConfigError(f"--config {config!r}: unknown file type {ext!r} (expected .yaml, .json, .pth or .npz)")


def with_mhssm(cfg, **mamba_overrides):
    """`cfg` with some MHSSM settings changed (e.g. scan_merge_method='add'), validated."""
    return dataclasses.replace(cfg, mamba=dataclasses.replace(cfg.mamba, **mamba_overrides)).validate()


# ----------------------------------------------------------------------------------- printing
def _g(n):
    return f"{n / 1e9:10.2f} G"


def _m(n):
    return f"{n / 1e6:8.3f} M"


def describe(cfg):
    m = cfg.mamba
    blocks = list(cfg.num_blocks)
    extra = f"+{cfg.num_refinement_blocks} refinement" if cfg.name == "eamamba" else f", x{cfg.upscale}"
    return (f"{cfg.name} dim {cfg.dim}, blocks {blocks}{extra}, MHSSM {m.scan_type or 'raster'} "
            f"x{m.scan_count} '{m.scan_merge_method}', d_state {m.d_state}, expand {m.expand}")


def format_profile(prof: Profile) -> str:
    """The per-layer-type table of one profile, as text."""
    lines = [f"{describe(prof.config)}",
             f"input {prof.batch}x{prof.config.inp_channels}x{prof.height}x{prof.width}",
             f"{'layer type':40s} {'params':>10s} {'MACs (paper)':>12s} {'FLOPs':>12s} {'share':>6s}"]
    total_macs = prof.macs
    for kind, (params, macs, flops) in prof.by_kind().items():
        lines.append(f"{KINDS[kind]:40s} {_m(params)} {_g(macs)} {_g(flops)} {100 * macs / total_macs:5.1f}%")
    lines.append(f"{'total':40s} {_m(prof.params)} {_g(prof.macs)} {_g(prof.flops)}")
    return "\n".join(lines)


def merge_comparison(cfg, height, width):
    """The paper's headline: 'concate' (K heads of d/K channels) vs 'add' (all d channels per
    direction) vs a single scan, for the same network."""
    rows = [("concate (EAMamba MHSSM)", with_mhssm(cfg, scan_merge_method="concate")),
            ("add (2D-SSM style)", with_mhssm(cfg, scan_merge_method="add")),
            ("single scan (K = 1)", with_mhssm(cfg, scan_count=1, scan_merge_method="concate"))]
    K = cfg.mamba.scan_count
    lines = [f"MHSSM with {K} directions, at {height}x{width}:",
             f"{'merge':28s} {'params':>10s} {'MACs (paper)':>12s} {'scan MACs':>12s}"]
    for label, c in rows:
        if label.startswith("single") and K == 1:
            continue
        try:
            p = profile(c, height, width)
        except (ValueError, ConfigError) as err:
            lines.append(f"{label:28s} cannot be built: {err}")
            continue
        scan = sum(op.macs for op in p.ops if op.kind == "scan")
        lines.append(f"{label:28s} {_m(p.params)} {_g(p.macs)} {_g(scan)}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m eamamba_ref.profile",
        description="Parameters and FLOPs of EAMamba per layer type, counted analytically.")
    parser.add_argument("--config", default="denoise",
                        help=f"preset ({', '.join(sorted(PRESETS))}), an official YAML/JSON config "
                             f"or a checkpoint (.pth/.npz); default: denoise")
    parser.add_argument("--size", type=int, default=256, help="input height (and width), default 256")
    parser.add_argument("--width", type=int, default=None, help="input width if not square")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--var", action="store_true",
                        help="totals for input sizes 32, 64, ..., 1024 (like the official --var)")
    parser.add_argument("--merge", choices=("concate", "add"), default=None,
                        help="override the MHSSM merge method")
    parser.add_argument("--scan-count", type=int, choices=(1, 2, 4, 8), default=None,
                        help="override the number of scan directions")
    parser.add_argument("--json", action="store_true", help="print the totals per layer type as JSON")
    args = parser.parse_args(argv)
    try:
        cfg = resolve_config(args.config)
        overrides = {}
        if args.merge:
            overrides["scan_merge_method"] = args.merge
        if args.scan_count:
            overrides["scan_count"] = args.scan_count
        if overrides:
            cfg = with_mhssm(cfg, **overrides)
        if args.var:
            print(describe(cfg))
            print(f"{'size':>10s} {'params':>10s} {'MACs (paper)':>12s} {'FLOPs':>12s}")
            size = 32
            while size <= 1024:
                p = profile(cfg, size, size, args.batch)
                print(f"{size:>4d}x{size:<5d} {_m(p.params)} {_g(p.macs)} {_g(p.flops)}")
                size *= 2
            return 0
        prof = profile(cfg, args.size, args.width, args.batch)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"config": json.loads(cfg.to_json()), "input": [args.batch, cfg.inp_channels,
                          prof.height, prof.width], "params": prof.params, "macs": prof.macs,
                          "flops": prof.flops,
                          "by_kind": {k: dict(zip(("params", "macs", "flops"), v))
                                      for k, v in prof.by_kind().items()}}, indent=1))
        return 0
    print(format_profile(prof))
    print()
    print(merge_comparison(cfg, prof.height, prof.width))
    return 0
