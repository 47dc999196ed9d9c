"""eamamba_ref: a framework-free reference implementation of EAMamba (Lin et al., ICCV 2025)."""

__version__ = "0.1.0"
