"""``netcore-activity``: the one command an operator runs, with a subcommand for each process or task.

::

    netcore-activity worker [celery worker options]   the worker: one process (one core), the app loaded
    netcore-activity check [--timeout S]              settings, broker, what the worker would do; starts nothing
    netcore-activity dlq count|list|replay|purge ...  the dead-letter queue (also: python -m worker.dlq)
    netcore-activity health [--hostname NAME] ...     exit 0 if the worker consumes (a liveness probe)
    netcore-activity flower [flower options]          Flower, never without a password
    netcore-activity sandbox [--port N] ...           a local stand-in for the Netcore API (NOT the real one)
    netcore-activity --version

``pip install`` makes the command (``pyproject.toml``); ``python -m worker`` is the same. Each
subcommand imports its module only when it runs, so the dead-letter command loads no Celery.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

from config.settings import process_environment
from worker import __version__

#: What ``worker`` hands Celery's worker before the operator's options. Theirs come after and
#: win (Celery takes an option's last value): ``--hostname=activities-2@%h`` for a second process.
WORKER_DEFAULTS = ("--loglevel=INFO", "--hostname=activities@%h")

#: The one option ``worker`` reads itself: the port of this process's ``/metrics`` (sets
#: ``METRICS_PORT``), so that several processes on one machine, or systemd instances sharing
#: one environment file, each get their own.
METRICS_PORT_OPTION = "--metrics-port"

#: A subcommand: its arguments and the name to show in its usage, in; the exit status, out.
Command = Callable[[Sequence[str], str], int]


def run_worker(argv: Sequence[str], prog: str) -> int:
    """Replace this process with Celery's worker running this app (``celery -A worker.app worker``):
    the signals a process manager sends (SIGTERM: a warm shutdown) reach Celery itself."""
    try:
        options, metrics_port = _metrics_port(argv)
    except ValueError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    env = process_environment()
    if metrics_port is not None:
        env["METRICS_PORT"] = metrics_port
    command = [sys.executable, "-m", "celery", "-A", "worker.app", "worker", *WORKER_DEFAULTS, *options]
    sys.stdout.flush()
    os.execve(sys.executable, command, env)  # replaces this process: nothing after it runs


def _metrics_port(argv: Sequence[str]) -> tuple[list[str], str | None]:
    """``argv`` without ``--metrics-port N`` (or ``=N``), and N; ValueError if N is not a port."""
    options: list[str] = []
    port: str | None = None
    arguments = iter(argv)
    for argument in arguments:
        if argument == METRICS_PORT_OPTION:
            port = next(arguments, "")
        elif argument.startswith(METRICS_PORT_OPTION + "="):
            port = argument.partition("=")[2]
        else:
            options.append(argument)
    if port is not None and not (port.isdigit() and int(port) <= 65_535):
        raise ValueError(f"{METRICS_PORT_OPTION} {port!r}: must be a port number, 0..65535 (0: no metrics)")
    return options, port


def run_check(argv: Sequence[str], prog: str) -> int:
    from worker.ops.check import main

    return main(argv, prog=prog)


def run_dlq(argv: Sequence[str], prog: str) -> int:
    from worker.deadletter.cli import main

    return main(argv, prog=prog)


def run_health(argv: Sequence[str], prog: str) -> int:
    from worker.ops.health import main

    return main(argv, prog=prog)


def run_flower(argv: Sequence[str], prog: str) -> int:
    from worker.ops.flower import main

    return main(argv)


def run_sandbox(argv: Sequence[str], prog: str) -> int:
    from worker.sandbox.__main__ import main

    return main(argv, prog=prog)


#: Each subcommand, its function and what it does (the usage lists them in this order).
COMMANDS: dict[str, tuple[Command, str]] = {
    "worker": (run_worker, "run the worker (Celery with this app; celery worker options pass through, "
                           f"and {METRICS_PORT_OPTION} N)"),
    "check": (run_check, "check the settings and the broker, say what the worker would do; start nothing"),
    "dlq": (run_dlq, "count, list, replay or purge the dead-letter queue"),
    "health": (run_health, "exit 0 if the worker consumes and answers, else 1 and why (a liveness probe)"),
    "flower": (run_flower, "run Flower for these workers (FLOWER_BASIC_AUTH required)"),
    "sandbox": (run_sandbox, "run a local stand-in for the Netcore API (NOT the real one)"),
}


def usage(prog: str) -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [f"usage: {prog} {{{','.join(COMMANDS)}}} [options...]", f"       {prog} --version", "",
             "Delivers activity events from RabbitMQ to the Netcore CE Activity API.", ""]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    lines += ["", f"{prog} COMMAND --help says more about each."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, *, prog: str = "netcore-activity") -> int:
    """Run the subcommand named by ``argv[0]``; 2 and the usage for anything else."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "--version":
        print(f"{prog} {__version__}")
        return 0
    if args and args[0] in ("-h", "--help"):
        print(usage(prog))
        return 0
    if not args or args[0] not in COMMANDS:
        unknown = f"{prog}: unknown command {args[0]!r}\n" if args else ""
        print(unknown + usage(prog), file=sys.stderr)
        return 2
    command, _ = COMMANDS[args[0]]
    return command(args[1:], f"{prog} {args[0]}")


if __name__ == "__main__":
    sys.exit(main())
