"""A local, Netcore-compatible Activity API for tests, demos and benchmarks: the *sandbox*.

It answers ``POST /v1/activity/upload`` by the vendor's documented rules, remembers what it
accepted, and misbehaves on request (errors, ``Retry-After``, delays, dropped connections, odd
200 answers) so the worker's retries and dead-lettering can be exercised for real, over HTTP.

It checks the API's rules with its own code and imports nothing else from ``worker``: a mistake
in the worker's validation cannot hide by being repeated here.

In a test::

    with Sandbox() as sandbox:               # a free port on 127.0.0.1
        sandbox.add_fault(status=500, count=1)
        ...                                  # run the worker with NETCORE_API_URL=sandbox.url
        assert sandbox.wait_until(lambda s: s.accepted_count() == 3, timeout=5)

From a shell: ``python -m worker.sandbox --port 8080 --fail-rate 0.05``.
"""

from worker.sandbox.faults import FaultError
from worker.sandbox.server import Sandbox
from worker.sandbox.store import RequestRecord

__all__ = ["FaultError", "RequestRecord", "Sandbox"]
