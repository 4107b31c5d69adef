"""``python -m bandits``: see :mod:`bandits.cli`."""

import sys

from bandits.cli import main

sys.exit(main())
