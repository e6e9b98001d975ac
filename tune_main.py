#!/usr/bin/env python
"""granq_search entry point: ``python tune_main.py --help``."""

import sys

from granq_search.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
