"""EAMamba weights in and out: official ``.pth`` checkpoints (read without torch) and a converted ``.npz``.

Official checkpoints (the official ``train.py``) hold::

    {'model': {'name': 'eamamba' | 'eamambasr', 'args': {...}, 'sd': state_dict, 'sd_e': ema_state_dict},
     'optimizer': {...}, 'current_iter': int, 'state': uint8 tensor}

`load_state` returns ``(name, args, state_dict)`` from such a file, from a bare ``torch.save``d state
dict, or from a converted file. The converted format is a plain NumPy ``.npz`` (readable with
``np.load(path, allow_pickle=False)``, so no pickle is involved at all): one array per state-dict
entry under its official name, plus a JSON header under ``__eamamba_ref__``::

    {"format_version": 1, "name": ..., "args": {...}, "meta": {...}}
"""

from __future__ import annotations

import json
import os
import zipfile
from typing import NamedTuple

import numpy as np

from .atomic import atomic_output
from .pth_reader import CheckpointError, LazyTensor, read_pth

__all__ = [
    "CheckpointError",
    "CheckpointExistsError",
    "ConvertedCheckpoint",
    "load_state",
    "save_converted",
    "load_converted",
    "FORMAT_VERSION",
    "HEADER_KEY",
]

FORMAT_VERSION = 1
HEADER_KEY = "__eamamba_ref__"
_WEIGHTS = {"ema": "sd_e", "raw": "sd"}


class CheckpointExistsError(CheckpointError, FileExistsError):
    """`save_converted` would overwrite an existing file (pass ``overwrite=True`` to allow it)."""


class ConvertedCheckpoint(NamedTuple):
    name: str | None
    args: dict | None
    state_dict: dict  # str -> np.ndarray
    meta: dict | None


def load_state(path, weights: str = "ema") -> tuple[str | None, dict | None, dict[str, np.ndarray]]:
    """Read ``(name, args, state_dict)`` from an official checkpoint, a bare state dict or a converted file.

    path:    an official ``.pth`` (``name``/``args`` from ``ckpt['model']``), a ``torch.save``d state
             dict (name and args are None), or a `save_converted` ``.npz`` (what it holds).
    weights: 'ema' -> ``ckpt['model']['sd_e']`` (what the official ``test.py`` evaluates) or
             'raw' -> ``ckpt['model']['sd']``. Ignored for bare and converted files. An official
             checkpoint always has both; a file without the requested one is an error (no silent
             fallback, since EMA and raw weights give different results): ask for the other one.

    Only the chosen state dict is read from disk (the other one and the optimizer state are not).
    Values are NumPy arrays: floating point ones as float32 (float16/bfloat16/float64 converted),
    integer and bool buffers unchanged. If *every* key starts with ``'module.'`` (a model saved
    wrapped in DataParallel/DistributedDataParallel/accelerate) the prefix is stripped.
    """
    if weights not in _WEIGHTS:
        raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}")
    if _is_converted(path):
        ck = load_converted(path)
        return ck.name, ck.args, _clean_state_dict(ck.state_dict, os.fspath(path))

    obj = read_pth(path, lazy=True)
    where = os.fspath(path)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict) and ({"sd", "sd_e"} & obj["model"].keys()):
        model = obj["model"]
        key = _WEIGHTS[weights]
        if key not in model:
            other = "raw" if weights == "ema" else "ema"
            raise CheckpointError(f"{where}: checkpoint has no '{key}' ({weights} weights); use weights={other!r}")
        name, args = model.get("name"), model.get("args")
        if not (name is None or isinstance(name, str)) or not (args is None or isinstance(args, dict)):
            raise CheckpointError(f"{where}: checkpoint['model'] has a malformed 'name' or 'args'")
        return name, args, _clean_state_dict(model[key], where)
    if isinstance(obj, dict) and obj and all(isinstance(v, LazyTensor) for v in obj.values()):
        return None, None, _clean_state_dict(obj, where)
    keys = sorted(map(str, obj))[:8] if isinstance(obj, dict) else type(obj).__name__
    raise CheckpointError(f"{where}: neither an official EAMamba checkpoint nor a bare state dict (top level: {keys})")


