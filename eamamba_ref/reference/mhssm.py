"""The Multi-Head Selective Scan Module (MHSSM; official `ExtendedMamba`, models/module/mamba.py).

Glossary (paper symbol -> official parameter name -> shape, for d_model C, d = expand*C inner
channels, K scan directions, C' channels per direction, N = d_state, R = dt_rank):

    in_proj       W_in               in_proj.weight        (2d, C)   [(d, C) without the z branch]
    depthwise conv                   conv.weight, conv.bias (d, 1, k, k) 2-D  |  (d, 1, k) causal 1-D
    x_proj        W_x (per head)     x_proj_weight         (K, R + 2N, C')
    dt_proj       W_Delta (per head) dt_projs_weight       (K, C', R), dt_projs_bias (K, C')
    A = -exp(A_log)                  A_logs                (K*C', N)
    D (skip)                         Ds                    (K*C',)
    output norm                      out_norm.weight/bias  (d,)
    out_proj                         out_proj.weight       (C, d)

'concate' merge: C' = d/K (the heads share the d channels: same cost as one scan);
'add' merge:     C' = d   (every direction sees every channel: K times the cost).

The official module takes tokens `(B, L, C)`; here activations stay channel-first `(B, C, L)`, the
layout the projections' matrix products want, which saves two transposes per block.
"""
from __future__ import annotations

import numpy as np

from eamamba_ref.runtime import ops, backends as ssm
from eamamba_ref.reference import scans
from eamamba_ref.kernels.cpu import fused
from eamamba_ref.runtime.trace import traced


def depthwise_conv(x, weight, bias, size, conv_2d):
    """The depthwise conv of the MHSSM on `x (B, d, L)` of an (H, W) map -> `(B, d, L)`.

    conv_2d: a k x k conv over the map with 'same' zero padding (k odd).
    else:    the causal 1-D conv of Mamba over the row-major sequence: the official Conv1d pads
             k-1 zeros on both sides and keeps the first L outputs, so output t sees x[t-k+1 .. t].
             Written here as a 1 x k conv of the (B, d, 1, L) "image" with the same padding.
    """
    B, d, L = x.shape
    y = conv_module(x, weight, bias, size, conv_2d)
    if conv_2d:
        return y.reshape(B, d, L)
    return ops.contiguous(y[:, :, :L])


