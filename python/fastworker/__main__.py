"""``python -m fastworker``: the ``fastworker`` command."""

import sys

from fastworker.cli import main

sys.exit(main())
