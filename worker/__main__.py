"""``python -m worker <command> ...``: the ``netcore-activity`` command (:mod:`worker.ops.cli`) by
another name, for a checkout without the package installed."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from worker.ops import cli


def main(argv: Sequence[str]) -> int:
    """Run the named command with the remaining arguments (see :mod:`worker.ops.cli`)."""
    return cli.main(argv, prog="python -m worker")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
