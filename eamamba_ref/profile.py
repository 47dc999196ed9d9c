"""`python -m eamamba_ref.profile`: the documented name of the command in `eamamba_ref.apps.profile`."""
import sys

from eamamba_ref.apps.profile import main

if __name__ == "__main__":
    sys.exit(main())
