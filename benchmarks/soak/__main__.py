"""``python -m benchmarks.soak`` (``make soak``)."""

import sys

from benchmarks.soak.report import main

sys.exit(main())
