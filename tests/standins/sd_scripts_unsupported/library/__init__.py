"""Stand-in of the `library` package of a future sd-scripts release lpl-plugin does not know (tests only)."""

import sys
from pathlib import Path

_shared = str(Path(__file__).resolve().parents[2])  # tests/standins: the shared stand-in bodies
if _shared not in sys.path:
    sys.path.append(_shared)
