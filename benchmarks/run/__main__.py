"""`python -m benchmarks.run`: see benchmarks/run/__init__.py for what it measures, cli.py for the options."""

import sys

from benchmarks.run.cli import main

sys.exit(main())
