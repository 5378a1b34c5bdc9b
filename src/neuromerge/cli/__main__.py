"""``python -m neuromerge.cli``: the same as ``neuromerge``."""

import sys

from neuromerge.cli import main

sys.exit(main())
