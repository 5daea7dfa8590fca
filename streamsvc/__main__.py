"""``python -m streamsvc``."""

import sys

from streamsvc.cli import main

sys.exit(main())