def _clean_state_dict(sd, where: str) -> dict[str, np.ndarray]:
    """Materialise ``sd`` as {str: array}, floats as float32, a global 'module.' prefix removed."""
    if not isinstance(sd, dict):
        raise CheckpointError(f"{where}: state dict is a {type(sd).__name__}, not a dict")
    strip = bool(sd) and all(isinstance(k, str) and k.startswith("module.") for k in sd)
    out = {}
    for key, value in sd.items():
        if not isinstance(key, str) or not isinstance(value, (LazyTensor, np.ndarray)):
            raise CheckpointError(f"{where}: state dict entry {key!r} is a {type(value).__name__}, not a tensor")
        arr = np.asarray(value)  # a LazyTensor is read from disk here, one at a time
        if arr.dtype.kind == "f":
            arr = arr.astype(np.float32, copy=False)
        out[key[len("module."):] if strip else key] = arr
    return out


# --------------------------------------------------------------------------------------------------
# Converted format


def save_converted(path, name, args, state_dict, meta=None, *, overwrite: bool = False) -> None:
    """Write ``state_dict`` (str -> array) and ``name``/``args``/``meta`` as a converted ``.npz``.

    Arrays are stored as given (dtype and shape) under their state-dict names; ``name`` (str or None),
    ``args`` and ``meta`` (JSON-serialisable; tuples come back as lists) go in the JSON header. The file
    is written next to ``path`` under a temporary name and moved into place, so ``path`` is either
    absent, the old file, or the complete new file -- never half written. An existing ``path`` is
    refused (`CheckpointExistsError`) unless ``overwrite=True``. The name is used as given (no '.npz'
    is appended).
    """
    path = os.fspath(path)
    if not (name is None or isinstance(name, str)):
        raise CheckpointError(f"name must be a str or None, got {type(name).__name__}")
    try:
        header = json.dumps({"format_version": FORMAT_VERSION, "name": name, "args": args, "meta": meta})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"args and meta must be JSON-serialisable: {e}") from None
    arrays = {}
    for key, value in state_dict.items():
        if not isinstance(key, str) or not key or key == HEADER_KEY:
            raise CheckpointError(f"invalid state dict key {key!r}")
        arr = np.asarray(value)
        if arr.dtype.hasobject:
            raise CheckpointError(f"state dict entry {key!r} is not a numeric array")
        arrays[key] = arr
    if not overwrite and os.path.lexists(path):
        raise CheckpointExistsError(f"{path} exists; pass overwrite=True to replace it")

    with atomic_output(path, overwrite, suffix=".tmp", error=CheckpointExistsError) as tmp:
        with open(tmp, "wb") as f:
            with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
                _write_npy(zf, HEADER_KEY, np.array(header))
                for key, arr in arrays.items():
                    _write_npy(zf, key, arr)
            f.flush()
            os.fsync(f.fileno())


def _write_npy(zf: zipfile.ZipFile, key: str, arr: np.ndarray) -> None:
    # What np.savez does, minus its keyword-argument API (a key named 'file' would clash with it).
    with zf.open(key + ".npy", "w", force_zip64=True) as f:
        np.lib.format.write_array(f, arr, allow_pickle=False)


def load_converted(path) -> ConvertedCheckpoint:
    """Read a `save_converted` file (with ``allow_pickle=False``: no code can run)."""
    where = os.fspath(path)
    if not _is_converted(path):
        raise CheckpointError(f"{where}: not an eamamba_ref converted .npz file (no {HEADER_KEY} entry)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            header = json.loads(str(npz[HEADER_KEY][()]))
            if not isinstance(header, dict) or header.get("format_version") != FORMAT_VERSION:
                raise CheckpointError(f"{where}: unsupported converted format header {str(header)[:80]}")
            state_dict = {key: npz[key] for key in npz.files if key != HEADER_KEY}
    except CheckpointError:
        raise
    except Exception as e:  # bad zip, bad .npy header, object arrays, bad JSON...
        raise CheckpointError(f"{where}: corrupt converted file ({type(e).__name__}: {e})") from None
    return ConvertedCheckpoint(header.get("name"), header.get("args"), state_dict, header.get("meta"))


def _is_converted(path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            return HEADER_KEY + ".npy" in zf.namelist()
    except zipfile.BadZipFile:
        return False
