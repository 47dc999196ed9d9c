"""From a checkpoint file to a ready model: `load(path)`.

The architecture comes from the checkpoint's `args` (official `.pth` or converted `.npz`) and is
checked against the state dict's keys and shapes; for a bare state dict it is inferred from the
keys and shapes (the scan ordering is the one thing weights cannot tell: it defaults to the
'diagonal' of every released checkpoint and can be given).

Nothing a file declares is trusted before it is checked: the config's types and sizes (`ModelConfig`),
then every tensor's name, shape and dtype against that architecture, then what reading the bytes will
cost -- and only then are the weights read (and refused if they hold NaN/Inf). Every failure is one
`CheckpointError` line.
"""
from __future__ import annotations

import math
import re

import numpy as np

from eamamba_ref.io.checkpoint import CheckpointError, open_state, read_tensors
from eamamba_ref.io.config import ConfigError, MambaConfig, ModelConfig
from eamamba_ref.runtime.model import EAMamba
from eamamba_ref.reference.parameters import parameter_shapes
from eamamba_ref.io.untrusted import brief, clip

# The largest architecture a checkpoint may describe: 10x the official denoising model's 25.3 M.
MAX_PARAMETERS = 256 * 2**20


def _unusable_upsample_keys(name, sd, notes):
    """Drop `upsample.*` of an EAMamba U-Net: the official class builds it with its default
    upscale=2 but can never run it (FACTS; upstream issue 4), so its weights carry no information."""
    if name != "eamamba":
        return sd
    dropped = sorted(k for k in sd if k.startswith("upsample."))
    if dropped:
        notes.append(f"ignored {len(dropped)} unusable 'upsample.*' tensors (the official EAMamba "
                     f"default upscale=2 builds them but cannot run them; restoration runs at upscale 1)")
        sd = {k: v for k, v in sd.items() if not k.startswith("upsample.")}
    return sd


def infer_config(sd, scan_type="diagonal"):
    """Rebuild a `ModelConfig` from a bare state dict's keys and shapes (scan_type cannot be inferred).

    sd: {name: array or lazy tensor} (only ``.shape`` and ``.ndim`` are used, nothing is read)."""
    try:
        return _infer_config(sd, scan_type)
    except (CheckpointError, ConfigError):
        raise
    except (KeyError, IndexError, ValueError, TypeError, ZeroDivisionError) as err:
        # a tensor missing, or of a rank/shape no EAMamba layer has
        raise CheckpointError(f"state dict does not look like an EAMamba model ({type(err).__name__}: "
                              f"{clip(err)})") from None


