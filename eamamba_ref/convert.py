"""`python -m eamamba_ref.convert`: the documented name of the command in `eamamba_ref.apps.convert`."""
import sys

from eamamba_ref.apps.convert import main

if __name__ == "__main__":
    sys.exit(main())
