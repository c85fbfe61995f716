"""`python -m tritongpt ...`: the same command line as the `tritongpt` script (and `-m tritongpt.cli`)."""
import sys

from tritongpt.cli import main

sys.exit(main())
