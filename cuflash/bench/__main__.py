"""``python -m cuflash.bench``: the same as ``python -m cuflash bench``."""

import sys

from cuflash.bench.cli import main

sys.exit(main())
