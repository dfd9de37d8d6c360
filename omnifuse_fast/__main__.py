"""``python -m omnifuse_fast``: the same as the ``omnifuse-fast`` command."""

import sys

from omnifuse_fast.cli import main

sys.exit(main())
