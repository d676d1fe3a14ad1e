"""Session-wide hooks: the tests' vhosts and broker user leave the machine's broker at the end."""

from __future__ import annotations

import pytest

from tests.harness import VHOSTS


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Delete the session's vhosts (queues and all) and its broker user."""
    VHOSTS.close()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say where the tests ran on the broker (or why they shared its default vhost)."""
    summary = VHOSTS.summary()
    if summary:
        terminalreporter.write_line(f"broker: {summary}")
