"""PyTorch reference of EAMamba: an independent re-implementation of the official model.

This subpackage is the oracle the NumPy implementation is checked against, so it imports nothing
from the rest of ``eamamba_ref`` and nothing beyond torch and numpy. Parameter names, shapes,
initialisation and the forward pass follow the official code (github daidaijr/EAMamba, commit
ec13c77), with mamba_ssm's CUDA selective scan replaced by a pure-torch one of the same semantics.

    from eamamba_ref.pytorch import EAMamba, build_from_args, load_official_checkpoint
"""

from eamamba_ref.pytorch.checkpoint import (DEFAULT_OPTIMIZER_ARGS, MODEL_CLASSES, build_from_args,
                                            load_official_checkpoint, save_official_checkpoint)
from eamamba_ref.pytorch.mamba import ExtendedMamba
from eamamba_ref.pytorch.model import (DEFAULT_MAMBA_CFG, EAMamba, EAMambaSR, LayerNorm,
                                       MambaFormerBlock)
from eamamba_ref.pytorch.scan import (MERGE_METHODS, SCAN_COUNTS, SCAN_TYPES, ScanTransform,
                                      direction_orders, scan_order)
from eamamba_ref.pytorch.selective_scan import (DEFAULT_CHUNK_SIZE, SCAN_MODES, flush_denormals,
                                                get_scan_mode, selective_scan, set_scan_mode)

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_MAMBA_CFG",
    "DEFAULT_OPTIMIZER_ARGS",
    "EAMamba",
    "EAMambaSR",
    "ExtendedMamba",
    "LayerNorm",
    "MambaFormerBlock",
    "MERGE_METHODS",
    "MODEL_CLASSES",
    "SCAN_COUNTS",
    "SCAN_MODES",
    "SCAN_TYPES",
    "ScanTransform",
    "build_from_args",
    "direction_orders",
    "flush_denormals",
    "get_scan_mode",
    "load_official_checkpoint",
    "save_official_checkpoint",
    "scan_order",
    "selective_scan",
    "set_scan_mode",
]
