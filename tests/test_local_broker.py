"""make run's own RabbitMQ node (``worker/ops/localbroker.py``, ``worker/ops/rabbitnode.py``), where
no broker is needed: the URLs it leaves alone, the port and URL its node takes, and the one line
that says how to get RabbitMQ when it is not installed.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from tests.harness import ROOT, free_port
from worker.ops.localbroker import start_if_needed
from worker.ops.rabbitnode import LocalNode, Tools

#: Stand-ins for the RabbitMQ scripts: the node is built, never started.
TOOLS = Tools("rabbitmq-server", "rabbitmqctl")


def started_for(url: str, directory: Path) -> bool:
    """Whether make run would start a node of its own for ``url`` (one started is stopped at once)."""
    node, _ = start_if_needed(url, directory=directory)
    if node is not None:
        node.stop()
    return node is not None


def test_a_url_of_another_machine_or_with_tls_is_left_alone(tmp_path: Path) -> None:
    for url in ("amqp://app:secret@rabbit.example.com:5672//", "amqps://app:secret@localhost:5671//"):
        assert not started_for(url, tmp_path / "node")
    assert not (tmp_path / "node").exists()


def test_the_node_takes_the_url_s_user_vhost_and_port_unless_something_holds_the_port(tmp_path: Path) -> None:
    port = free_port()
    url = f"amqp://app:p%40ss@localhost:{port}/orders"
    node = LocalNode(tmp_path, url, TOOLS)
    assert (node.user, node.password, node.vhost, node.port) == ("app", "p@ss", "orders", port)
    assert node.url == f"amqp://app:p%40ss@127.0.0.1:{port}/orders"

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        moved = LocalNode(tmp_path, url, TOOLS)
    assert moved.port != port and moved.url == f"amqp://app:p%40ss@127.0.0.1:{moved.port}/orders"
    assert moved.name == node.name and moved.name.endswith("@localhost")  # the directory's, whatever the port

    default = LocalNode(tmp_path, "amqp://guest:guest@localhost:5672//", TOOLS)
    assert default.vhost == "/" and default.url.endswith(f"@127.0.0.1:{default.port}//")


def test_without_rabbitmq_installed_one_line_says_how_to_get_it(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()  # PATH: nothing on it
    started = tmp_path / "started"
    (tmp_path / "Procfile").write_text(f"worker: {sys.executable} -c 'open(\"{started}\", \"w\")'\n")
    env = {**os.environ, "PATH": str(tmp_path / "bin"), "PYTHONPATH": str(ROOT),
           "CELERY_BROKER_URL": f"amqp://guest:guest@127.0.0.1:{free_port()}//"}

    done = subprocess.run([sys.executable, "-m", "worker.ops.supervisor", "--procfile", str(tmp_path / "Procfile"),
                           "--local-broker", str(tmp_path / "rabbitmq")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)

    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1 and "RabbitMQ is not installed" in lines[0], lines
    assert "apt-get install rabbitmq-server" in lines[0] and "brew install rabbitmq" in lines[0]
    assert not started.exists() and not (tmp_path / "rabbitmq").exists()
