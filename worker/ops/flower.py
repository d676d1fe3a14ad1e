"""``netcore-activity flower [flower options...]``: Flower, never without a password.

Flower shows every worker and task and can shut workers down, so the Procfile starts it
through this module, which refuses to run it unless ``FLOWER_BASIC_AUTH`` is set. Flower reads
its other settings from ``FLOWER_*`` variables too (``FLOWER_PORT``, ``FLOWER_ADDRESS``); its
options on the command line win over them. Unless told otherwise it listens on the loopback
interface only.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from config.settings import process_environment

#: Flower's own setting (Flower reads ``FLOWER_*`` variables itself): ``user:password``,
#: several separated by commas.
FLOWER_AUTH_VARIABLE = "FLOWER_BASIC_AUTH"

#: Flower's setting for the columns of its task list, and ours: with ``args`` (a summary such
#: as ``asset_id='x', 1000 events``, never events), which Flower leaves out by default.
TASK_COLUMNS_VARIABLE = "FLOWER_TASKS_COLUMNS"
TASK_COLUMNS = "name,uuid,state,args,received,runtime,worker"

#: Flower's setting for the address it listens on, and ours when it is unset: the loopback
#: interface (Flower's own default is every interface). Its port is ``FLOWER_PORT`` (5555).
ADDRESS_VARIABLE = "FLOWER_ADDRESS"
DEFAULT_ADDRESS = "127.0.0.1"


def check_flower_auth(value: str | None) -> str | None:
    """None if ``value`` is usable Flower basic auth, else the sentence saying why not."""
    if not value or not value.strip():
        return (
            f"{FLOWER_AUTH_VARIABLE} is not set: Flower shows every task and can shut workers "
            f"down, so it does not run without a password. Set {FLOWER_AUTH_VARIABLE}=user:password "
            "(`make run` makes one up for local use)"
        )
    for pair in value.split(","):
        user, _, password = pair.partition(":")
        if not user.strip() or not password:
            return f"{FLOWER_AUTH_VARIABLE} must be user:password (several separated by commas)"
    return None


def run_flower(argv: Sequence[str]) -> int:
    """Replace this process with Flower (``celery -A worker.app flower argv...``), after
    checking it will ask for a password. Flower reads the credentials from the environment
    itself, so they never show in the process list."""
    env = process_environment()
    problem = check_flower_auth(env.get(FLOWER_AUTH_VARIABLE))
    if problem is not None:
        print(f"netcore-activity-worker: refusing to start Flower: {problem}", file=sys.stderr)
        return 2
    # the task list shows each task's summary arguments (asset_id, event count) by default
    env = {**env, TASK_COLUMNS_VARIABLE: env.get(TASK_COLUMNS_VARIABLE) or TASK_COLUMNS,
           ADDRESS_VARIABLE: env.get(ADDRESS_VARIABLE) or DEFAULT_ADDRESS}
    command = [sys.executable, "-m", "celery", "-A", "worker.app", "flower", *argv]
    sys.stdout.flush()
    os.execve(sys.executable, command, env)  # replaces this process: nothing after it runs


def main(argv: Sequence[str]) -> int:
    """``python -m worker.ops.flower [flower options...]``."""
    return run_flower(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
