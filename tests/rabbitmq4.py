"""Private RabbitMQ 4.x nodes, run from a Debian 13 root: the nodes of ``tests/rabbitmq_node.py``
(same API: ``nodes.start_node()``, ``node.kill()``, ``node.ctl(...)``...) on another version.

The machine's RabbitMQ is the one its Debian release ships (3.10 on Debian 12); users run 4.x.
Debian 13 ships rabbitmq-server 4.0 with its own Erlang (OTP 27), so the tests run that, as it
is packaged, from a minimal Debian 13 tree that ``tests/rabbitmq4-root.sh`` builds with
debootstrap, outside the checkout (its ``--where`` says where)::

    with Rabbit4Nodes() as nodes:
        node = nodes.start_node()            # RabbitMQ 4.0.5; about 4 s on a quiet 2-core machine
        ...                                  # point the worker at node.url, as for any node

How a command of a node runs (:meth:`ChrootTools.launch`): in a mount namespace of its own
(``unshare``), which mounts ``/proc`` in the tree and enters it (``chroot``), with the paths of
its arguments and environment as seen from inside. Each node's directory, and the set's
``HOME`` with its Erlang cookie, sit inside the tree (in its ``/tmp``). The mounts live as long as
the namespace's processes: nothing is ever mounted on the machine itself, and nothing stays
mounted when a test is killed.

Each set has its own ``epmd`` (Erlang's port mapper) on a free port of the loopback interface
(``ERL_EPMD_PORT``), which its first node starts: the machine's ``epmd`` serves the machine's
broker and its Erlang, and a 4.x set neither depends on it nor leaves anything registered there.
Every process a set starts carries a marker in its environment; removing the set kills every
process so marked (nodes, their ``epmd``, helpers), so nothing keeps running after a test.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

from tests.harness import ROOT, free_port, kill_all, processes_marked, wait_for_exit
from tests.rabbitmq_node import NodeError, RabbitNodes, Tools

#: The script that builds the Debian 13 root (and says where it lives).
BUILD_SCRIPT = ROOT / "tests" / "rabbitmq4-root.sh"

#: The command that builds the root, as a person types it.
BUILD_COMMAND = f"bash {BUILD_SCRIPT.relative_to(ROOT)}"

#: The file a complete root carries (written last by the build script): the rabbitmq-server version.
MARKER = ".rabbitmq-server-version"

#: The RabbitMQ scripts, as seen from inside the root (Debian's layout).
SCRIPTS = "/usr/lib/rabbitmq/bin"

#: The variable that marks every process of a set (its value is the set's token).
OWNER_VARIABLE = "ACTIVITY_TESTS_RABBITMQ4"

#: What runs a command in the root: ``$0`` is the root, ``$@`` the command.
ENTER = 'mount -t proc proc "$0/proc" && exec chroot "$0" "$@"'

#: How long the processes of a removed set may take to die after SIGKILL.
REAP_TIMEOUT = 30.0


@cache
def root_directory() -> Path:
    """Where the build script puts the root (built or not)."""
    done = subprocess.run(["bash", str(BUILD_SCRIPT), "--where"], capture_output=True, text=True, check=True)
    return Path(done.stdout.strip())


def installed_version(root: Path) -> str | None:
    """The rabbitmq-server version of a complete root, or None when it is not built."""
    marker = root / MARKER
    return marker.read_text().strip() if marker.exists() else None


def missing() -> str | None:
    """Why 4.x nodes cannot run here (None: they can)."""
    root = root_directory()
    if installed_version(root) is None:
        return f"the RabbitMQ 4.x root is not built at {root}: build it with `{BUILD_COMMAND}` (as root)"
    if os.geteuid() != 0:
        return "RabbitMQ 4.x nodes run in a chroot, which needs root"
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not on PATH"
    return None


def require() -> None:
    """Fail on CI, skip elsewhere (naming the command that builds the root), when 4.x nodes cannot run."""
    reason = missing()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)


@dataclass(frozen=True, kw_only=True)
class ChrootTools(Tools):
    """RabbitMQ's scripts inside the root, run there with the set's ``epmd`` and marker."""

    #: The root (the machine's path of the Debian 13 tree).
    root: Path
    #: The set's ``epmd`` port.
    epmd_port: int
    #: The marker's value: the set's token.
    owner: str

    def launch(self, argv: list[str], env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
        """``argv`` run inside the root: its own mount namespace, ``/proc`` mounted, ``chroot``.

        Of ``env`` only RabbitMQ's variables and ``HOME`` go in (the machine's ``PATH`` and
        locale mean nothing inside); every path under the root is given as seen from inside.
        """
        inner = {name: self.inside(value) for name, value in env.items()
                 if name.startswith("RABBITMQ_") or name == "HOME"}
        inner.update(PATH="/usr/sbin:/usr/bin:/sbin:/bin", LANG="C.UTF-8", LC_ALL="C.UTF-8",
                     ERL_EPMD_PORT=str(self.epmd_port), ERL_EPMD_ADDRESS="127.0.0.1",
                     **{OWNER_VARIABLE: self.owner})
        command = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", ENTER, str(self.root),
                   *(self.inside(arg) for arg in argv)]
        return command, inner

    def inside(self, text: str) -> str:
        """``text`` with the root's path taken off, if it is a path under the root."""
        prefix = f"{self.root}/"
        return text[len(prefix) - 1:] if text.startswith(prefix) else text


class Rabbit4Nodes(RabbitNodes):
    """Private RabbitMQ 4.x nodes (see :class:`~tests.rabbitmq_node.RabbitNodes`), with an
    ``epmd`` of their own; leaving the context kills every process of the set."""

    def __init__(self, *, user: str = "guest", password: str = "guest") -> None:
        reason = missing()
        if reason is not None:
            raise NodeError(reason)
        root = root_directory()
        #: The rabbitmq-server version the nodes run (Debian's, e.g. ``4.0.5-6``).
        self.version = installed_version(root)
        self.owner = secrets.token_hex(8)
        tools = ChrootTools(server=f"{SCRIPTS}/rabbitmq-server", ctl=f"{SCRIPTS}/rabbitmqctl",
                            scratch=root / "tmp", root=root, epmd_port=free_port(), owner=self.owner)
        super().__init__(user=user, password=password, tools=tools)

    def processes(self) -> dict[int, str]:
        """Every live process of this set (nodes, ``epmd``, helpers), with its command line."""
        return processes_marked(OWNER_VARIABLE, self.owner)

    def remove(self) -> None:
        """Kill every process of the set, then remove the nodes and the directory."""
        left = self.processes()
        kill_all(left)
        super().remove()
        alive = wait_for_exit(left, REAP_TIMEOUT)
        if alive:
            raise NodeError(f"processes of the RabbitMQ 4.x set outlived SIGKILL: {sorted(alive)}")
