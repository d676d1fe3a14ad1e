"""``python -m worker.health``: the health check (:mod:`worker.ops.health`), by its old name."""

from __future__ import annotations

import sys

from worker.ops.health import main

if __name__ == "__main__":
    sys.exit(main())