def _infer_config(sd, scan_type):
    def count(prefix):
        idx = {int(m.group(1)) for k in sd for m in [re.match(re.escape(prefix) + r"\.(\d+)\.", k)] if m}
        return max(idx) + 1 if idx else 0

    if "patch_embed.proj.weight" in sd:
        name, first = "eamamba", "encoder_level1.0"
        dim, inp = sd["patch_embed.proj.weight"].shape[:2]
    elif "conv_first.weight" in sd:
        name, first = "eamambasr", "layers.0.blocks.0"
        dim, inp = sd["conv_first.weight"].shape[:2]
    else:
        raise CheckpointError("state dict is not an EAMamba/EAMambaSR model (no patch_embed.proj or conv_first)")
    m = f"{first}.mamba."
    if m + "A_logs" not in sd:
        raise CheckpointError(f"state dict has no {m}A_logs: not an EAMamba model with MHSSM blocks")
    K, r_2n, _ = sd[m + "x_proj_weight"].shape
    rows, N = sd[m + "A_logs"].shape
    d = sd[m + "out_norm.weight"].shape[0]
    conv_w = sd[m + "conv.weight"]
    mamba = MambaConfig(
        scan_type=scan_type, scan_count=K, scan_merge_method="concate" if rows == d else "add",
        disable_z_branch=sd[m + "in_proj.weight"].shape[0] == d, d_state=N, d_conv=conv_w.shape[-1],
        expand=d / dim if d % dim else d // dim, conv_2d=conv_w.ndim == 4,
        # 'auto' = ceil(d_model/16) grows with the stage width; a fixed integer does not
        dt_rank="auto" if r_2n - 2 * N == -(-int(dim) // 16) else int(r_2n - 2 * N),
        conv_bias=m + "conv.bias" in sd, bias=m + "in_proj.bias" in sd)
    f_in = sd[f"{first}.ffn.project_in.weight"].shape[0] if f"{first}.ffn.project_in.weight" in sd else None
    if f"{first}.ffn.ca.1.weight" in sd:
        mixer, factor = "cca", 2.0
    elif f"{first}.ffn.dwconv.weight" in sd:
        mixer, factor = "gdfn", f_in / 2 / dim
    elif sd[f"{first}.ffn.project_out.weight"].shape[1] * 2 == f_in:
        mixer, factor = "simple", f_in / dim
    else:
        mixer, factor = "ffn", f_in / dim
    common = dict(inp_channels=int(inp), dim=int(dim), channel_mixer_type=mixer, ffn_expansion_factor=factor,
                  layernorm_type="WithBias" if f"{first}.norm1.body.bias" in sd else "BiasFree", mamba=mamba)
    if name == "eamamba":
        cfg = ModelConfig(name=name, out_channels=int(sd["output.weight"].shape[0]),
                          num_blocks=tuple(count(p) for p in ("encoder_level1", "encoder_level2",
                                                              "encoder_level3", "latent")),
                          num_refinement_blocks=count("refinement"), bias="reduce_chan_level3.bias" in sd,
                          dual_pixel_task="skip_conv.weight" in sd, **common)
    else:
        ups = [sd[k].shape[0] // dim for k in sd if re.fullmatch(r"upsample\.\d+\.weight", k)]
        scale = 3 if ups == [9] else 2 ** len(ups)
        cfg = ModelConfig(name=name, out_channels=int(sd["conv_last.weight"].shape[0]), upscale=scale,
                          num_blocks=tuple(count(f"layers.{g}.blocks") for g in range(count("layers"))),
                          bias="conv_first.bias" in sd, num_refinement_blocks=0, **common)
    return cfg.validate()


def check_state_dict(cfg, sd, source=""):
    """The state dict must hold exactly the model's parameters with the model's shapes, as floating
    point numbers. Only declared shapes and dtypes are looked at (lazy tensors are not read).
    Returns the architecture's shapes {name: shape}."""
    where = f"{source}: " if source else ""
    # cfg passed ModelConfig.validate, whose LIMITS (e.g. <= 64 blocks per level) keep this listing
    # small: a config asking for 100,000,000 blocks never gets here.
    expected = parameter_shapes(cfg)
    total = sum(math.prod(shape) for shape in expected.values())
    if total > MAX_PARAMETERS:
        raise CheckpointError(f"{where}its config describes a model of {total:,} parameters "
                              f"(at most {MAX_PARAMETERS:,} supported)")
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(brief(k) for k in unexpected[:3])})")
        raise CheckpointError(f"{where}weights do not match the {cfg.name} architecture of its config: "
                              + "; ".join(parts))
    for k, shape in expected.items():
        if tuple(sd[k].shape) != tuple(shape):
            raise CheckpointError(f"{where}weights do not match the config: {k} has shape "
                                  f"{brief(tuple(sd[k].shape))}, the architecture needs {tuple(shape)}")
        if sd[k].dtype.kind != "f":
            raise CheckpointError(f"{where}weight {k} has dtype {brief(str(sd[k].dtype))[1:-1]}; "
                                  "EAMamba weights are floating point")
    return expected


def load(path, weights="ema", backend=None, scan_type=None, return_info=False):
    """A ready `EAMamba` model from an official `.pth`, a bare state dict `.pth` or a converted `.npz`.

    weights: 'ema' (the official test script's choice) or 'raw'. scan_type: only for bare state
    dicts (default 'diagonal'); official and converted files carry their own. With
    `return_info=True`, also returns a dict describing what was found (architecture, notes, and the
    converted file's ``meta``, whose ``task`` `eamamba_ref.apps.tasks.check_task` compares with a task).
    Any problem with the file is a one-line `CheckpointError`.
    """
    source = str(path)
    state = open_state(path, weights)
    name, args, sd = state.name, state.args, state.tensors
    notes = []
    if name is None and args is None:
        try:
            cfg = infer_config(sd, scan_type or "diagonal")
        except ConfigError as err:
            raise CheckpointError(f"{source}: the architecture its tensors describe is not usable: {err}") from None
        notes.append("bare state dict: architecture inferred from tensor shapes; scan ordering "
                     f"{cfg.mamba.scan_type!r} {'given' if scan_type else 'assumed (cannot be inferred)'}")
    else:
        if scan_type is not None:
            notes.append("scan_type argument ignored: the checkpoint's args give it")
        upscale = args.get("upscale", 1) if isinstance(args, dict) else 1
        if name == "eamamba" and not (type(upscale) is int and upscale == 1):
            notes.append(f"args upscale={brief(upscale)} ignored: the EAMamba U-Net only runs at upscale 1")
            args = {k: v for k, v in args.items() if k != "upscale"}
        try:
            cfg = ModelConfig.from_args(name, args)
        except ConfigError as err:
            raise CheckpointError(f"{source}: unusable model config in checkpoint: {err}") from None
    sd = _unusable_upsample_keys(cfg.name, sd, notes)
    expected = check_state_dict(cfg, sd, source)
    # Shapes match the architecture; reading may allocate at most its float64 size (the widest dtype).
    need = 8 * sum(math.prod(shape) for shape in expected.values())
    params = {k: np.ascontiguousarray(v) for k, v in read_tensors(sd, source, max_bytes=need).items()}
    model = EAMamba(cfg, params, backend=backend)
    if return_info:
        return model, {"name": cfg.name, "config": cfg, "kind": state.kind,
                       "weights": weights if state.kind == "official" else "as stored",
                       "num_params": model.num_params, "notes": notes, "meta": state.meta}
    return model
