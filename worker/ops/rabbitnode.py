"""A RabbitMQ node in a directory of its own: its data, logs, configuration and Erlang cookie.

The node make run starts when no broker answers (:mod:`worker.ops.localbroker`):

- nothing of ``/etc/rabbitmq`` applies to it, and its plugins are off;
- its node name is the directory's own (``netcore-activity-<hash>@localhost``), so two
  checkouts never meet; its data stays in the directory from one run to the next;
- it listens on the loopback interface only: on the port asked for when that port is free, else
  on a free one; its Erlang distribution port is a free one too;
- it runs in a process group of its own (no Ctrl-C of the terminal reaches it) until
  :meth:`LocalNode.stop`; Erlang's port mapper (epmd), if the node had to start one, goes with
  it unless another Erlang node has registered with it since.

``rabbitmqctl wait`` says when it runs (no polling); stopping is a SIGTERM to ``rabbitmq-server``,
which shuts the broker down cleanly.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

#: How long the node may take to boot (about 5 s on a quiet 2-core machine), and to stop.
START_TIMEOUT = 120.0
STOP_TIMEOUT = 60.0

#: The node's configuration.
NODE_CONFIG = """\
default_user = {user}
default_pass = {password}
default_vhost = {vhost}
log.console = false
"""


class NodeError(Exception):
    """The node could not start: the message holds what it said."""


@dataclass(frozen=True)
class Tools:
    """The RabbitMQ scripts that run as whoever calls them (not Debian's wrapper, which runs every
    command as the ``rabbitmq`` user, with that user's cookie)."""

    server: str
    ctl: str


def find_tools() -> Tools | None:
    """``rabbitmq-server`` and ``rabbitmqctl`` found on ``PATH``, or None when not installed."""
    found = []
    for name in ("rabbitmq-server", "rabbitmqctl"):
        path = shutil.which(name)
        if path is None:
            return None
        real = Path(path).resolve()
        if real.name == "rabbitmq-script-wrapper":
            real = (real.parent / name).resolve()
        found.append(str(real))
    return Tools(*found)


def port_is_free(port: int) -> bool:
    """Whether nothing listens on ``port`` of the loopback interface (we could bind it)."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A port of the loopback interface nothing listens on now (the system picks it)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class LocalNode:
    """One node in ``directory`` (see the module docstring): :meth:`start`, :attr:`url`, :meth:`stop`."""

    def __init__(self, directory: Path, url: str, tools: Tools) -> None:
        """``url``: the first URL of the broker list, whose user, password, vhost and port it takes."""
        self.directory = directory.resolve()
        self.tools = tools
        parts = urlsplit(url)
        self.user, self.password = unquote(parts.username or "guest"), unquote(parts.password or "guest")
        self.vhost = unquote(parts.path[1:]) or "/"
        wanted = parts.port or 5672
        self.port = wanted if port_is_free(wanted) else free_port()
        self.dist_port = free_port()
        userinfo = parts.netloc.rpartition("@")[0] or "guest:guest"
        #: The URL the processes are given: this node, with the broker URL's user, password and vhost.
        self.url = urlunsplit(("amqp", f"{userinfo}@127.0.0.1:{self.port}", parts.path or "/", "", ""))
        digest = hashlib.sha1(str(self.directory).encode()).hexdigest()[:10]
        self.name = f"netcore-activity-{digest}@localhost"
        self.process: subprocess.Popen[bytes] | None = None
        self._started_epmd = False

    @property
    def pid_file(self) -> Path:
        return self.directory / "node.pid"

    def env(self, base: Mapping[str, str]) -> dict[str, str]:
        """``base`` and the variables that make ``rabbitmq-server`` and ``rabbitmqctl`` this node's."""
        d = self.directory
        return {
            **base,
            "HOME": str(d / "home"),  # its .erlang.cookie, read by the server and rabbitmqctl
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
            "RABBITMQ_LOG_BASE": str(d / "log"),
            "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(d / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
            "RABBITMQ_CONF_ENV_FILE": str(d / "rabbitmq-env.conf"),
            "RABBITMQ_PID_FILE": str(self.pid_file),
            # the distribution port on the loopback interface only, like the AMQP port
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }

    def start(self, base_env: Mapping[str, str], timeout: float = START_TIMEOUT) -> None:
        """Start the node (on its data, if any); return once it runs, or raise NodeError with its output."""
        self._prepare()
        env = self.env(base_env)
        self._started_epmd = not _epmd_running()
        self.pid_file.unlink(missing_ok=True)
        with open(self.directory / "server.out", "ab") as output:
            self.process = subprocess.Popen([self.tools.server], cwd=self.directory, env=env, stdin=subprocess.DEVNULL,
                                            stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_until_running(env, timeout)
        except BaseException:  # NodeError, or a Ctrl-C while it boots: nothing stays behind
            self.stop()
            raise

    def _prepare(self) -> None:
        """The directory, the configuration and the cookie (kept from an earlier run)."""
        home = self.directory / "home"
        home.mkdir(parents=True, exist_ok=True)
        self.directory.chmod(0o700)  # the configuration holds the password, the cookie gives control
        config = NODE_CONFIG.format(user=self.user, password=self.password, vhost=self.vhost)
        (self.directory / "rabbitmq.conf").write_text(config)
        (self.directory / "enabled_plugins").write_text("[].\n")
        (self.directory / "rabbitmq-env.conf").write_text("")  # the machine's env file does not apply
        cookie = home / ".erlang.cookie"
        if not cookie.exists():
            cookie.write_text(secrets.token_hex(20))
            cookie.chmod(0o400)  # Erlang refuses a cookie others can read

    def _wait_until_running(self, env: Mapping[str, str], timeout: float) -> None:
        """``rabbitmqctl wait``: until the node runs, or its process has exited (then at once)."""
        assert self.process is not None
        waiter = subprocess.Popen([self.tools.ctl, "-n", self.name, "wait", "--timeout", str(int(timeout)),
                                   str(self.pid_file)], env=env, cwd=self.directory, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        server = self.process

        def stop_waiting_if_the_server_dies() -> None:
            server.wait()
            if waiter.poll() is None:
                waiter.kill()

        threading.Thread(target=stop_waiting_if_the_server_dies, daemon=True, name="rabbitmq-server-exit").start()
        try:
            said, _ = waiter.communicate(timeout=timeout + 10)
        except subprocess.TimeoutExpired:
            waiter.kill()
            said, _ = waiter.communicate()
        if waiter.returncode != 0 or server.poll() is not None:
            tail = (self.directory / "server.out").read_text(errors="replace")[-1500:]
            raise NodeError(f"the RabbitMQ node in {self.directory} did not start (its output: server.out there):\n"
                            f"{tail}{said.decode(errors='replace')}")

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop the node cleanly (SIGTERM: ``rabbitmq-server`` shuts the broker down), killed if it
        has not within ``timeout``; then the port mapper, if it was the node's."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except (subprocess.TimeoutExpired, KeyboardInterrupt):
                pass
        self._kill_group()
        if self._started_epmd:
            _stop_epmd_if_unused()

    def _kill_group(self) -> None:
        """Whatever of the node's process group is left (the Erlang VM's helpers)."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.process.wait()


def _epmd_running() -> bool:
    """Whether Erlang's port mapper answers (``epmd -names``); False also when epmd is not installed."""
    epmd = shutil.which("epmd")
    return epmd is not None and subprocess.run([epmd, "-names"], capture_output=True, timeout=30).returncode == 0


def _stop_epmd_if_unused() -> None:
    """``epmd -kill`` when no Erlang node is registered with it any more."""
    epmd = shutil.which("epmd")
    if epmd is None:
        return
    names = subprocess.run([epmd, "-names"], capture_output=True, text=True, timeout=30)
    if names.returncode == 0 and "name " not in names.stdout:
        subprocess.run([epmd, "-kill"], capture_output=True, timeout=30)
