"""`lpl-launch` and `python -m lpl_plugin.launch`: the launcher's public entry point (it lives in
`lpl_plugin.patches.launcher`, beside the adapter it installs).

Guarded like the scripts it runs: a spawned DataLoader worker re-imports `__main__` as `__mp_main__` and only loads
data.
"""

import sys

from lpl_plugin.patches.launcher import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
