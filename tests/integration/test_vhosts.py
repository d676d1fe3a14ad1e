"""The tests' vhosts on the machine's broker (``tests/vhosts.py``): each usable by the session's
user, deleted with what it holds once given back, and nothing of the session left on the broker
after ``close()``, the user included.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from urllib.parse import unquote, urlsplit

import pytest
from kombu import Connection

from tests.harness import BROKER_URL, TEST_BROKER_PASSWORD, require_broker
from tests.vhosts import VhostPool


def reachable(url: str) -> bool:
    """Whether the session's user can open the vhost of ``url``."""
    try:
        with Connection(url, connect_timeout=5) as connection:
            connection.ensure_connection(max_retries=1)
            connection.default_channel.queue_declare("probe", durable=True)
    except Exception:  # refused: no such vhost, or no such user
        return False
    return True


def broker_lists(what: str) -> set[str]:
    """The names ``rabbitmqctl list_vhosts`` / ``list_users`` shows."""
    out = subprocess.run(["rabbitmqctl", "-q", what, "--formatter", "json"], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    return {entry.get("name") or entry["user"] for entry in json.loads(out)}


def vhost_of(url: str) -> str:
    return unquote(urlsplit(url).path[1:])


def test_vhosts_are_made_ahead_deleted_once_given_back_and_all_removed_with_the_user() -> None:
    require_broker()
    if shutil.which("rabbitmqctl") is None:
        if os.environ.get("CI"):
            pytest.fail("rabbitmqctl is not on PATH")
        pytest.skip("rabbitmqctl is not on PATH")
    pool = VhostPool.for_session(BROKER_URL, user_prefix="activity-tests-pool", password=TEST_BROKER_PASSWORD,
                                 batch=2)
    try:
        first, second = pool.take(), pool.take()
        assert reachable(first) and reachable(second) and first != second
        pool.give_back(first)
        third = pool.take()  # half a batch left: the next is made, deleting what was given back
        pool.settle()
        assert not reachable(first) and reachable(third)  # second: still in use, never given back
        assert pool.user in broker_lists("list_users")
    finally:
        pool.close()
    assert not {vhost_of(url) for url in (first, second, third)} & broker_lists("list_vhosts")
    assert pool.user not in broker_lists("list_users")
