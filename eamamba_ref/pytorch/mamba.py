"""MHSSM: the multi-head selective state-space module of EAMamba (official ``ExtendedMamba``).

Glossary (code name -> paper / shape), with d = d_inner = expand * d_model, K = scan_count heads,
d' = d / K channels per head for merge 'concate' (d' = d for 'add'), N = d_state, R = dt_rank:

    in_proj          Linear d_model -> 2d (x and the gate z; only x if disable_z_branch)
    conv             depthwise Conv2d (d_conv x d_conv, 'same') or causal Conv1d trimmed to L
    x_proj_weight    (K, R + 2N, d')  per head: x -> (dt_low_rank, B, C)
    dt_projs_weight  (K, d', R)       per head: dt_low_rank -> delta (before bias and softplus)
    dt_projs_bias    (K, d')          delta bias
    A_logs           (K d', N)        A = -exp(A_logs)
    Ds               (K d',)          skip term D
    out_norm         LayerNorm(d)     applied to the merged scan output, then * silu(z)
    out_proj         Linear d -> d_model

Data flow for tokens ``(B, L, d_model)`` of an ``H x W`` map: in_proj -> conv -> SiLU ->
all-around transform ``(B, K, d', L)`` -> per-head projections -> selective scan (B/C shared by the
d' channels of a head: one group per head) -> restore ``(B, d, L)`` -> out_norm -> gate -> out_proj.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from eamamba_ref.pytorch.scan import ScanTransform
from eamamba_ref.pytorch.selective_scan import selective_scan

__all__ = ["ExtendedMamba"]


class _Stage(nn.Identity):
    """A named point of the forward pass: returns its input, holds no parameter (the state dict is
    the official one). Forward hooks on it -- the oracle's -- see the MHSSM's inner stages, which
    are not modules in the official code, under the names eamamba_ref's trace gives them."""


