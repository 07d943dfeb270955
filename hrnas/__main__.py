"""``python -m hrnas``: the ``hrnas`` command line."""

import sys

from .cli import main

sys.exit(main())
