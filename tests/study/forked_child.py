"""A command for tests/study/test_forked.py: ``python -m forked_child MARKER`` touches MARKER,
waits 3 s, prints a line and exits with status 7."""

import sys
import time
from pathlib import Path

Path(sys.argv[1]).touch()
time.sleep(3)
print("child says hi")
raise SystemExit(7)
