"""Every command and code example of the README runs here, as a reader would run it, so none can rot.

The README's fenced blocks, by language: ``sh`` commands run in a shell (each line; ``make``
targets as a dry run, ``make -n``, since ``make run`` and ``make test`` are this suite's own
business, tested by tests/integration/test_make_run.py and CI), against a vhost of the test's own
on the machine's RabbitMQ and a sandbox (``localhost:5672`` and ``localhost:8080`` in the README
become theirs); ``python`` blocks run in order in one namespace, and what they publish is looked
for in the queues; ``json`` blocks are an event (valid by the worker's own rules) and a dead
letter (the contract's fields); the ``toml`` block is an accounts file the settings read;
``text`` blocks are pictures. A block of any other language fails the test: add a runner.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection

from config.settings import Settings
from tests.harness import ROOT, VHOSTS, require_broker
from worker.events.validation import validate_event
from worker.sandbox import Sandbox

pytestmark = pytest.mark.timeout(300)

README = ROOT / "README.md"

#: The broker URL of the README's examples, and the sandbox's address in its commands.
README_BROKER = "amqp://guest:guest@localhost:5672//"
README_SANDBOX = "localhost:8080"

#: The sandbox's key in the README's examples (the default account's).
SANDBOX_KEY = "sandbox-key"

#: The fields every dead letter has (CONTRACT.md).
ENVELOPE_FIELDS = {"reason", "error", "event", "details", "asset_id", "attempts", "failed_at"}


@dataclass(frozen=True)
class Block:
    language: str
    text: str
    line: int

    def __str__(self) -> str:
        return f"README.md line {self.line} ({self.language})"


def blocks() -> list[Block]:
    found, language, lines, start = [], None, [], 0
    for number, line in enumerate(README.read_text().splitlines(), 1):
        if line.startswith("```"):
            if language is None:
                language, lines, start = line[3:].strip(), [], number
            else:
                found.append(Block(language, "\n".join(lines), start))
                language = None
        elif language is not None:
            lines.append(line)
    assert language is None, "an unclosed code block"
    return found


def commands(block: Block) -> list[str]:
    """The commands of a shell block: continuations joined, comments and blank lines left out."""
    joined = block.text.replace("\\\n", " ")
    return [re.sub(r"\s+#.*$", "", line).strip() for line in joined.splitlines()
            if line.strip() and not line.strip().startswith("#")]


RUNNABLE = {"sh", "python", "json", "toml", "text"}


def test_every_block_is_one_this_test_runs() -> None:
    unknown = [str(b) for b in blocks() if b.language not in RUNNABLE]
    assert not unknown, f"no runner for {unknown}: add one here"
    assert sum(1 for b in blocks() if b.language == "sh") >= 4


@pytest.fixture
def world(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A vhost of the test's own with the worker's default queue names, a sandbox, the environment."""
    require_broker()
    vhost = VHOSTS.take()
    with Sandbox(api_key=SANDBOX_KEY) as sandbox:
        env = {**os.environ, "CELERY_BROKER_URL": vhost, "NETCORE_API_KEY": SANDBOX_KEY,
               "NETCORE_API_URL": sandbox.url, "PATH": f"{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}"}
        for name in [n for n in env if n.startswith(("ACTIVITY_", "NETCORE_ACCOUNTS"))]:
            del env[name]  # the README speaks of the defaults
        yield {"vhost": vhost, "sandbox": sandbox, "env": env, "tmp": tmp_path}
    VHOSTS.give_back(vhost)


def localised(text: str, world: dict[str, Any]) -> str:
    sandbox_address = world["sandbox"].url.removeprefix("http://")
    return text.replace(README_BROKER, world["vhost"]).replace(README_SANDBOX, sandbox_address)


@pytest.mark.parametrize("block", [b for b in blocks() if b.language == "sh"], ids=str)
def test_each_shell_command_runs(block: Block, world: dict[str, Any]) -> None:
    subprocess.run(  # the worker's queues, as the worker declares them at start-up
        [sys.executable, "-c", "from config.settings import load_or_exit; from worker.ops.startup "
                    "import declare_queues; declare_queues(load_or_exit())"],
                   cwd=ROOT, env=world["env"], check=True, capture_output=True, timeout=120)
    for command in commands(block):
        shell = localised(re.sub(r"(^|\s)make (\w)", r"\1make -n \2", command), world)
        done = subprocess.run(shell, shell=True, cwd=ROOT, env=world["env"], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, f"{block}: {command!r} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"


def test_the_python_examples_publish_what_they_say(world: dict[str, Any]) -> None:
    namespace: dict[str, Any] = {}
    for block in (b for b in blocks() if b.language == "python"):
        exec(compile(localised(block.text, world), str(block), "exec"), namespace)  # noqa: S102  (the README's own code)
    with Connection(world["vhost"], heartbeat=0) as connection:
        channel = connection.channel()
        events = channel.basic_get("activities", no_ack=True)
        task = channel.basic_get("celery", no_ack=True)
    assert events is not None and json.loads(events.body) == namespace["events"]
    assert task is not None and task.headers["task"] == "activities.ingest"


def test_the_json_examples_are_an_event_the_worker_takes_and_a_dead_letter_of_the_contract() -> None:
    event, dead_letter = (json.loads(b.text) for b in blocks() if b.language == "json")
    assert validate_event(event) == {}
    assert ENVELOPE_FIELDS <= set(dead_letter) and validate_event(dead_letter["event"] | {
        "timestamp": "2026-11-26T12:06:28Z", "identity": "x", "activity_source": "web", "activity_params": {}}) == {}


def test_the_accounts_file_example_is_read_as_the_worker_reads_it(tmp_path: Path) -> None:
    (block,) = [b for b in blocks() if b.language == "toml"]
    secret = tmp_path / "brand-c.key"
    secret.write_text("key-c\n")
    path = tmp_path / "accounts.toml"
    path.write_text(re.sub(r'api_key_file = "[^"]+"', f'api_key_file = "{secret}"', block.text))
    settings = Settings.from_env({"NETCORE_ACCOUNTS_FILE": str(path), "BRAND_B_NETCORE_KEY": "key-b"})
    assert settings.accounts.names == ["brand-b", "brand-c"] and settings.accounts.default is None
    assert {a.api_key for a in settings.accounts} == {"key-b", "key-c"}
