"""The ``netcore-activity`` command in the integration tests: its environment, and a worker run by it.

Shared by ``test_commands.py`` (the command as ``make install`` installs it) and
``test_package.py`` (the command of a fresh ``pip install .``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

from tests.harness import Output, QueueSet, event, publish_events
from worker.sandbox import Sandbox

#: The command ``make install`` puts beside this interpreter.
COMMAND = Path(sys.executable).parent / "netcore-activity"

#: Seconds a worker may take to say it is ready, then to deliver, then to stop.
DEADLINE = 60.0


def command_env(queues: QueueSet, sandbox: Sandbox, api_key: str, **extra: str) -> dict[str, str]:
    """The settings of a command of this test: its vhost and queues, the sandbox, no metrics port,
    nothing of the machine's own NETCORE_*, FLOWER_* or SANDBOX_* settings, no PYTHONPATH."""
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("NETCORE_", "FLOWER_", "SANDBOX_")) and k != "PYTHONPATH"}
    return {**base, **queues.env, "NETCORE_API_KEY": api_key, "NETCORE_API_URL": sandbox.url,
            "ACTIVITY_BATCH_WAIT": "0.2", "METRICS_PORT": "0", "PYTHONUNBUFFERED": "1", **extra}


class CommandWorker:
    """``netcore-activity worker OPTIONS`` in a process group of its own, its output followed."""

    def __init__(self, command: Path, options: Sequence[str], env: Mapping[str, str], cwd: Path) -> None:
        self.process = subprocess.Popen([str(command), "worker", "--without-gossip", "--without-mingle", *options],
                                        cwd=cwd, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        self.output = Output()
        self.output.follow(self.process)

    def wait_until_ready(self) -> bool:
        return bool(self.output.wait_for(lambda data: b" ready." in data, DEADLINE))

    def terminate(self) -> int:
        """SIGTERM (a warm shutdown); the exit status."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(DEADLINE)

    def kill(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(DEADLINE)
        self.output.join(10)


def deliver_one(queues: QueueSet, sandbox: Sandbox) -> str:
    """Publish one event with an id of its own; return the id once the sandbox accepted it."""
    event_id = uuid.uuid4().hex
    publish_events(queues.settings.queue, [event(event_id)])
    delivered = sandbox.wait_until(
        lambda s: any(e.get("activity_params", {}).get("event_id") == event_id for e in s.accepted()), DEADLINE)
    assert delivered, f"event {event_id} was not delivered"
    return event_id
