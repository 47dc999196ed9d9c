"""Model configuration: one small immutable object, built from official args or a preset, validated once.

The official constructors take keyword arguments (saved in every checkpoint as `args`, from the
training YAML). `ModelConfig.from_args(name, args)` reads them the way the official constructors
do -- unknown keys are ignored, `scan_type` is lower-cased, `layernorm_type` (not the YAML's
`LayerNorm_type`) selects the norm -- and `validate()` rejects what cannot run, with one clear line.

Configs come from files, so `validate()` first checks every field's type (a string `dim`, a null
`ffn_expansion_factor`, a list `mamba_cfg`...) and then caps what a config may ask for (`LIMITS`:
far above every released model, far below what would exhaust memory or time before the weights
could be checked), so a crafted config fails here in one line, not deep inside model building.
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass

import numpy as np

from eamamba_ref.reference import scans
from eamamba_ref.io.untrusted import brief

MODEL_NAMES = ("eamamba", "eamambasr")
CHANNEL_MIXERS = ("simple", "gdfn", "ffn", "cca")
LAYERNORM_TYPES = ("WithBias", "BiasFree")


class ConfigError(ValueError):
    """A model configuration that cannot be built or run."""


# Inclusive ranges a config may ask for: far above the released models (the denoising one: dim 64,
# blocks [4, 6, 6, 7], 2 refinement blocks, d_state 16, expand 1, ffn factor 2; dual-pixel: 6 input
# channels), low enough that listing the architecture's tensors is instant.
LIMITS = {
    "inp_channels": (1, 64), "out_channels": (1, 64), "dim": (1, 1024), "blocks per level": (0, 64),
    "levels (EAMambaSR groups)": (1, 32), "num_refinement_blocks": (0, 64), "ffn_expansion_factor": (0, 16),
    "d_state": (1, 256), "d_conv": (1, 31), "expand": (0, 16), "dt_rank": (1, 1024),
}


def _is_int(v):
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


def _is_real(v):
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_)) and math.isfinite(v)


def _is_bool(v):
    return isinstance(v, (bool, np.bool_))


def _is_auto(v):
    return isinstance(v, str) and v == "auto"


def _is_name(v):
    return isinstance(v, str) and len(v) <= 64


def _type_problems(cfg):
    """Fields of the wrong type, one message each (checked before any value is compared or used)."""
    m = cfg.mamba
    fields = [(name, getattr(cfg, name), _is_int, "an integer") for name in
              ("inp_channels", "out_channels", "dim", "num_refinement_blocks", "upscale")]
    fields += [("ffn_expansion_factor", cfg.ffn_expansion_factor, _is_real, "a number")]
    fields += [(name, getattr(cfg, name), _is_bool, "true or false") for name in ("bias", "dual_pixel_task")]
    fields += [(name, getattr(cfg, name), _is_name, "a short string")
               for name in ("name", "layernorm_type", "channel_mixer_type")]
    if not isinstance(m, MambaConfig):
        return [f"mamba_cfg must be a dict of MHSSM settings, got {brief(m)}"]
    fields += [(f"mamba_cfg.{name}", getattr(m, name), _is_int, "an integer")
               for name in ("scan_count", "d_state", "d_conv")]
    fields += [("mamba_cfg.expand", m.expand, _is_real, "a number"),
               ("mamba_cfg.dt_rank", m.dt_rank, lambda v: _is_auto(v) or _is_int(v), "'auto' or an integer"),
               ("mamba_cfg.scan_type", m.scan_type, lambda v: v is None or _is_name(v), "a short string or null"),
               ("mamba_cfg.scan_merge_method", m.scan_merge_method, _is_name, "a short string")]
    fields += [(f"mamba_cfg.{name}", getattr(m, name), _is_bool, "true or false")
               for name in ("disable_z_branch", "conv_2d", "conv_bias", "bias")]
    problems = [f"{name} must be {what}, got {brief(value)}" for name, value, ok, what in fields if not ok(value)]
    blocks = cfg.num_blocks
    if not (isinstance(blocks, tuple) and len(blocks) <= LIMITS["levels (EAMambaSR groups)"][1]
            and all(_is_int(b) for b in blocks)):
        problems.append(f"num_blocks must be a short list of integers, got {brief(blocks)}")
    return problems


def _limit_problems(cfg):
    """Values outside `LIMITS` (types already checked)."""
    m = cfg.mamba
    values = [("inp_channels", cfg.inp_channels), ("out_channels", cfg.out_channels), ("dim", cfg.dim),
              ("num_refinement_blocks", cfg.num_refinement_blocks),
              ("ffn_expansion_factor", cfg.ffn_expansion_factor), ("d_state", m.d_state), ("d_conv", m.d_conv),
              ("expand", m.expand), ("levels (EAMambaSR groups)", len(cfg.num_blocks))]
    values += [("blocks per level", b) for b in cfg.num_blocks]
    if not _is_auto(m.dt_rank):
        values.append(("dt_rank", m.dt_rank))
    problems = []
    for name, v in values:
        lo, hi = LIMITS[name]
        # ranges of reals are open below (expand and the ffn factor must be positive)
        if not (lo < v <= hi if name in ("ffn_expansion_factor", "expand") else lo <= v <= hi):
            problems.append(f"{name} {brief(v)} is outside the supported range {lo}..{hi}")
    return problems


@dataclass(frozen=True)
class MambaConfig:
    """`mamba_cfg` of the official models: the MHSSM (ExtendedMamba) of every block.

    Defaults are the official ExtendedMamba constructor's, so a partial `mamba_cfg` builds the same
    network as the official code; the released models' setting is `RELEASED_MAMBA` below.
    """
    scan_type: str | None = None
    scan_count: int = 1
    scan_merge_method: str = "concate"
    disable_z_branch: bool = False
    d_state: int = 16
    d_conv: int = 4
    expand: float = 2
    conv_2d: bool = False
    dt_rank: int | str = "auto"
    conv_bias: bool = True        # depthwise conv bias (official default)
    bias: bool = False            # in_proj / out_proj bias (official default)

    def d_inner(self, d_model):
        return int(self.expand * d_model)

    def resolved_dt_rank(self, d_model):
        return math.ceil(d_model / 16) if _is_auto(self.dt_rank) else int(self.dt_rank)

    def heads(self, d_model):
        """(K, C'): directions and channels per direction of the selective scans."""
        d = self.d_inner(d_model)
        K = self.scan_count
        return K, (d // K if self.scan_merge_method == "concate" else d)


# What every released config (configs/*-eamamba*.yaml) sets: the 8-direction all-around diagonal
# scan with the 'concate' merge, 2-D depthwise conv 3x3, expand 1 (d_state 16; 10 for light SR).
RELEASED_MAMBA = MambaConfig(scan_type="diagonal", scan_count=8, scan_merge_method="concate", d_state=16,
                             d_conv=3, expand=1, conv_2d=True)


@dataclass(frozen=True)
class ModelConfig:
    """Everything that decides the architecture of `EAMamba` (U-Net) or `EAMambaSR`."""
    name: str = "eamamba"
    inp_channels: int = 3
    out_channels: int = 3
    dim: int = 64
    num_blocks: tuple = (4, 6, 6, 7)
    num_refinement_blocks: int = 2          # EAMamba only
    ffn_expansion_factor: float = 2.0
    bias: bool = False
    layernorm_type: str = "WithBias"
    dual_pixel_task: bool = False           # EAMamba only
    channel_mixer_type: str = "simple"
    upscale: int = 1
    mamba: MambaConfig = RELEASED_MAMBA      # the official constructors require a mamba_cfg

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_args(cls, name, args):
        """Build from an official model name and constructor/YAML `args` dict (unknown keys ignored)."""
        if name not in MODEL_NAMES:
            raise ConfigError(f"unknown model name {brief(name)}; expected 'eamamba' or 'eamambasr'")
        if not (args is None or isinstance(args, dict)):
            raise ConfigError(f"args must be a dict of constructor arguments, got a {type(args).__name__}")
        args = dict(args or {})
        if args.get("mamba_cfg") is None:
            # the official constructors cannot run without one; use the released setting
            # (as the PyTorch reference does)
            mamba = RELEASED_MAMBA
        else:
            if not isinstance(args["mamba_cfg"], dict):
                raise ConfigError(f"mamba_cfg must be a dict of MHSSM settings, got {brief(args['mamba_cfg'])}")
            mcfg = dict(args["mamba_cfg"])
            if mcfg.get("scan_count") is None:
                raise ConfigError("mamba_cfg has no scan_count (1, 2, 4 or 8); the official code requires it")
            mamba_fields = {f.name for f in dataclasses.fields(MambaConfig)}
            mamba = MambaConfig(**{k: v for k, v in mcfg.items() if k in mamba_fields})
            if isinstance(mamba.scan_type, str):
                mamba = dataclasses.replace(mamba, scan_type=mamba.scan_type.lower())
        model_fields = {f.name for f in dataclasses.fields(cls)} - {"name", "mamba"}
        kwargs = {k: v for k, v in args.items() if k in model_fields}
        blocks = kwargs.get("num_blocks")
        if isinstance(blocks, (list, tuple)):       # JSON/YAML lists; validate() reports bad items
            kwargs["num_blocks"] = tuple(int(b) if _is_int(b) else b for b in blocks)
        if isinstance(kwargs.get("channel_mixer_type"), str):
            kwargs["channel_mixer_type"] = kwargs["channel_mixer_type"].lower()
        defaults = {"eamamba": {}, "eamambasr": {"num_blocks": (4, 4, 4, 4), "upscale": 2}}[name]
        if name == "eamambasr":     # U-Net-only options: EAMambaSR ignores them, so normalise them
            kwargs.update(num_refinement_blocks=0, dual_pixel_task=False)
        # The official EAMamba defaults to upscale=2, but that path cannot run (FACTS: its upsample
        # conv expects 3 channels) and no task config sets it: restoration models are upscale 1.
        # An explicit upscale > 1 for 'eamamba' is rejected by validate().
        return cls(name=name, mamba=mamba, **{**defaults, **kwargs}).validate()

    def to_args(self):
        """The official constructor arguments (what a checkpoint's `args` holds)."""
        d = dataclasses.asdict(self)
        d.pop("name")
        d["num_blocks"] = list(self.num_blocks)
        d["mamba_cfg"] = d.pop("mamba")
        if self.name == "eamambasr":
            d.pop("num_refinement_blocks")
            d.pop("dual_pixel_task")
        return d

    def to_json(self):
        return json.dumps({"name": self.name, "args": self.to_args()}, sort_keys=True)

    @classmethod
    def from_json(cls, text):
        try:
            d = json.loads(text)
            return cls.from_args(d["name"], d["args"])
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ConfigError(f"not a model configuration: {err}") from None

    # ---------------------------------------------------------------- validation
    def validate(self):
        problems = _type_problems(self)
        if not problems:
            problems = _limit_problems(self)
        if problems:                        # the value checks below assume sane types and sizes
            raise ConfigError("; ".join(problems))
        m = self.mamba
        if self.name not in MODEL_NAMES:
            problems.append(f"unknown model name {brief(self.name)}")
        if self.layernorm_type not in LAYERNORM_TYPES:
            problems.append(f"layernorm_type must be 'WithBias' or 'BiasFree', got {brief(self.layernorm_type)}")
        if self.channel_mixer_type not in CHANNEL_MIXERS:
            problems.append(f"channel_mixer_type must be one of Simple, GDFN, FFN, CCA, "
                            f"got {brief(self.channel_mixer_type)}")
        if self.dim < 1 or any(b < 0 for b in self.num_blocks):
            problems.append(f"dim and num_blocks must be positive, got {self.dim}, {self.num_blocks}")
        if self.name == "eamamba":
            if len(self.num_blocks) != 4:
                problems.append(f"EAMamba needs 4 num_blocks (3 levels + latent), got {self.num_blocks}")
            if self.dim % 2:
                problems.append(f"EAMamba needs an even dim (Downsample halves it), got {self.dim}")
            if self.upscale != 1:
                problems.append("EAMamba with upscale > 1 cannot run in the official code (its upsample "
                                "conv expects 3 channels); use EAMambaSR for super-resolution")
            if self.dual_pixel_task and self.inp_channels != 6:
                problems.append(f"dual_pixel_task needs inp_channels=6, got {self.inp_channels}")
        else:
            if self.upscale not in (2, 3, 4, 8):
                problems.append(f"EAMambaSR upscale must be 2, 3, 4 or 8 (2^n or 3), got {self.upscale}")
        if self.channel_mixer_type == "simple" and int(self.dim * self.ffn_expansion_factor) % 2:
            problems.append("the Simple channel mixer needs dim*ffn_expansion_factor to be even")
        try:
            scans._check_config(m.scan_type, m.scan_count, m.scan_merge_method)
        except ValueError as err:
            problems.append(str(err))
        if m.d_state < 1 or m.d_conv < 1 or m.expand <= 0:
            problems.append(f"d_state, d_conv and expand must be positive, got {m.d_state}, {m.d_conv}, {m.expand}")
        if m.conv_2d and m.d_conv % 2 == 0:
            problems.append(f"conv_2d needs an odd d_conv (same-size padding), got {m.d_conv}")
        if not _is_auto(m.dt_rank) and m.dt_rank < 1:
            problems.append(f"dt_rank must be 'auto' or a positive integer, got {brief(m.dt_rank)}")
        if any(m.d_inner(width) < 1 for width in self.stage_widths()):
            problems.append(f"expand {m.expand} leaves no MHSSM channels at width {self.dim}")
        elif m.scan_merge_method == "concate" and m.scan_count > 1:
            for width in self.stage_widths():
                d = m.d_inner(width)
                if d % m.scan_count:
                    problems.append(f"'concate' merge needs d_inner divisible by scan_count: "
                                    f"d_inner {d} at width {width}, scan_count {m.scan_count}")
                    break
        if problems:
            raise ConfigError("; ".join(problems))
        return self

    def stage_widths(self):
        """Channel widths at which blocks run (each needs its own MHSSM shapes)."""
        if self.name == "eamambasr":
            return (self.dim,)
        return (self.dim, 2 * self.dim, 4 * self.dim, 8 * self.dim)


def denoise_config(**overrides):
    """The official gaussian colour denoising configuration (configs/denoise-eamamba.yaml)."""
    base = ModelConfig()
    return dataclasses.replace(base, **overrides).validate() if overrides else base.validate()
