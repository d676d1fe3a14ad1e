"""The RabbitMQ 4.x nodes of ``tests/rabbitmq4.py``: Debian 13's server, an ``epmd`` of their own,
and nothing left running or mounted once a test is done, even when it fails."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import rabbitmq4
from tests.harness import wait_for_exit

#: Seconds for a killed set's processes to be gone.
DEADLINE = 30.0


def test_a_set_runs_4x_on_its_own_epmd_and_leaves_nothing_behind_even_when_the_test_fails() -> None:
    rabbitmq4.require()
    with pytest.raises(RuntimeError, match="the test failed"):
        with rabbitmq4.Rabbit4Nodes() as nodes:
            node = nodes.start_node()
            assert node.ctl("version").startswith("4.")
            processes, base = nodes.processes(), nodes.base
            assert any("epmd" in command for command in processes.values()), processes
            # its epmd knows this set's node, not the machine's broker (which uses the default 4369)
            names = node.eval("erl_epmd:names().")
            assert node.name.split("@")[0] in names and '"rabbit"' not in names, names
            raise RuntimeError("the test failed")
    assert not wait_for_exit(processes, DEADLINE), "processes of the set outlived it"
    assert not base.exists()
    mounts = Path("/proc/self/mounts").read_text()
    assert str(rabbitmq4.root_directory()) not in mounts, "something is mounted in the root"
