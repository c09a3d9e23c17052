"""``python -m indivaid_field embed|match``: see :mod:`indivaid_field.cli`."""

import sys

from indivaid_field.cli import main

if __name__ == "__main__":
    sys.exit(main())
