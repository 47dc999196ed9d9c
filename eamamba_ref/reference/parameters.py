"""The official state dict of a model: every parameter's name and shape, and a random initialisation.

`parameter_shapes(cfg)` lists what a checkpoint of the configuration (`io.config.ModelConfig`) must
hold, in the official order; the loader checks checkpoints against it. `init_params` draws random
parameters of those shapes, distributed like a real model's (for tests, benchmarks and demos).
"""
from __future__ import annotations

import numpy as np


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


def _block_shapes(prefix, dim, cfg):
    f = cfg.ffn_expansion_factor
    bias = cfg.bias
    shapes = {f"{prefix}.norm1.body.weight": (dim,), f"{prefix}.norm2.body.weight": (dim,)}
    if cfg.layernorm_type == "WithBias":
        shapes[f"{prefix}.norm1.body.bias"] = (dim,)
        shapes[f"{prefix}.norm2.body.bias"] = (dim,)
    for name, shape in mhssm_parameter_shapes(dim, cfg.mamba).items():
        shapes[f"{prefix}.mamba.{name}"] = shape
    convs = {   # name -> (out, in_per_group, k)
        "simple": {"project_in": (int(dim * f), dim, 1), "project_out": (dim, int(dim * f) // 2, 1)},
        "gdfn": {"project_in": (2 * int(dim * f), dim, 1), "dwconv": (2 * int(dim * f), 1, 3),
                 "project_out": (dim, int(dim * f), 1)},
        "ffn": {"project_in": (int(dim * f), dim, 1), "project_out": (dim, int(dim * f), 1)},
        "cca": {"conv1": (dim, dim, 1), "conv2": (dim, 1, 3), "ca.1": (dim, dim, 1),
                "ca.3": (dim, dim, 1), "conv3": (dim, dim, 1)},
    }[cfg.channel_mixer_type]
    for name, (o, i, k) in convs.items():
        shapes[f"{prefix}.ffn.{name}.weight"] = (o, i, k, k)
        if bias:
            shapes[f"{prefix}.ffn.{name}.bias"] = (o,)
    return shapes


def _conv_shape(shapes, name, out, inp, k, bias):
    shapes[f"{name}.weight"] = (out, inp, k, k)
    if bias:
        shapes[f"{name}.bias"] = (out,)


def parameter_shapes(cfg):
    """Every official state-dict name of the model -> its shape, in the official order."""
    c = cfg.dim
    shapes = {}
    if cfg.name == "eamamba":
        _conv_shape(shapes, "patch_embed.proj", c, cfg.inp_channels, 3, False)
        widths = {"encoder_level1": c, "encoder_level2": 2 * c, "encoder_level3": 4 * c, "latent": 8 * c}
        counts = dict(zip(widths, cfg.num_blocks))

        def add_blocks(prefix, n, dim):
            for i in range(n):
                shapes.update(_block_shapes(f"{prefix}.{i}", dim, cfg))

        add_blocks("encoder_level1", counts["encoder_level1"], c)
        _conv_shape(shapes, "down1_2.body.0", c // 2, c, 3, False)
        add_blocks("encoder_level2", counts["encoder_level2"], 2 * c)
        _conv_shape(shapes, "down2_3.body.0", c, 2 * c, 3, False)
        add_blocks("encoder_level3", counts["encoder_level3"], 4 * c)
        _conv_shape(shapes, "down3_4.body.0", 2 * c, 4 * c, 3, False)
        add_blocks("latent", counts["latent"], 8 * c)
        _conv_shape(shapes, "up4_3.body.0", 16 * c, 8 * c, 3, False)
        _conv_shape(shapes, "reduce_chan_level3", 4 * c, 8 * c, 1, cfg.bias)
        add_blocks("decoder_level3", counts["encoder_level3"], 4 * c)
        _conv_shape(shapes, "up3_2.body.0", 8 * c, 4 * c, 3, False)
        _conv_shape(shapes, "reduce_chan_level2", 2 * c, 4 * c, 1, cfg.bias)
        add_blocks("decoder_level2", counts["encoder_level2"], 2 * c)
        _conv_shape(shapes, "up2_1.body.0", 4 * c, 2 * c, 3, False)
        add_blocks("decoder_level1", counts["encoder_level1"], 2 * c)
        add_blocks("refinement", cfg.num_refinement_blocks, 2 * c)
        if cfg.dual_pixel_task:
            _conv_shape(shapes, "skip_conv", 2 * c, c, 1, cfg.bias)
        _conv_shape(shapes, "output", cfg.out_channels, 2 * c, 3, cfg.bias)
        return shapes

    _conv_shape(shapes, "conv_first", c, cfg.inp_channels, 3, cfg.bias)
    for g, n in enumerate(cfg.num_blocks):
        for i in range(n):
            shapes.update(_block_shapes(f"layers.{g}.blocks.{i}", c, cfg))
        _conv_shape(shapes, f"layers.{g}.conv", c, c, 3, True)
    shapes["norm.body.weight"] = (c,)
    if cfg.layernorm_type == "WithBias":
        shapes["norm.body.bias"] = (c,)
    _conv_shape(shapes, "conv_after_body", c, c, 3, cfg.bias)
    _conv_shape(shapes, "conv_before_upsample.0", c, c, 3, True)
    s = cfg.upscale
    steps = [2] * (s.bit_length() - 1) if s & (s - 1) == 0 else [3]
    for i, r in enumerate(steps):
        _conv_shape(shapes, f"upsample.{2 * i}", r * r * c, c, 3, True)
    _conv_shape(shapes, "conv_last", cfg.out_channels, c, 3, cfg.bias)
    return shapes


def init_params(cfg, seed=0):
    """Random parameters shaped like the official model (for tests, benchmarks and demos).

    Weights ~ N(0, 1/fan_in) scaled down, norms at identity, and the SSM parameters initialised as
    the official code does (A_log = log(1..N) per channel, D = 1, dt bias = softplus^-1 of dt drawn
    log-uniformly in [1e-3, 1e-1]) so that activations and scan dynamics look like a real model's.
    """
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in parameter_shapes(cfg).items():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "A_logs":
            value = np.log(np.broadcast_to(np.arange(1, shape[1] + 1, dtype=np.float32), shape))
        elif leaf == "Ds":
            value = np.ones(shape)
        elif leaf == "dt_projs_bias":
            dt = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), shape)).clip(min=1e-4)
            value = dt + np.log(-np.expm1(-dt))
        elif name.endswith(".body.weight") or name.endswith("out_norm.weight"):   # LayerNorms
            value = np.ones(shape)
        elif name.endswith(".body.bias") or name.endswith("out_norm.bias") or leaf == "bias":
            value = np.zeros(shape) if "norm" in name else rng.uniform(-0.02, 0.02, shape)
        else:
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
            value = rng.standard_normal(shape) / np.sqrt(fan_in)
        params[name] = np.ascontiguousarray(value, dtype=np.float32)
    return params
