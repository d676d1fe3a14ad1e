"""Changing a setting of the machine's RabbitMQ for one test, and putting back exactly what was there.

Only settings the broker reads when a channel opens (``consumer_timeout``,
``channel_tick_interval``, ``max_message_size``): they reach the channels of the worker the
test starts inside the ``with`` block, and nothing stays changed after it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

import pytest


def rabbitmqctl(*args: str) -> str:
    """Run ``rabbitmqctl``; fail in CI, skip locally, when it is not there."""
    if shutil.which("rabbitmqctl") is None:
        if os.environ.get("CI"):
            pytest.fail("rabbitmqctl is not on PATH")
        pytest.skip("rabbitmqctl is not on PATH")
    return subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, text=True, timeout=120).stdout


@contextmanager
def broker_env(**values: int) -> Iterator[None]:
    """Set ``rabbit`` application settings for the block; restore each to what it was (a
    setting that was not set is unset again: never one that was, the node needs some)."""
    before = {name: rabbitmqctl("eval", f"application:get_env(rabbit, {name}).").strip() for name in values}
    try:
        for name, value in values.items():
            rabbitmqctl("eval", f"application:set_env(rabbit, {name}, {value}).")
        yield
    finally:
        for name, old in before.items():
            if old.startswith("{ok,"):
                rabbitmqctl("eval", f"application:set_env(rabbit, {name}, {old[4:-1]}).")
            else:
                rabbitmqctl("eval", f"application:unset_env(rabbit, {name}).")
