"""The circuit breaker and the adaptive concurrency, on a ManualClock: no network, no sleeping."""

from __future__ import annotations

from typing import Any

import pytest

from worker.clock import ManualClock
from worker.upload.circuit import FAILURES_TO_OPEN, Circuit, Permit, State
from worker.upload.concurrency import AdaptiveConcurrency

pytestmark = pytest.mark.timeout(30)


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def __getattr__(self, name: str) -> Any:
        return lambda **kwargs: self.calls.append((name, kwargs))


def opened(clock: ManualClock | None = None, **kwargs: Any) -> tuple[Circuit, ManualClock, Recorder]:
    clock = clock or ManualClock()
    recorder = Recorder()
    circuit = Circuit(clock=clock, probe_base=1.0, probe_max=8.0, listeners=[recorder], **kwargs)
    for n in range(FAILURES_TO_OPEN):
        permit = circuit.permit()
        assert permit is not None
        circuit.failed(permit, batch=n % 2, error="the API answered 503")
    return circuit, clock, recorder


def test_failures_across_batches_open_the_circuit_once() -> None:
    circuit, _, recorder = opened()
    assert circuit.state is State.OPEN
    assert circuit.permit() is None
    assert [name for name, _ in recorder.calls] == ["circuit_opened"]
    assert recorder.calls[0][1]["failures"] == FAILURES_TO_OPEN


def test_a_success_in_between_keeps_it_closed() -> None:
    circuit = Circuit(clock=ManualClock(), probe_base=1.0, probe_max=8.0)
    for n in range(3 * FAILURES_TO_OPEN):
        permit = circuit.permit()
        assert permit is not None
        if n % FAILURES_TO_OPEN == FAILURES_TO_OPEN - 1:
            circuit.succeeded(permit)
        else:
            circuit.failed(permit, batch=n, error="503")
    assert circuit.state is State.CLOSED


def test_one_batch_alone_never_opens_it() -> None:
    circuit = Circuit(clock=ManualClock(), probe_base=1.0, probe_max=8.0)
    for _ in range(50):
        circuit.failed(Permit(), batch="the-one", error="503")
    assert circuit.state is State.CLOSED


def test_probes_come_one_at_a_time_at_doubling_intervals_up_to_the_cap() -> None:
    circuit, clock, recorder = opened()
    waits = []
    for _ in range(6):
        waits.append(circuit.wait_left())
        clock.advance(circuit.wait_left() - 0.001)
        assert circuit.poll() is State.OPEN  # not a moment early
        clock.advance(0.001)
        assert circuit.poll() is State.HALF_OPEN
        probe = circuit.permit()
        assert probe is not None and probe.probe
        assert circuit.permit() is None  # exactly one probe in flight
        circuit.failed(probe, batch="x", error="503")
        assert not Circuit.counts(probe, rate_limited=False)  # a failed probe spends no attempt
    assert waits == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert sum(1 for name, _ in recorder.calls if name == "probe_done") == 6


def test_a_good_probe_closes_it_and_the_next_outage_starts_from_the_base_interval() -> None:
    circuit, clock, recorder = opened()
    clock.advance(1.0)
    circuit.poll()
    probe = circuit.permit()
    assert probe is not None
    circuit.succeeded(probe)
    assert circuit.state is State.CLOSED
    assert ("circuit_closed", {"open_for": 1.0, "probes": 1}) in recorder.calls
    for n in range(FAILURES_TO_OPEN):
        circuit.failed(Permit(), batch=n, error="503")
    assert circuit.wait_left() == 1.0


def test_a_probe_that_never_reported_frees_the_way_for_another() -> None:
    circuit, clock, _ = opened()
    clock.advance(1.0)
    circuit.poll()
    with pytest.raises(RuntimeError):
        with circuit.request() as permit:
            assert permit is not None and permit.probe
            raise RuntimeError("a bug between the permit and the answer")
    again = circuit.permit()
    assert again is not None and again.probe


def test_retry_after_pauses_everything_until_then_capped() -> None:
    clock = ManualClock()
    circuit = Circuit(clock=clock, probe_base=1.0, probe_max=8.0)
    permit = circuit.permit()
    assert permit is not None
    circuit.failed(permit, batch="a", error="429", retry_after=30.0)
    assert circuit.state is State.PAUSED and circuit.permit() is None
    assert circuit.wait_left() == 8.0  # capped at the longest probe interval
    assert not Circuit.counts(permit, rate_limited=True)
    circuit.succeeded(Permit())  # an upload that was already in flight went through: the wait holds
    assert circuit.state is State.PAUSED
    clock.advance(8.0)
    assert circuit.poll() is State.HALF_OPEN


# --- adaptive concurrency ---------------------------------------------------------------------------


def run_window(limiter: AdaptiveConcurrency, clock: ManualClock, rtt: float, *, congested: bool = False,
               busy: bool = True) -> None:
    """One round of requests: as many as the limit (``busy``) or one, each taking ``rtt``."""
    count = limiter.limit if busy else 1
    starts = [limiter.started() for _ in range(count)]
    clock.advance(rtt)
    for n, started in enumerate(starts):
        limiter.finished(started, congested=congested and n == 0)


def test_slow_start_doubles_up_to_the_ceiling_while_latency_holds() -> None:
    clock = ManualClock()
    limiter = AdaptiveConcurrency(ceiling=64, clock=clock)
    limits = []
    for _ in range(8):
        run_window(limiter, clock, 0.15)
        limits.append(limiter.limit)
    assert limits == [2, 4, 8, 16, 32, 64, 64, 64]


def test_back_pressure_cuts_the_limit_then_it_grows_by_one() -> None:
    clock = ManualClock()
    limiter = AdaptiveConcurrency(ceiling=64, clock=clock)
    for _ in range(5):
        run_window(limiter, clock, 0.15)
    assert limiter.limit == 32
    run_window(limiter, clock, 0.15, congested=True)
    assert limiter.limit == 28  # 32 * 0.9, rounded down
    run_window(limiter, clock, 0.15)
    run_window(limiter, clock, 0.15)
    assert limiter.limit == 30  # additive from now on


def test_growing_latency_is_congestion_too() -> None:
    clock = ManualClock()
    limiter = AdaptiveConcurrency(ceiling=64, clock=clock)
    for _ in range(5):
        run_window(limiter, clock, 0.10)
    before = limiter.limit
    run_window(limiter, clock, 0.50)  # five times slower: the API is struggling
    assert limiter.limit < before


def test_an_idle_worker_does_not_raise_its_limit() -> None:
    clock = ManualClock()
    limiter = AdaptiveConcurrency(ceiling=64, clock=clock)
    run_window(limiter, clock, 0.1)
    run_window(limiter, clock, 0.1)
    assert limiter.limit == 4
    for _ in range(10):
        run_window(limiter, clock, 0.1, busy=False)  # one request at a time: the limit is not what holds it back
    assert limiter.limit == 4


def test_restart_goes_back_to_one_in_slow_start() -> None:
    clock = ManualClock()
    limiter = AdaptiveConcurrency(ceiling=64, clock=clock)
    for _ in range(5):
        run_window(limiter, clock, 0.1)
    run_window(limiter, clock, 0.1, congested=True)
    limiter.restart()
    assert limiter.limit == 1
    run_window(limiter, clock, 0.1)
    run_window(limiter, clock, 0.1)
    assert limiter.limit == 4
