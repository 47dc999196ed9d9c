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

Every function takes `ops`, the table of functions the forward pass calls (`reference.ops`): with
`reference.ops.NUMPY` this file runs exactly the NumPy code of this folder.
"""
from __future__ import annotations

from eamamba_ref.reference.hooks import traced


def depthwise_conv(x, weight, bias, size, conv_2d, ops):
    """The depthwise conv of the MHSSM on `x (B, d, L)` of an (H, W) map -> `(B, d, L)`.

    conv_2d: a k x k conv over the map with 'same' zero padding (k odd).
    else:    the causal 1-D conv of Mamba over the row-major sequence: the official Conv1d pads
             k-1 zeros on both sides and keeps the first L outputs, so output t sees x[t-k+1 .. t].
             Written here as a 1 x k conv of the (B, d, 1, L) "image" with the same padding.
    """
    B, d, L = x.shape
    y = conv_module(x, weight, bias, size, conv_2d, ops)
    if conv_2d:
        return y.reshape(B, d, L)
    return ops.contiguous(y[:, :, :L])


@traced("conv")
def conv_module(x, weight, bias, size, conv_2d, ops):
    """What the official `conv` module outputs for `x (B, d, L)`: `(B, d, H, W)` for the 2-D conv,
    `(B, d, L + k - 1)` for the 1-D one (before the causal trim to L)."""
    B, d, L = x.shape
    k = weight.shape[-1]
    if conv_2d:
        h, w = size
        return ops.conv2d(x.reshape(B, d, h, w), weight, bias, padding=(k - 1) // 2, groups=d)
    y = ops.conv2d(x.reshape(B, d, 1, L), weight.reshape(d, 1, 1, k), bias, padding=(0, k - 1), groups=d)
    return y.reshape(B, d, L + k - 1)


def _linear(p, name, x, ops):
    """nn.Linear `name` over the channels of `x (B, C, L)`: weight `(O, C)`, optional bias -> `(B, O, L)`."""
    out = ops.matmul(p[f"{name}.weight"], x)
    if f"{name}.bias" in p:
        out = out + p[f"{name}.bias"][:, None]
    return out


# The stages of the module, each a boundary named after the official stage (reference.hooks).
@traced("in_proj")
def in_projection(p, x, ops):
    """in_proj on `x (B, C, L)` -> `(B, 2d, L)` (x then z; `(B, d, L)` without the z branch)."""
    return _linear(p, "in_proj", x, ops)


@traced("act")
def activation(x, ops):
    """SiLU after the depthwise conv, `(B, d, L)`."""
    return ops.silu(x)


@traced("all_around")
def all_around(x, size, kind, ops):
    """The all-around transform: `(B, d, L)` -> K directional sequences `(B, K, C', L)`."""
    return ops.all_around(x, size, *kind)


@traced("x_proj")
def x_projection(weight, xs, ops):
    """Per-direction x_proj: `(K, R + 2N, C')` on `(B, K, C', L)` -> `(B, K, R + 2N, L)`."""
    return ops.matmul(weight, xs)


@traced("dt_proj")
def dt_projection(weight, dt_in, ops):
    """Per-direction dt_proj (before its bias): `(K, C', R)` on `(B, K, R, L)` -> `(B, K, C', L)`."""
    return ops.matmul(weight, dt_in)


@traced("selective_scan")
def selective_scan(u, delta, A, B, C, D, delta_bias, ops):
    """The scan of every direction's channels: u, delta `(B, K*C', L)`, A `(K*C', N)`, B and C
    `(B, K, N, L)` (group k = head k), D and delta_bias `(K*C',)` -> `(B, K*C', L)`."""
    return ops.selective_scan(u, delta, A, B, C, D=D, delta_bias=delta_bias, delta_softplus=True)


@traced("restore")
def restore(y, size, kind, ops):
    """Back to row-major order and merged: `(B, K, C', L)` -> `(B, d, L)`."""
    return ops.restore(y, size, *kind)


@traced("out_norm")
def out_norm(y, weight, bias, ops):
    """LayerNorm over the channels of `y (B, d, L)`."""
    return ops.layer_norm(y, weight, bias, eps=1e-5, axis=1)


@traced("gate")
def gate(y, z, ops):
    """`y * silu(z)`, both `(B, d, L)`."""
    return y * ops.silu(z)


@traced("out_proj")
def out_projection(p, y, ops):
    """out_proj on `y (B, d, L)` -> `(B, C, L)`."""
    return _linear(p, "out_proj", y, ops)


@traced("mamba", scope="mamba")
def mhssm(p, x, size, cfg, ops):
    """MHSSM forward. p: the block's `mamba.*` parameters (official names, prefix stripped).

    x: `(B, C, L)` layer-normed features of an (H, W) map, channel-first, L = H*W.
    cfg: `io.config.MambaConfig`. Returns `(B, C, L)`. A trace records the output as `mamba` and
    the stages inside as `mamba.in_proj`, `mamba.conv`, `mamba.act`, ...
    """
    B, C, L = x.shape
    d = cfg.d_inner(C)
    N = cfg.d_state
    R = cfg.resolved_dt_rank(C)
    K, Cp = cfg.heads(C)
    kind = (cfg.scan_type, cfg.scan_count, cfg.scan_merge_method)

    # 1. input projection and the gate branch: (B, C, L) -> x (B, d, L), z (B, d, L)
    xz = in_projection(p, x, ops)
    xs, z = (xz, None) if cfg.disable_z_branch else (xz[:, :d], xz[:, d:])

    # 2. local mixing: depthwise conv then SiLU
    xs = activation(depthwise_conv(xs, p["conv.weight"], p.get("conv.bias"), size, cfg.conv_2d, ops), ops)

    # 3. all-around transform: K directional sequences (B, K, C', L)
    xs = all_around(xs, size, kind, ops)

    # 4. input-dependent SSM parameters, per direction (the "selective" part)
    x_dbl = x_projection(p["x_proj_weight"], xs, ops)                 # (B, K, R + 2N, L)
    dts = dt_projection(p["dt_projs_weight"], x_dbl[:, :, :R], ops)    # (B, K, C', L)
    Bs = ops.contiguous(x_dbl[:, :, R:R + N])                  # (B, K, N, L): group k = head k
    Cs = ops.contiguous(x_dbl[:, :, R + N:])                   # (B, K, N, L)
    A = -ops.exp(p["A_logs"])                                         # (K*C', N)

    # 5. one selective scan over all K*C' channels; channel j belongs to head j // C'
    y = selective_scan(xs.reshape(B, K * Cp, L), dts.reshape(B, K * Cp, L), A, Bs, Cs,
                       p["Ds"], p["dt_projs_bias"].reshape(-1), ops)   # (B, K*C', L)

    # 6. back to row-major order, merge directions, normalise, gate, project out
    y = restore(y.reshape(B, K, Cp, L), size, kind, ops)              # (B, d, L)
    y = out_norm(y, p["out_norm.weight"], p["out_norm.bias"], ops)
    if z is not None:
        y = gate(y, z, ops)
    return out_projection(p, y, ops)                                  # (B, C, L)