@traced("conv")
def conv_module(x, weight, bias, size, conv_2d):
    """What the official `conv` module outputs for `x (B, d, L)`: `(B, d, H, W)` for the 2-D conv,
    `(B, d, L + k - 1)` for the 1-D one (before the causal trim to L)."""
    B, d, L = x.shape
    k = weight.shape[-1]
    if conv_2d:
        h, w = size
        return ops.conv2d(x.reshape(B, d, h, w), weight, bias, padding=(k - 1) // 2, groups=d)
    y = ops.conv2d(x.reshape(B, d, 1, L), weight.reshape(d, 1, 1, k), bias, padding=(0, k - 1), groups=d)
    return y.reshape(B, d, L + k - 1)


def _linear(p, name, x):
    """nn.Linear `name` over the channels of `x (B, C, L)`: weight `(O, C)`, optional bias -> `(B, O, L)`."""
    out = ops.matmul(p[f"{name}.weight"], x)
    if f"{name}.bias" in p:
        out = out + p[f"{name}.bias"][:, None]
    return out


# The stages of the plain composition, each recorded under its name while a trace is recording.
@traced("in_proj")
def in_projection(p, x):
    """in_proj on `x (B, C, L)` -> `(B, 2d, L)` (x then z; `(B, d, L)` without the z branch)."""
    return _linear(p, "in_proj", x)


@traced("x_proj")
def x_projection(weight, xs):
    """Per-direction x_proj: `(K, R + 2N, C')` on `(B, K, C', L)` -> `(B, K, R + 2N, L)`."""
    return ops.matmul(weight, xs)


@traced("dt_proj")
def dt_projection(weight, dt_in):
    """Per-direction dt_proj (before its bias): `(K, C', R)` on `(B, K, R, L)` -> `(B, K, C', L)`."""
    return ops.matmul(weight, dt_in)


@traced("gate")
def gate(y, z):
    """`y * silu(z)`, both `(B, d, L)`."""
    return y * ops.silu(z)


@traced("out_proj")
def out_projection(p, y):
    """out_proj on `y (B, d, L)` -> `(B, C, L)`."""
    return _linear(p, "out_proj", y)


activation = traced("act")(ops.silu)
all_around = traced("all_around")(ops.all_around)
selective_scan = traced("selective_scan")(ops.selective_scan)
restore = traced("restore")(ops.restore)
out_norm = traced("out_norm")(ops.layer_norm)


@traced("mamba", scope="mamba")
def mhssm(p, x, size, cfg, backend=None):
    """MHSSM forward. p: the block's `mamba.*` parameters (official names, prefix stripped).

    x: `(B, C, L)` layer-normed features of an (H, W) map, channel-first, L = H*W.
    cfg: `config.MambaConfig`. Returns `(B, C, L)`. A trace records the output as `mamba` and the
    stages inside as `mamba.in_proj`, `mamba.conv`, `mamba.act`, ... (the fused kernels record
    the same stages: `ssm/fused.py`).
    """
    if _fused(x, cfg, backend):
        return fused.mhssm_numba(p, x, size, cfg)
    B, C, L = x.shape
    d = cfg.d_inner(C)
    N = cfg.d_state
    R = cfg.resolved_dt_rank(C)
    K, Cp = cfg.heads(C)
    kind = (cfg.scan_type, cfg.scan_count, cfg.scan_merge_method)

    # 1. input projection and the gate branch: (B, C, L) -> x (B, d, L), z (B, d, L)
    xz = in_projection(p, x)
    xs, z = (xz, None) if cfg.disable_z_branch else (xz[:, :d], xz[:, d:])

    # 2. local mixing: depthwise conv then SiLU
    xs = activation(depthwise_conv(xs, p["conv.weight"], p.get("conv.bias"), size, cfg.conv_2d))

    # 3. all-around transform: K directional sequences (B, K, C', L)
    xs = all_around(xs, size, *kind)

    # 4. input-dependent SSM parameters, per direction (the "selective" part)
    x_dbl = x_projection(p["x_proj_weight"], xs)                      # (B, K, R + 2N, L)
    dts = dt_projection(p["dt_projs_weight"], x_dbl[:, :, :R])         # (B, K, C', L)
    Bs = ops.contiguous(x_dbl[:, :, R:R + N])                  # (B, K, N, L): group k = head k
    Cs = ops.contiguous(x_dbl[:, :, R + N:])                   # (B, K, N, L)
    A = -ops.exp(p["A_logs"])                                         # (K*C', N)

    # 5. one selective scan over all K*C' channels; channel j belongs to head j // C'
    y = selective_scan(xs.reshape(B, K * Cp, L), dts.reshape(B, K * Cp, L), A, Bs, Cs,
                       D=p["Ds"], delta_bias=p["dt_projs_bias"].reshape(-1),
                       delta_softplus=True, backend=backend)         # (B, K*C', L)

    # 6. back to row-major order, merge directions, normalise, gate, project out
    y = restore(y.reshape(B, K, Cp, L), size, *kind)                  # (B, d, L)
    y = out_norm(y, p["out_norm.weight"], p["out_norm.bias"], eps=1e-5, axis=1)
    if z is not None:
        y = gate(y, z)
    return out_projection(p, y)                                       # (B, C, L)


def _fused(x, cfg, backend):
    """The one place where the backend changes the MHSSM: 'numba' runs the fused kernels of
    `ssm.fused` (same function, no directional copies), which need heads owning separate channels
    ('concate' merge, or one direction) and the 2-D conv. A trace records the same stages on
    either path, so recording changes nothing here."""
    return (ssm.resolve_backend(backend) == "numba" and isinstance(x, np.ndarray) and cfg.conv_2d
            and (cfg.scan_merge_method == "concate" or cfg.scan_count == 1))


def mhssm_parameter_shapes(d_model, cfg):
    """Official state-dict names and shapes of one MHSSM, for checking checkpoints and random init."""
    d = cfg.d_inner(d_model)
    N = cfg.d_state
    R = cfg.resolved_dt_rank(d_model)
    K, Cp = cfg.heads(d_model)
    k = cfg.d_conv
    shapes = {
        "in_proj.weight": (d if cfg.disable_z_branch else 2 * d, d_model),
        "conv.weight": (d, 1, k, k) if cfg.conv_2d else (d, 1, k),
        "x_proj_weight": (K, R + 2 * N, Cp),
        "dt_projs_weight": (K, Cp, R),
        "dt_projs_bias": (K, Cp),
        "A_logs": (K * Cp, N),
        "Ds": (K * Cp,),
        "out_norm.weight": (d,),
        "out_norm.bias": (d,),
        "out_proj.weight": (d_model, d),
    }
    if cfg.conv_bias:
        shapes["conv.bias"] = (d,)
    if cfg.bias:
        shapes["in_proj.bias"] = (shapes["in_proj.weight"][0],)
        shapes["out_proj.bias"] = (d_model,)
    return shapes
