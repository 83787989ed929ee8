"""``python -m nasquant.cli``: the same as the ``nasquant`` command."""

import sys

from nasquant.cli import main

sys.exit(main())
