"""``python -m worker <command> ...``: the project's commands by name, under one entry point.

Only ``dlq`` (the dead-letter command, :mod:`worker.deadletter.cli`) so far.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from worker.deadletter import cli as dlq

#: Each command's ``main(argv) -> exit status``.
COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "dlq": lambda argv: dlq.main(argv, prog="python -m worker dlq"),
}


def main(argv: Sequence[str]) -> int:
    """Run the named command with the remaining arguments; 2 and a usage line for anything else."""
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m worker {{{','.join(COMMANDS)}}} ...", file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
