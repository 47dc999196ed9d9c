"""Test-suite configuration.

Hypothesis runs derandomized: every run (a developer's, CI's) draws the same examples, so a test
that passes here passes in CI. Random exploration is still worth doing now and then: run
`python -m pytest --hypothesis-profile=default` and pin what it finds with @example (or fix it).
"""
import eamamba_ref  # noqa: F401  (before NumPy: it makes OpenBLAS's idle threads sleep, see its __init__)
from hypothesis import settings

settings.register_profile("deterministic", derandomize=True, print_blob=True)
settings.load_profile("deterministic")
