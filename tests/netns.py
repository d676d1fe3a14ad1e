"""A test host of its own: a network namespace, reached from this machine over a veth pair, whose
link a test can cut (a network partition) and restore (heal) while the programs on both sides run.

A partition is not a broker stopped or a connection closed: nobody says goodbye. Each side finds
out only when it next expects something from the other, and each side at its own time. Here the
broker runs on the test host (a private node, :func:`start_node`) and the worker on this machine::

    with RabbitNodes() as nodes, NetnsHost() as host:
        node = start_node(nodes, host)       # amqp://...@10.x.y.2:PORT//
        ...                                  # point the worker at node.url
        host.partition()                     # this machine's packets to the host are dropped
        host.heal()

:meth:`NetnsHost.partition` adds a blackhole route to the host's address on this machine, as
the user who reported the problem did. It splits the sides as a partition does (measured with
RabbitMQ 3.10 and py-amqp):

- the client notices within a second or two of its next write: py-amqp sets ``TCP_USER_TIMEOUT``
  (1 s) on its sockets, so the kernel aborts a connection whose data stays unacknowledged that
  long, and a worker writes (acks, heartbeats) all the time; a new ``connect()`` fails at once
  (``EINVAL``);
- the broker does not: what it sends still arrives here, but the answers (acks, then resets) are
  dropped on the way back, so it holds the connection until its heartbeat timeout, or until it
  next sends after :meth:`NetnsHost.heal`, when this machine answers with a reset (see
  :meth:`NetnsHost.hold_abandoned`).

The other way, a link set down, was measured too. This machine's end down removes the route to
the host: packets to it follow the default route out of the machine (a new ``connect()`` was
refused by whatever answered there), not a thing for a test to send into a network. The
namespace's end down keeps the route: the client notices in about 4 s ("No route to host", once
ARP gives up) and the broker does not, like the blackhole, but every reconnection attempt then
waits 3 s for ARP.

The host's RabbitMQ node needs an Erlang port mapper inside the namespace (this machine's one on
127.0.0.1 is not reachable from there): the node starts one itself, and :meth:`NetnsHost.remove`
ends every process left in the namespace, then deletes the links, the route and the namespace,
also when the test failed. Creating namespaces needs root (``CAP_NET_ADMIN``) and iproute2.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shutil
import subprocess
from types import TracebackType

from tests.harness import kill_all, wait_for_exit
from tests.rabbitmq_node import RabbitNode, RabbitNodes

#: The private range the hosts' /30 networks are taken from (one /30 per host, chosen at random
#: among those no route of this machine covers, so that hosts of concurrent tests do not meet).
ADDRESS_POOL = ipaddress.IPv4Network("10.231.0.0/16")

#: How long one ``ip`` command may take.
IP_TIMEOUT = 30.0

#: How long the processes left in a namespace may take to exit after SIGKILL.
EXIT_TIMEOUT = 30.0


class NetnsError(RuntimeError):
    """A namespace, link or route could not be made or changed; says which command failed."""


def unavailable() -> str | None:
    """Why a test host cannot be made here (no iproute2, not root), or None when it can."""
    if shutil.which("ip") is None:
        return "iproute2 is not installed (no `ip` on PATH)"
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_NET_ADMIN)"
    return None


def ip(*args: str, namespace: str | None = None) -> str:
    """Run ``ip [-n NAMESPACE] args...``; its output, or :class:`NetnsError` with its error."""
    command = ["ip", *(("-n", namespace) if namespace else ()), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=IP_TIMEOUT)
    if done.returncode != 0:
        raise NetnsError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def port_of(endpoint: str) -> str:
    """The port of an ``address:port`` as ``ss`` prints it."""
    return endpoint.rsplit(":", 1)[1]


def free_network() -> ipaddress.IPv4Network:
    """A /30 of :data:`ADDRESS_POOL` that no route of this machine covers or overlaps."""
    taken = [ipaddress.ip_network(route["dst"], strict=False)
             for route in json.loads(ip("-j", "-4", "route", "show", "table", "all") or "[]")
             if route.get("dst", "default") != "default"]
    candidates = list(ADDRESS_POOL.subnets(new_prefix=30))
    for _ in range(100):
        network = secrets.choice(candidates)
        if not any(network.overlaps(other) for other in taken):
            return network
    raise NetnsError(f"no free /30 in {ADDRESS_POOL}")


class NetnsHost:
    """A network namespace with a veth link to this machine, on a /30 of its own.

    A context manager: entering creates it all, leaving removes it all (see :meth:`remove`).
    :attr:`address` is the host's address, :attr:`launcher` the command prefix that runs a
    program on the host (``ip netns exec NAME``).
    """

    def __init__(self) -> None:
        token = secrets.token_hex(4)
        self.name = f"activity-tests-{os.getpid()}-{token}"
        self.outside_link, self.inside_link = f"vt{token}o", f"vt{token}i"  # at most 15 characters
        self.network = free_network()
        outside, inside = self.network.hosts()
        self.outside_address, self.address = str(outside), str(inside)
        self.partitioned = False
        #: The ``ip rule`` selectors that hold abandoned connections (deleted by :meth:`remove`).
        self._rules: list[tuple[str, ...]] = []
        self._created = False

    @property
    def launcher(self) -> tuple[str, ...]:
        """The command prefix that runs a program inside the namespace."""
        return ("ip", "netns", "exec", self.name)

    def create(self) -> NetnsHost:
        """The namespace, its loopback up, and the veth link with an address at each end."""
        prefix = self.network.prefixlen
        ip("netns", "add", self.name)
        self._created = True
        ip("link", "add", self.outside_link, "type", "veth", "peer", "name", self.inside_link)
        ip("link", "set", self.inside_link, "netns", self.name)
        ip("addr", "add", f"{self.outside_address}/{prefix}", "dev", self.outside_link)
        ip("link", "set", self.outside_link, "up")
        ip("addr", "add", f"{self.address}/{prefix}", "dev", self.inside_link, namespace=self.name)
        ip("link", "set", self.inside_link, "up", namespace=self.name)
        ip("link", "set", "lo", "up", namespace=self.name)
        return self

    def partition(self) -> None:
        """Drop every packet this machine sends to the host (see the module docstring)."""
        ip("route", "add", "blackhole", f"{self.address}/32")
        self.partitioned = True

    def heal(self) -> int:
        """Let this machine's packets reach the host again, except on the connections this machine
        gave up during the partition (see :meth:`hold_abandoned`); how many those are."""
        held = self.hold_abandoned()
        ip("route", "del", "blackhole", f"{self.address}/32")
        self.partitioned = False
        return held

    def hold_abandoned(self) -> int:
        """Keep dropping this machine's packets on every connection the host still has open but
        this machine has closed (its answers to the host's retransmissions, resets, would tell the
        host at once); how many there are. The host then learns of them from its heartbeat timeout
        only, as after a partition of a minute or more, whose next retransmission is as far away:
        the worst case for a client that reconnects, and the same in every run."""
        here = {local for local, _ in self._sockets(self.address, "all")}
        held = 0
        for inside, outside in self._sockets(self.outside_address, "established", inside=True):
            if outside not in here:
                rule = ("to", f"{self.address}/32", "ipproto", "tcp", "sport", port_of(outside),
                        "dport", port_of(inside), "blackhole")
                ip("rule", "add", *rule)
                self._rules.append(rule)
                held += 1
        return held

    def _sockets(self, peer: str, state: str, *, inside: bool = False) -> list[tuple[str, str]]:
        """(local, peer) ``address:port`` of every TCP socket of this machine (or of the host)
        connected to ``peer`` in ``state`` (an ``ss`` state filter: ``all``, ``established``)."""
        command = [*(self.launcher if inside else ()), "ss", "-Htn", "state", state, "dst", peer]
        done = subprocess.run(command, capture_output=True, text=True, timeout=IP_TIMEOUT, check=True)
        return [(fields[-2], fields[-1]) for fields in map(str.split, done.stdout.splitlines())]

    def pids(self) -> list[int]:
        """The processes running inside the namespace."""
        return [int(pid) for pid in ip("netns", "pids", self.name).split()]

    def remove(self) -> None:
        """Heal, end every process left inside (SIGKILL), delete the link (both ends go) and the
        namespace. Each step runs even when one before it failed; the first error is raised."""
        if not self._created:
            return
        errors: list[Exception] = []
        steps = (self._heal_if_partitioned, self._delete_rules, self._end_processes, self._delete_link,
                 self._delete_namespace)
        for step in steps:
            try:
                step()
            except Exception as error:  # removed as far as it goes, then said
                errors.append(error)
        self._created = False
        if errors:
            raise errors[0]

    def _heal_if_partitioned(self) -> None:
        if self.partitioned:
            ip("route", "del", "blackhole", f"{self.address}/32")
            self.partitioned = False

    def _delete_rules(self) -> None:
        while self._rules:
            ip("rule", "del", *self._rules.pop())

    def _end_processes(self) -> None:
        pids = self.pids()
        kill_all(pids)
        left = wait_for_exit(pids, EXIT_TIMEOUT)
        if left:
            raise NetnsError(f"processes {sorted(left)} in {self.name} did not exit")

    def _delete_link(self) -> None:
        if self.outside_link in ip("-o", "link", "show"):
            ip("link", "del", self.outside_link)

    def _delete_namespace(self) -> None:
        ip("netns", "del", self.name)

    def __enter__(self) -> NetnsHost:
        try:
            return self.create()
        except BaseException:
            self.remove()
            raise

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.remove()


def start_node(nodes: RabbitNodes, host: NetnsHost) -> RabbitNode:
    """A new node of ``nodes`` started on ``host``: it listens on the host's address only, and
    its server and ``rabbitmqctl`` run inside the namespace."""
    return nodes.node(address=host.address, launcher=host.launcher).start()
