"""``python -m ssmtune.bench NAME ...`` (what ``torchrun`` starts for the distributed benchmark)."""

import sys

from ssmtune.bench.run import main

sys.exit(main())
