"""Private RabbitMQ nodes for the tests that fault the broker: started and removed by the test.

Stopping, killing or disconnecting "the" RabbitMQ of a machine is not a test's to do: on a
developer's laptop that broker serves their other applications, and on a shared machine other
people's tests. A test that faults the broker starts a node of its own instead, with its own node
name, ports, data and log directories, and configuration (so nothing of ``/etc/rabbitmq``
applies), faults that node, and removes it all at the end, even when the test fails.

The nodes of one :class:`RabbitNodes` share an Erlang cookie (a ``.erlang.cookie`` in a ``HOME``
of their own, which the server and ``rabbitmqctl`` both read), so they can form a cluster::

    with RabbitNodes() as nodes:
        node = nodes.start_node()            # about 4 s on a quiet 2-core machine
        ...                                  # point the worker at node.url
        node.close_all_connections("a test")
        node.kill()                          # SIGKILL of the node's VM
        node.start()                         # same data, same port

    with RabbitNodes() as nodes:
        first, second, third = nodes.cluster(3)   # joined with ``rabbitmqctl join_cluster``

A node started with a :class:`TLSListener` takes AMQP over TLS only (its plain listener is off),
and its :attr:`~RabbitNode.url` is an ``amqps://`` URL naming the listener's host.

Nothing sleeps: ``rabbitmqctl wait`` blocks until the node's applications run (or its process
dies), with a deadline.

The nodes register with the machine's ``epmd`` (Erlang's port mapper); if none runs, the first
node starts one, which stays, as it does for any Erlang program.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from tests.harness import free_port

#: The address a node listens on unless told otherwise.
LOOPBACK = "127.0.0.1"

#: How long a node may take to boot (measured: about 4 s on a quiet 2-core machine).
START_TIMEOUT = 90.0

#: How long one ``rabbitmqctl`` command may take.
CTL_TIMEOUT = 60.0

#: How long a node may take to stop when asked (``rabbitmqctl stop``) before it is killed.
STOP_TIMEOUT = 30.0

#: The configuration of every private node. Plugins are off (``enabled_plugins`` is empty); the
#: disk alarm is set low, since a test's temporary directory may sit on a small disk.
NODE_CONFIG = """\
default_user = {user}
default_pass = {password}
loopback_users = none
disk_free_limit.absolute = 10MB
log.console = false
log.file.level = info
"""


#: Added to a node's configuration by a :class:`TLSListener`: the plain listener off, a TLS one on.
TLS_CONFIG = """\
listeners.tcp = none
listeners.ssl.default = {address}:{port}
ssl_options.cacertfile = {ca}
ssl_options.certfile = {cert}
ssl_options.keyfile = {key}
ssl_options.verify = {verify}
ssl_options.fail_if_no_peer_cert = {require}
"""


class NodeError(RuntimeError):
    """A private node could not be started or did not do what it was asked; says why."""


@dataclass(frozen=True)
class Tools:
    """Where ``rabbitmq-server`` and ``rabbitmqctl`` are (the scripts themselves), and how they run."""

    server: str
    ctl: str
    #: Where a set of nodes makes its directory (None: the system's temporary directory).
    scratch: Path | None = None

    def launch(self, argv: list[str], env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
        """The command line and environment that run ``argv`` (a script and its arguments) with
        ``env``: here, as they are. A subclass runs them elsewhere (``tests/rabbitmq4.py``)."""
        return argv, env


@dataclass(frozen=True)
class TLSListener:
    """A node's TLS listener (on the node's address): the node's certificate and key (PEM files), the
    CA it checks clients' certificates against, and the host name its URL gives (what a client
    checks the certificate against: ``localhost`` reaches the same listener as ``127.0.0.1``)."""

    cert: Path
    key: Path
    ca: Path
    host: str = "127.0.0.1"
    #: Mutual TLS: a client without a certificate signed by ``ca`` is refused.
    require_client_cert: bool = True

    def config(self, address: str, port: int) -> str:
        """The lines of ``rabbitmq.conf`` that make this listener on ``address:port``."""
        return TLS_CONFIG.format(address=address, port=port, ca=self.ca, cert=self.cert, key=self.key,
                                 verify="verify_peer" if self.require_client_cert else "verify_none",
                                 require=str(self.require_client_cert).lower())


def find_tools() -> Tools | None:
    """The RabbitMQ scripts on ``PATH``, or None when RabbitMQ is not installed.

    Debian's packages put a wrapper on ``PATH`` that runs every command as the ``rabbitmq`` user
    (with that user's home, hence the machine broker's cookie): the real scripts sit next to it,
    and those run as whoever runs the tests, with the environment given here.
    """
    tools = []
    for name in ("rabbitmq-server", "rabbitmqctl"):
        found = shutil.which(name)
        if found is None:
            return None
        real = Path(found).resolve()
        if real.name == "rabbitmq-script-wrapper":
            real = (real.parent / name).resolve()
        tools.append(str(real))
    return Tools(server=tools[0], ctl=tools[1])


class RabbitNode:
    """One private RabbitMQ node: its own name, ports and directory under its cluster's base.

    The node's VM runs in a process group of its own (no Ctrl-C of the terminal reaches it);
    :meth:`remove` kills the group and deletes the directory. ``address`` is where it listens
    for clients; ``launcher``, a command prefix that the server and ``rabbitmqctl`` run under
    (``ip netns exec NAME``: a node on a host of its own, see ``tests/netns.py``).
    """

    def __init__(self, name: str, *, base: Path, home: Path, tools: Tools, user: str, password: str,
                 address: str = LOOPBACK, launcher: Sequence[str] = (), tls: TLSListener | None = None) -> None:
        self.name = name
        self.address, self.launcher = address, tuple(launcher)
        self.tls = tls
        self.user, self.password = user, password
        self.directory = base / name.split("@", 1)[0]
        self.home = home
        self.tools = tools
        self.port = free_port()
        self.dist_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        #: Whether the RabbitMQ application was stopped (``stop_app``) in a running VM.
        self.app_stopped = False
        self.directory.mkdir(parents=True)
        config = NODE_CONFIG.format(user=user, password=password)
        #: The TLS listener's port (``tls``), or 0: none.
        self.tls_port = free_port() if tls is not None else 0
        if tls is not None:
            config += tls.config(address, self.tls_port)
        (self.directory / "rabbitmq.conf").write_text(config)
        (self.directory / "enabled_plugins").write_text("[].\n")
        (self.directory / "rabbitmq-env.conf").write_text("")  # the machine's env file does not apply

    @property
    def url(self) -> str:
        """The AMQP URL of the node's default vhost, with its user (``amqps://`` to the TLS
        listener's host, for a node with one)."""
        if self.tls is not None:
            return f"amqps://{self.user}:{self.password}@{self.tls.host}:{self.tls_port}//"
        return f"amqp://{self.user}:{self.password}@{self.address}:{self.port}//"

    @property
    def env(self) -> dict[str, str]:
        """The environment that makes ``rabbitmq-server`` and ``rabbitmqctl`` this node's."""
        d = self.directory
        return {
            **os.environ,
            "HOME": str(self.home),  # its .erlang.cookie, shared by the cluster
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": self.address,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
            "RABBITMQ_LOG_BASE": str(d / "log"),
            "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
            "RABBITMQ_CONF_ENV_FILE": str(d / "rabbitmq-env.conf"),
            "RABBITMQ_PID_FILE": str(d / "node.pid"),
            # the distribution port only on the loopback interface, like the AMQP port
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }

    @property
    def pid_file(self) -> Path:
        return self.directory / "node.pid"

    def start(self, timeout: float = START_TIMEOUT) -> RabbitNode:
        """Start the node (on its existing data, if any); return once its applications run."""
        if self.running:
            raise NodeError(f"{self.name} is already running")
        self.pid_file.unlink(missing_ok=True)
        self.app_stopped = False
        output = open(self.directory / "server.out", "ab")
        try:
            argv, env = self.tools.launch([self.tools.server], self.env)
            self.process = subprocess.Popen(
                [*self.launcher, *argv], cwd=self.directory, env=env, stdin=subprocess.DEVNULL,
                stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
            )
        finally:
            output.close()
        try:
            self.ctl("wait", "--timeout", str(int(timeout)), str(self.pid_file), timeout=timeout + 10)
        except NodeError as error:
            self.kill()
            raise NodeError(f"{error}\n--- the node's output ---\n{self.server_output()[-3000:]}") from None
        return self

    @property
    def running(self) -> bool:
        """Whether the node's VM is running (started and neither stopped nor killed since)."""
        return self.process is not None and self.process.poll() is None

    def server_output(self) -> str:
        """What ``rabbitmq-server`` printed (boot errors land here)."""
        path = self.directory / "server.out"
        return path.read_text(errors="replace") if path.exists() else ""

    def ctl(self, *args: str, timeout: float = CTL_TIMEOUT) -> str:
        """Run ``rabbitmqctl -n NODE args...``; return its output, or raise with it."""
        return self._tool(self.tools.ctl, args, timeout)

    def upgrade(self, *args: str, timeout: float = CTL_TIMEOUT) -> str:
        """Run ``rabbitmq-upgrade -n NODE args...`` (it sits next to ``rabbitmqctl``)."""
        return self._tool(str(Path(self.tools.ctl).parent / "rabbitmq-upgrade"), args, timeout)

    def _tool(self, script: str, args: tuple[str, ...], timeout: float) -> str:
        name = Path(script).name
        argv, env = self.tools.launch([script, "-n", self.name, *args], self.env)
        try:
            done = subprocess.run([*self.launcher, *argv], env=env, cwd=self.directory, capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            raise NodeError(f"{name} {' '.join(args)} on {self.name}: no answer in {timeout:.0f} s") from None
        if done.returncode != 0:
            raise NodeError(f"{name} {' '.join(args)} on {self.name} failed ({done.returncode}):\n"
                            f"{done.stdout}{done.stderr}")
        return done.stdout

    def eval(self, expression: str) -> str:
        """Evaluate an Erlang expression on the node (``rabbitmqctl eval``); its printed result."""
        return self.ctl("eval", expression).strip()

    def os_pid(self) -> int:
        """The OS process id of the node's Erlang VM (from the pid file the node writes)."""
        return int(self.pid_file.read_text().strip())

    def stop_app(self) -> None:
        """Stop the RabbitMQ application; the VM stays up, clients are disconnected."""
        self.ctl("stop_app")
        self.app_stopped = True

    def start_app(self, timeout: float = START_TIMEOUT) -> None:
        """Start the RabbitMQ application again; return once it runs."""
        self.ctl("start_app", timeout=timeout)
        self.ctl("await_startup", "--timeout", str(int(timeout)), timeout=timeout + 10)
        self.app_stopped = False

    def bring_up(self, timeout: float = START_TIMEOUT) -> None:
        """Make the node serve again, whatever a test did to it: start its VM (on its data) if it
        was stopped or killed, or its application if only that was stopped."""
        if not self.running:
            self.start(timeout)
        elif self.app_stopped:
            self.start_app(timeout)

    def await_safe_to_stop(self, timeout: float = START_TIMEOUT) -> None:
        """Block until every quorum queue with a member here has enough members online elsewhere
        to keep a majority without this node (``rabbitmq-upgrade await_online_quorum_plus_one``):
        what to check before stopping a node in a rolling restart."""
        self.upgrade("await_online_quorum_plus_one", "-t", str(int(timeout)), timeout=timeout + 10)

    def close_all_connections(self, reason: str) -> None:
        """Close every client connection, in every vhost."""
        self.ctl("close_all_connections", "--global", reason)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop the node cleanly (``rabbitmqctl stop``); kill it if it does not stop in time."""
        if not self.running:
            return
        try:
            self.ctl("stop", timeout=timeout)
        except NodeError:
            pass  # killed below if still there
        try:
            assert self.process is not None
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def restart(self, timeout: float = START_TIMEOUT) -> None:
        """Stop the node's VM cleanly and start it again, on the same data and ports."""
        self.stop()
        self.start(timeout)

    def kill(self) -> None:
        """SIGKILL the node's VM (and its process group): a crash, no goodbye to anyone."""
        if self.process is None:
            return
        try:
            os.kill(self.os_pid(), signal.SIGKILL)
        except (OSError, ValueError):
            pass  # no pid file yet, or the VM is gone already
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(STOP_TIMEOUT)

    def remove(self) -> None:
        """Kill the node if it runs and delete its directory."""
        self.kill()
        shutil.rmtree(self.directory, ignore_errors=True)


def failover(nodes: list[RabbitNode], first: int = 0) -> str:
    """The failover URL list of ``nodes`` (``amqp://...//;amqp://...//``), starting at
    ``nodes[first]``: what a worker or producer of a cluster is given, each its own start."""
    ordered = nodes[first:] + nodes[:first]
    return ";".join(node.url for node in ordered)


class RabbitNodes:
    """Private nodes sharing one temporary directory and one Erlang cookie.

    A context manager: leaving it kills every node it started and deletes the directory, also
    when the test failed. Every node is created with the user ``user`` (its ``default_user``).
    """

    def __init__(self, *, user: str = "guest", password: str = "guest", tools: Tools | None = None) -> None:
        found = tools or find_tools()
        if found is None:
            raise NodeError("RabbitMQ is not installed: rabbitmq-server and rabbitmqctl are not on PATH")
        self.tools = found
        self.base = Path(tempfile.mkdtemp(prefix="rabbitmq-nodes-", dir=self.tools.scratch))
        self.home = self.base / "home"
        self.home.mkdir()
        cookie = self.home / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(20))
        cookie.chmod(0o400)  # Erlang refuses a cookie others can read
        self.token = f"{os.getpid()}-{secrets.token_hex(3)}"
        self.user, self.password = user, password
        self.nodes: list[RabbitNode] = []

    def node(self, *, address: str = LOOPBACK, launcher: Sequence[str] = (),
             tls: TLSListener | None = None) -> RabbitNode:
        """A new node of this set, not started yet (``address``, ``launcher``: see RabbitNode; AMQP
        over TLS only, with ``tls``)."""
        name = f"activity-tests-{self.token}-{len(self.nodes) + 1}@localhost"
        node = RabbitNode(name, base=self.base, home=self.home, tools=self.tools, user=self.user,
                          password=self.password, address=address, launcher=launcher, tls=tls)
        self.nodes.append(node)
        return node

    def start_node(self, timeout: float = START_TIMEOUT, *, tls: TLSListener | None = None) -> RabbitNode:
        """A new node, started (AMQP over TLS only, with ``tls``)."""
        return self.node(tls=tls).start(timeout)

    def cluster(self, size: int, timeout: float = START_TIMEOUT) -> list[RabbitNode]:
        """``size`` new nodes joined in one cluster (the first is the seed the others join)."""
        first = self.start_node(timeout)
        members = [first]
        for _ in range(size - 1):
            node = self.start_node(timeout)
            node.stop_app()
            node.ctl("join_cluster", first.name)
            node.start_app(timeout)
            members.append(node)
        return members

    def remove(self) -> None:
        """Kill every node and delete the directory."""
        for node in self.nodes:
            node.remove()
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> RabbitNodes:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.remove()

