"""Build models from official ``(name, args)`` specs; write and read checkpoints in the official layout.

The official ``train.py`` saves (``torch.save``, zip format)::

    {'model': {'name': 'eamamba' | 'eamambasr', 'args': {...}, 'sd': state_dict, 'sd_e': ema_state_dict},
     'optimizer': {'name': 'AdamW', 'args': {...}, 'sd': optimizer_state_dict},
     'current_iter': int,
     'state': torch.get_rng_state()}

Only tensors and plain containers, so ``torch.load(path, weights_only=True)`` reads it. ``args`` are
the YAML model args, which may hold keys the constructors ignore (``LayerNorm_type``, ``heads``,
``checkpoint_percentage``).
"""

from __future__ import annotations

import copy
import os

import torch
import torch.nn as nn

from eamamba_ref.pytorch.model import EAMamba, EAMambaSR

__all__ = [
    "MODEL_CLASSES",
    "DEFAULT_OPTIMIZER_ARGS",
    "build_from_args",
    "save_official_checkpoint",
    "load_official_checkpoint",
]

MODEL_CLASSES = {"eamamba": EAMamba, "eamambasr": EAMambaSR}

# The optimizer block of the released denoising config.
DEFAULT_OPTIMIZER_ARGS = {"lr": 3e-4, "weight_decay": 1e-4, "betas": [0.9, 0.999]}


def _model_class(name: str):
    key = name.lower() if isinstance(name, str) else name
    if key not in MODEL_CLASSES:
        raise ValueError(f"model name must be one of {sorted(MODEL_CLASSES)}, got {name!r}")
    return MODEL_CLASSES[key]


def build_from_args(name: str, args: dict) -> nn.Module:
    """The model an official ``{'name': name, 'args': args}`` spec describes (fresh random weights).

    Unknown keys in ``args`` are ignored, as by the official constructors. Wrap the call in
    ``with torch.device('meta'):`` to build without allocating (e.g. to count parameters).
    """
    if not isinstance(args, dict):
        raise ValueError(f"args must be a dict, got {type(args).__name__}")
    return _model_class(name)(**copy.deepcopy(args))


def _one_step_adamw_state(model: nn.Module, optimizer_args: dict) -> dict:
    """A real AdamW state dict after one step, taken on detached copies (the model is untouched).

    Gradients are zero, so the moments are zero; the structure (per-parameter 'step', 'exp_avg',
    'exp_avg_sq' and 'param_groups') is what a training run saves.
    """
    params = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = torch.optim.AdamW(params, **optimizer_args)
    opt.step()
    return opt.state_dict()


def save_official_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    name: str,
    args: dict,
    ema_state_dict: dict | None = None,
    *,
    optimizer_args: dict | None = None,
    optimizer_state_dict: dict | None = None,
    current_iter: int = 1,
) -> None:
    """Write ``model`` as an official training checkpoint (see the module docstring).

    ``ema_state_dict`` defaults to a copy of the model's weights; ``optimizer_state_dict`` to a
    real one-step AdamW state (about twice the model's size on disk).
    """
    _model_class(name)
    if not isinstance(args, dict):
        raise ValueError(f"args must be a dict, got {type(args).__name__}")
    sd = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    sd_e = dict(sd) if ema_state_dict is None else {k: v.detach().cpu().clone() for k, v in ema_state_dict.items()}
    if set(sd_e) != set(sd):
        raise ValueError("ema_state_dict must have the same keys as the model's state dict")
    optimizer_args = dict(DEFAULT_OPTIMIZER_ARGS if optimizer_args is None else optimizer_args)
    if optimizer_state_dict is None:
        optimizer_state_dict = _one_step_adamw_state(model, optimizer_args)
    checkpoint = {
        "model": {"name": name, "args": copy.deepcopy(args), "sd": sd, "sd_e": sd_e},
        "optimizer": {"name": "AdamW", "args": optimizer_args, "sd": optimizer_state_dict},
        "current_iter": int(current_iter),
        "state": torch.get_rng_state(),
    }
    torch.save(checkpoint, path)


def load_official_checkpoint(path: str | os.PathLike, use_ema: bool = True) -> nn.Module:
    """Build the model of an official checkpoint and load its weights (EMA ones by default, like
    the official ``test.py``); returns it in eval mode on the CPU.

    Reads with ``weights_only=True``. For 'eamamba', ``upsample.*`` weights are dropped: the official
    constructor builds that head at its default upscale=2 although no working forward pass uses it.
    """
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    try:
        spec = ckpt["model"]
        name, args = spec["name"], dict(spec["args"])
        sd = spec["sd_e" if use_ema else "sd"]
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not an official EAMamba checkpoint (missing {exc})") from None
    if name.lower() == "eamamba":
        if args.get("upscale", 1) not in (1, 2):
            raise ValueError(f"{path}: EAMamba with upscale={args['upscale']} cannot run")
        args.pop("upscale", None)
        sd = {k: v for k, v in sd.items() if not k.startswith("upsample.")}
    model = build_from_args(name, args)
    model.load_state_dict(sd, strict=True)
    return model.eval()
