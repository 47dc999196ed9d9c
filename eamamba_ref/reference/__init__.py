"""The reference: EAMamba's forward pass in NumPy, written to be read.

Read in this order: `scans` (the all-around orderings), `ssm` (the selective scan), `layers`
(convolutions, norms, activations), `mhssm` (the Multi-Head Selective Scan Module), `model` (the
U-Net and the SR network). `model` and `mhssm` call every operation through `ops`, a table of
functions (`ops.NUMPY`: the functions of this folder); `hooks` names the function boundaries a
trace records; `parameters` lists the official state-dict names and shapes. Nothing here knows
about threads, kernels or devices.
"""
