"""`python -m eamamba_ref.restore`: the documented name of the command in `eamamba_ref.apps.restore`."""
import sys

from eamamba_ref.apps.restore import main

if __name__ == "__main__":
    sys.exit(main())
