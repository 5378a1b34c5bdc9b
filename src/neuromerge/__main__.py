import sys

from neuromerge.cli import main

sys.exit(main())
