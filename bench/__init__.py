"""``python -m bench`` (``make bench``): how fast the worker moves events, against yardsticks
measured in the same run.

A throughput number on its own says little on a shared, noisy machine, so every case is
measured next to two baselines taken minutes apart on the same broker:

- the **bare drain**: a plain kombu consumer that reads and acknowledges the same messages and
  does nothing else; the most any consumer of this broker could do (the limit);
- the **naive design**: one Celery task and one HTTP request per event (the floor);
- with ``--baseline REF``, the worker of another commit on a copy of the same backlog, right
  after this one's (an A/B of a change, in one run).

The bare drain's CPU per event (its consuming thread's, and the broker's meanwhile) is the
yardstick of the worker's CPU per event.

The headline numbers are the ratios: the worker's events/s over each baseline, the rate
against a slow API (the sandbox's per-request latency) over the rate against an instant one,
and the rate with 1000 asset_ids over the rate with 7. The absolute figures, CPU per event for
the worker and the broker, peak memory and the batches the API saw come with them.

Two scenarios follow, about what goes wrong rather than speed: the API down for minutes while
events keep arriving (nothing may be dead-lettered, few requests may reach the down API), and
a SIGKILL of the worker mid-run (how many duplicates a kill costs, and why). Everything is
written to ``bench-results/latest.json``.

Modules: :mod:`bench.events` (the messages), :mod:`bench.broker` (queues, preload, bare
drain), :mod:`bench.procs` (spawned processes and their /proc figures), :mod:`bench.runs`
(one measured worker run), :mod:`bench.scenarios` (the outage and the SIGKILL),
:mod:`bench.naive` (the naive Celery app), :mod:`bench.profile` (py-spy), :mod:`bench.report`
(tables, targets, JSON), :mod:`bench.baseline` (another commit's worker). ``python -m
bench.upload`` (:mod:`bench.upload`) measures the worker's own paths in process, microseconds
per event, without a broker: the steadiest figure on a shared machine.
"""
