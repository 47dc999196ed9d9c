"""`python -m eamamba_ref.oracle`: the documented name of the command in `eamamba_ref.apps.oracle`."""
import sys

from eamamba_ref.apps.oracle import main

if __name__ == "__main__":
    sys.exit(main())
