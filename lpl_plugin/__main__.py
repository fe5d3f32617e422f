"""Run the lpl-plugin command line: `python -m lpl_plugin ...`."""

import sys

from lpl_plugin.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
