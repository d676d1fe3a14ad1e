"""``python -m worker.dlq``: the dead-letter command (:mod:`worker.deadletter.cli`), by its old name."""

from __future__ import annotations

import sys

from worker.deadletter.cli import main

if __name__ == "__main__":
    sys.exit(main())
