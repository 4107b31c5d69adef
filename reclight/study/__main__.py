"""``python -m reclight.study``: the same as ``reclight study`` (:mod:`reclight.study.cli`)."""

import sys

from reclight.study.cli import main

sys.exit(main())
