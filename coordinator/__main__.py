"""`python -m coordinator` is the `coordinator` command."""

import sys

from coordinator.cli import main

sys.exit(main())
