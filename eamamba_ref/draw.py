"""`python -m eamamba_ref.draw`: the documented name of the command in `eamamba_ref.apps.draw`."""
import sys

from eamamba_ref.apps.draw import main

if __name__ == "__main__":
    sys.exit(main())
