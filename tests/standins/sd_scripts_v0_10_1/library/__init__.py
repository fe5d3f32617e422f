"""Stand-in of sd-scripts v0.10.1's `library` package (tests only; not sd-scripts code)."""

import sys
from pathlib import Path

_shared = str(Path(__file__).resolve().parents[2])  # tests/standins: the shared stand-in bodies
if _shared not in sys.path:
    sys.path.append(_shared)