class ExtendedMamba(nn.Module):
    """MHSSM with the official parameter names, shapes and initialisation.

    Args mirror the official constructor (unknown keyword arguments are ignored, like the
    official ``**kwargs``; ``use_checkpoint``, ``layer_idx``, ``device``, ``dtype`` included).
    """

    def __init__(
        self,
        d_model: int,
        scan_transform: ScanTransform,
        conv_2d: bool = False,
        disable_z_branch: bool = False,
        d_state: int = 16,
        d_conv: int = 4,
        expand: float = 2,
        dt_rank="auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        **ignored,
    ):
        super().__init__()
        if not isinstance(scan_transform, ScanTransform):
            raise ValueError("scan_transform must be a torch_ref.scan.ScanTransform")
        if conv_2d and d_conv % 2 == 0:
            # 'same' padding (d_conv - 1) // 2 only keeps H x W for odd kernels; the official
            # module builds but its forward fails on the shrunken map.
            raise ValueError(f"conv_2d needs an odd d_conv, got {d_conv}")
        if dt_init not in ("random", "constant"):
            raise ValueError(f"dt_init must be 'random' or 'constant', got {dt_init!r}")
        self.scan_transform = scan_transform
        self.scan_count = K = scan_transform.scan_count
        self.conv_2d = conv_2d
        self.disable_z_branch = disable_z_branch
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = d = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.d_head = d_head = scan_transform.heads_channels(d)   # raises if 'concate' can't split d

        # Modules are created in the official order so that a seeded model matches the official
        # one parameter for parameter (same RNG draws).
        self.in_proj = nn.Linear(d_model, d if disable_z_branch else 2 * d, bias=bias)
        if conv_2d:
            self.conv = nn.Conv2d(d, d, d_conv, padding=(d_conv - 1) // 2, groups=d, bias=conv_bias)
        else:
            # Causal: pad d_conv - 1 on both sides, keep the first L outputs.
            self.conv = nn.Conv1d(d, d, d_conv, padding=d_conv - 1, groups=d, bias=conv_bias)
        self.out_norm = nn.LayerNorm(d)
        self.out_proj = nn.Linear(d, d_model, bias=bias)

        # Per-head x projections, stacked: PyTorch's default Linear init for each head.
        x_proj = [nn.Linear(d_head, self.dt_rank + 2 * d_state, bias=False) for _ in range(K)]
        self.x_proj_weight = nn.Parameter(torch.stack([p.weight for p in x_proj]))  # (K, R+2N, d')

        dt_w, dt_b = zip(*(
            self._dt_init(self.dt_rank, d_head, dt_scale, dt_init, dt_min, dt_max, dt_init_floor)
            for _ in range(K)
        ))
        self.dt_projs_weight = nn.Parameter(torch.stack(dt_w))     # (K, d', R)
        self.dt_projs_bias = nn.Parameter(torch.stack(dt_b))       # (K, d')

        # S4D-real initialisation: A[:, n] = -(n + 1) for every channel of every head; D = 1.
        self.A_logs = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(K * d_head, 1))
        self.Ds = nn.Parameter(torch.ones(K * d_head))
        self.A_logs._no_weight_decay = True
        self.Ds._no_weight_decay = True

        # Trace points (identities), in forward order; layouts as in eamamba_ref's trace.
        self.act = _Stage()               # (B, d, L)       conv + SiLU
        self.all_around = _Stage()        # (B, K, d', L)   directional sequences
        self.x_proj = _Stage()            # (B, K, R+2N, L)
        self.dt_proj = _Stage()           # (B, K, d', L)   before the bias and softplus
        self.selective_scan = _Stage()    # (B, K d', L)
        self.restore = _Stage()           # (B, d, L)       back to row-major, heads merged
        self.gate = _Stage()              # (B, L, d)       out_norm * silu(z)

    @staticmethod
    def _dt_init(dt_rank, d_head, dt_scale, dt_init, dt_min, dt_max, dt_init_floor):
        """One head's delta projection: weight ``(d', R)``, bias ``(d',)``.

        The weight is uniform (or constant) with scale dt_scale / sqrt(R); the bias is
        softplus^-1(dt) for dt log-uniform in [dt_min, dt_max] (clamped below at dt_init_floor), so
        that softplus(bias) starts as a plausible step size.
        """
        proj = nn.Linear(dt_rank, d_head, bias=True)  # consumes the RNG like the official init
        std = dt_rank ** -0.5 * dt_scale
        with torch.no_grad():
            if dt_init == "constant":
                proj.weight.fill_(std)
            else:
                proj.weight.uniform_(-std, std)
            dt = torch.exp(
                torch.rand(d_head) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
            ).clamp(min=dt_init_floor)
            inv_softplus_dt = dt + torch.log(-torch.expm1(-dt))   # log(exp(dt) - 1), stably
            proj.bias.copy_(inv_softplus_dt)
        return proj.weight.detach(), proj.bias.detach()

    def forward(self, tokens: torch.Tensor, size) -> torch.Tensor:
        """``tokens (B, L, d_model)`` of an ``size = (H, W)`` map, row-major -> ``(B, L, d_model)``."""
        if tokens.dim() != 3 or tokens.shape[2] != self.d_model:
            raise ValueError(f"expected tokens (B, L, {self.d_model}), got {tuple(tokens.shape)}")
        H, W = (int(s) for s in size)
        Bsz, L, _ = tokens.shape
        if L != H * W:
            raise ValueError(f"token count {L} != H*W = {H}*{W}")
        K, d, dh, N, R = self.scan_count, self.d_inner, self.d_head, self.d_state, self.dt_rank

        xz = self.in_proj(tokens).transpose(1, 2)                 # (B, 2d | d, L)
        if self.disable_z_branch:
            x, z = xz, None
        else:
            x, z = xz.chunk(2, dim=1)                             # (B, d, L) each

        if self.conv_2d:
            x = self.conv(x.reshape(Bsz, d, H, W)).reshape(Bsz, d, L)
        else:
            x = self.conv(x)[..., :L]                             # causal along the raster order
        x = self.act(F.silu(x))

        xs = self.all_around(self.scan_transform.apply(x, (H, W)))        # (B, K, d', L)
        x_dbl = self.x_proj(torch.einsum("bkdl,kcd->bkcl", xs, self.x_proj_weight))   # (B, K, R+2N, L)
        dts, Bs, Cs = torch.split(x_dbl, [R, N, N], dim=2)
        dts = self.dt_proj(torch.einsum("bkrl,kdr->bkdl", dts, self.dt_projs_weight))  # (B, K, d', L)

        # The official code runs the scan in float32 (``.float()``); a float64 model stays float64
        # here so that it can serve as a float64 golden.
        f = torch.promote_types(xs.dtype, torch.float32)
        y = selective_scan(
            xs.reshape(Bsz, K * dh, L).to(f),                     # u      (B, K d', L)
            dts.reshape(Bsz, K * dh, L).to(f),                    # delta  (B, K d', L)
            -torch.exp(self.A_logs.to(f)),                        # A      (K d', N)
            Bs.to(f),                                             # B      (B, K, N, L): group = head
            Cs.to(f),                                             # C      (B, K, N, L)
            self.Ds.to(f),
            z=None,                                               # the gate comes after out_norm
            delta_bias=self.dt_projs_bias.to(f).reshape(-1),
            delta_softplus=True,
        )
        y = self.selective_scan(y).reshape(Bsz, K, dh, L)

        y = self.restore(self.scan_transform.restore(y, (H, W))).transpose(1, 2)   # (B, L, d)
        y = self.out_norm(y)
        if z is not None:
            y = self.gate(y * F.silu(z.transpose(1, 2)))
        return self.out_proj(y)                                   # (B, L, d_model)
