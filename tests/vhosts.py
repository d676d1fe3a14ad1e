"""Vhosts of the test session's own on the machine's RabbitMQ, each test in one, deleted after.

Tests share the machine's broker with whatever else runs on it (on a laptop, the developer's
own applications; on a shared machine, other people's tests). Each test that uses the broker
gets a vhost nobody else sees, and a broker user that exists only for this session: deleting
them at the end leaves the broker as it was found.

``rabbitmqctl`` costs about 0.4 s a call (it boots an Erlang VM) and a vhost about 0.1 s to
create and 0.06 s to delete, so one ``rabbitmqctl eval`` creates a batch of vhosts and, in the
same call, deletes the vhosts tests gave back since the previous batch; it runs in a background
thread while the tests use the vhosts made before, so tests wait for it only at the start of the
session. :meth:`VhostPool.close` deletes what is left and the user. A vhost is thus deleted
after its test, at the latest with the next batch or at the end of the session.
"""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import subprocess
import threading
from collections.abc import Sequence
from urllib.parse import quote, unquote, urlsplit

#: Vhosts made by one ``rabbitmqctl eval``; the next batch is made when half of one is left.
BATCH = 8

#: How long one ``rabbitmqctl eval`` may take.
CTL_TIMEOUT = 60.0

#: Hosts that mean "this machine", where ``rabbitmqctl`` reaches the broker of the URL.
LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


class VhostError(RuntimeError):
    """``rabbitmqctl`` could not create or delete the session's vhosts; says why."""


def erlang_binary(text: str) -> str:
    """``text`` as an Erlang binary literal (our names hold no quote or backslash; checked)."""
    if any(c in text for c in '"\\'):
        raise ValueError(f"not a safe name for rabbitmqctl eval: {text!r}")
    return f'<<"{text}">>'


class VhostPool:
    """Vhosts for the tests of one session, made in batches on the broker at ``broker_url``.

    ``take()`` hands out the AMQP URL of a fresh vhost on which the session's user (``user``,
    ``password``) has every permission; ``give_back(url)`` has it deleted; ``close()`` deletes
    every vhost of the pool, and the user. Batches are made by a background thread, one at a
    time. Thread-safe.
    """

    def __init__(self, *, broker_url: str, user: str, password: str, ctl: Sequence[str] = ("rabbitmqctl",),
                 batch: int = BATCH) -> None:
        parts = urlsplit(broker_url)
        self.host = parts.hostname or "localhost"
        self.port = parts.port or 5672
        self.user, self.password = user, password
        self.ctl = list(ctl)
        self.batch = batch
        self.prefix = f"{user}.v"
        self.created = 0
        self._user_exists = False
        self._touched = False  # a call ran, so the user may exist: close() deletes it
        self._ready: list[str] = []  # created, not handed out yet
        self._returned: list[str] = []  # given back, to delete with the next batch
        self._live: set[str] = set()  # created (or being created) and not deleted yet
        self._maker: threading.Thread | None = None  # the batch being made, if any
        self._error: VhostError | None = None  # why the last batch failed
        self._changed = threading.Condition()

    @classmethod
    def for_session(cls, broker_url: str, *, user_prefix: str, password: str, batch: int = BATCH) -> VhostPool:
        """A pool with a user unique to this session (``user_prefix-PID-RANDOM``).

        Raises :class:`VhostError` when the broker is not on this machine (``rabbitmqctl`` would
        reach another one).
        """
        host = urlsplit(broker_url).hostname or "localhost"
        if host not in LOCAL_HOSTS:
            raise VhostError(f"the broker is on {host}, not this machine: rabbitmqctl cannot make its vhosts")
        user = f"{user_prefix}-{os.getpid()}-{secrets.token_hex(3)}"
        return cls(broker_url=broker_url, user=user, password=password, batch=batch)

    def url(self, vhost: str) -> str:
        """The AMQP URL of ``vhost`` for the session's user."""
        return f"amqp://{quote(self.user)}:{quote(self.password)}@{self.host}:{self.port}/{quote(vhost, safe='')}"

    def take(self) -> str:
        """The URL of a vhost of the session's own; blocks only while the first batch is made."""
        with self._changed:
            self._make_more_if_low()
            if not self._changed.wait_for(lambda: self._ready or self._error, timeout=CTL_TIMEOUT + 10):
                raise VhostError(f"no vhost made in {CTL_TIMEOUT + 10:.0f} s")
            if not self._ready:
                assert self._error is not None
                raise self._error
            vhost = self._ready.pop()
            self._make_more_if_low()
            return self.url(vhost)

    def give_back(self, url: str) -> None:
        """Have the vhost of ``url`` deleted (with the next batch, or at :meth:`close`)."""
        with self._changed:
            self._returned.append(unquote(urlsplit(url).path[1:]))

    def settle(self) -> None:
        """Wait until the batch being made, if any, is done (and what it deletes is gone)."""
        with self._changed:
            self._changed.wait_for(lambda: self._maker is None, timeout=CTL_TIMEOUT + 10)

    def close(self) -> None:
        """Delete every vhost of the pool (given back, still in use, or never used) and the user."""
        self.settle()
        with self._changed:
            if not self._touched:
                return
            self._run(create=[], delete=sorted(self._live), delete_user=True)
            self._returned, self._ready, self._live = [], [], set()
            self._touched = False  # nothing left: a second close() has nothing to do

    def _make_more_if_low(self) -> None:
        """Start making the next batch (and deleting what was given back) when half a batch is left.

        Called with the lock held.
        """
        if self._maker is not None or self._error is not None or len(self._ready) > self.batch // 2:
            return
        fresh = [f"{self.prefix}{self.created + n + 1}" for n in range(self.batch)]
        gone, self._returned = self._returned, []
        self.created += len(fresh)
        self._live.update(fresh)  # close() deletes them even if this batch fails halfway
        self._maker = threading.Thread(target=self._make, args=(fresh, gone), daemon=True, name="vhosts")
        self._maker.start()

    def _make(self, fresh: list[str], gone: list[str]) -> None:
        """The background thread: one ``rabbitmqctl eval``, then hand the batch over."""
        try:
            self._run(create=fresh, delete=gone)
        except VhostError as error:
            with self._changed:
                self._error, self._maker = error, None
                self._returned.extend(gone)
                self._changed.notify_all()
            return
        with self._changed:
            self._live.difference_update(gone)
            self._ready[:0] = fresh[::-1]  # after what is left, so vhosts are used in order
            self._maker = None
            self._changed.notify_all()

    def _run(self, *, create: Sequence[str], delete: Sequence[str], delete_user: bool = False) -> None:
        """One ``rabbitmqctl eval`` doing all of it; raise :class:`VhostError` with its output if not done.

        Never runs twice at once: the batch maker runs alone, and :meth:`close` waits for it.
        """
        add_user = not self._user_exists and not delete_user
        expression = eval_expression(user=self.user, password=self.password if add_user else None,
                                     create=create, delete=delete, delete_user=delete_user)
        self._touched = True
        try:
            done = subprocess.run([*self.ctl, "eval", expression], capture_output=True, text=True,
                                  timeout=CTL_TIMEOUT)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise VhostError(f"rabbitmqctl eval did not run: {error}") from None
        if done.returncode != 0 or done.stdout.strip() != "done":
            output = (done.stdout + done.stderr).strip()[-2000:]
            raise VhostError(f"rabbitmqctl eval failed ({done.returncode}): {output}")
        self._user_exists = not delete_user


