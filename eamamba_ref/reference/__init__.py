"""The reference: EAMamba's forward pass in NumPy, written to be read.

Read in this order: `scans` (the all-around orderings), `ssm` (the selective scan), `layers`
(convolutions, norms, activations), `mhssm` (the Multi-Head Selective Scan Module), `model` (the
U-Net and the SR network). Nothing here knows about threads, kernels or devices.
"""
