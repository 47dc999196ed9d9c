"""`python -m eamamba_ref.evaluate`: the documented name of the command in `eamamba_ref.apps.evaluate`."""
import sys

from eamamba_ref.apps.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
