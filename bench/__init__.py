"""``python -m bench`` (``make bench``): how fast the worker moves events, against yardsticks
measured in the same run.

A throughput number on its own says little on a shared, noisy machine, so every case is
measured next to two baselines taken minutes apart on the same broker:

- the **bare drain**: a plain kombu consumer that reads and acknowledges the same messages and
  does nothing else; the most any consumer of this broker could do (the limit);
- the **naive design**: one Celery task and one HTTP request per event (the floor).

The headline numbers are the ratios: the worker's events/s over each baseline. The absolute
figures, CPU per event for the worker and the broker, peak memory and the batches the API saw
come with them, and everything is written to ``bench-results/latest.json``.

Modules: :mod:`bench.events` (the messages), :mod:`bench.broker` (queues, preload, bare
drain), :mod:`bench.procs` (spawned processes and their /proc figures), :mod:`bench.runs`
(one measured worker run), :mod:`bench.naive` (the naive Celery app), :mod:`bench.profile`
(py-spy), :mod:`bench.report` (tables, targets, JSON).
"""
