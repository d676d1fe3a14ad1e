"""``python -m worker.flower``: Flower, never without a password (:mod:`worker.ops.flower`)."""

from __future__ import annotations

import sys

from worker.ops.flower import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
