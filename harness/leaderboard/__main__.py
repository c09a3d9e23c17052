"""``python -m harness.leaderboard``."""

import sys

from harness.leaderboard.cli import main

sys.exit(main())