def eval_expression(*, user: str, password: str | None, create: Sequence[str], delete: Sequence[str],
                    delete_user: bool) -> str:
    """The Erlang expression that (in this order) adds ``user`` with ``password`` unless it is None,
    deletes the vhosts ``delete``, adds the vhosts ``create`` with every permission for ``user``,
    deletes ``user`` if asked, and evaluates to ``done``."""
    acting, who = erlang_binary("activity-tests"), erlang_binary(user)
    everything = '<<".*">>, <<".*">>, <<".*">>'
    steps = []
    if password is not None:
        steps.append(f"ok = rabbit_auth_backend_internal:add_user({who}, {erlang_binary(password)}, {acting})")
    if delete:
        steps.append(f"[rabbit_vhost:delete(V, {acting}) || V <- [{', '.join(map(erlang_binary, delete))}]]")
    if create:
        steps.append(f"[begin ok = rabbit_vhost:add(V, {acting}), ok = rabbit_auth_backend_internal:set_permissions("
                     f"{who}, V, {everything}, {acting}) end || V <- [{', '.join(map(erlang_binary, create))}]]")
    if delete_user:
        steps.append(f"rabbit_auth_backend_internal:delete_user({who}, {acting})")
    return ", ".join([*steps, "done"]) + "."


class SessionVhosts:
    """The vhosts of this test session on the machine's broker, made when a test first asks.

    Where ``rabbitmqctl`` cannot make them (not installed, not allowed, a broker on another
    machine), tests share the broker's default vhost, kept apart by queue names only, and
    :meth:`summary` says why; on CI (``CI`` set) that is an error instead.
    """

    def __init__(self, broker_url: str, *, user_prefix: str, password: str) -> None:
        self.broker_url = broker_url
        self.user_prefix, self.password = user_prefix, password
        self.pool: VhostPool | None = None
        self.unavailable: str | None = None
        self.handed_out = 0

    def take(self) -> str:
        """The URL of a fresh vhost of the session's own (or, failing that, of the shared one)."""
        if self.pool is None and self.unavailable is None:
            self._open()
        if self.pool is not None:
            try:
                url = self.pool.take()
            except VhostError as error:
                if os.environ.get("CI"):
                    raise
                self.unavailable = str(error)
                self.pool = None
            else:
                self.handed_out += 1
                return url
        if os.environ.get("CI"):
            raise VhostError(f"on CI every test needs a vhost of its own: {self.unavailable}")
        return self.broker_url

    def give_back(self, url: str) -> bool:
        """Have the vhost of ``url`` deleted, queues and all; False if it is the shared one."""
        if self.pool is None or url == self.broker_url:
            return False
        self.pool.give_back(url)
        return True

    def close(self) -> None:
        """Delete every vhost of the session and its user (at the end of the session)."""
        if self.pool is not None:
            self.pool.close()

    def summary(self) -> str | None:
        """One line for the end of the test run (None if no test asked for a vhost)."""
        if self.pool is not None:
            return (f"{self.handed_out} vhost(s) of the tests' own on {self.pool.host}:{self.pool.port} "
                    f"(user {self.pool.user}), deleted with the user at the end")
        if self.unavailable is not None:
            return f"tests shared the broker's default vhost: {self.unavailable}"
        return None

    def _open(self) -> None:
        if shutil.which("rabbitmqctl") is None:
            self.unavailable = "rabbitmqctl is not on PATH"
            return
        try:
            self.pool = VhostPool.for_session(self.broker_url, user_prefix=self.user_prefix, password=self.password)
        except VhostError as error:
            self.unavailable = str(error)
            return
        atexit.register(self.close)  # the session hook closes it first; this covers other runners
