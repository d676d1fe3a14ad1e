"""The circuit breaker and the adaptive concurrency, on a ManualClock: no network, no sleeping."""

from __future__ import annotations

from typing import Any

import pytest

from worker.clock import ManualClock
from worker.upload.circuit import ASSET_FAILURES_TO_HOLD, FAILURES_TO_OPEN, Circuit, Permit, State
from worker.upload.concurrency import AdaptiveConcurrency

pytestmark = pytest.mark.timeout(30)


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def __getattr__(self, name: str) -> Any:
        return lambda **kwargs: self.calls.append((name, kwargs))

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


def circuit_with(clock: ManualClock | None = None) -> tuple[Circuit, ManualClock, Recorder]:
    clock = clock or ManualClock()
    recorder = Recorder()
    return Circuit(clock=clock, probe_base=1.0, probe_max=8.0, account="brand-a", listeners=[recorder]), clock, recorder


def fail(circuit: Circuit, asset_id: str, *, counted: bool = False) -> None:
    permit = circuit.permit(asset_id)
    assert permit is not None, f"{asset_id} was refused"
    circuit.failed(permit, error="the API answered 503", counted=counted)


def opened() -> tuple[Circuit, ManualClock, Recorder]:
    circuit, clock, recorder = circuit_with()
    for n in range(FAILURES_TO_OPEN):
        fail(circuit, f"asset-{n % 2}")
    return circuit, clock, recorder


def test_failures_across_asset_ids_open_the_circuit_once_naming_the_account() -> None:
    circuit, _, recorder = opened()
    assert circuit.state is State.OPEN
    assert circuit.permit("asset-0") is None and circuit.permit("another") is None
    assert recorder.names() == ["circuit_opened"]
    assert recorder.calls[0][1]["failures"] == FAILURES_TO_OPEN and recorder.calls[0][1]["account"] == "brand-a"


def test_a_success_in_between_keeps_it_closed() -> None:
    circuit, _, _ = circuit_with()
    for n in range(3 * FAILURES_TO_OPEN):
        if n % FAILURES_TO_OPEN == FAILURES_TO_OPEN - 1:
            circuit.succeeded(circuit.permit("ok") or pytest.fail("refused"))
        else:
            fail(circuit, f"asset-{n % 2}")
    assert circuit.state is State.CLOSED


def test_one_asset_id_alone_never_opens_it_and_counted_failures_never_hold_it() -> None:
    circuit, _, recorder = circuit_with()
    circuit.succeeded(Permit("ok"))  # the API works: this asset_id is the problem
    for _ in range(50):
        fail(circuit, "sick", counted=True)
    assert circuit.state is State.CLOSED and circuit.held_assets == 0
    assert circuit.permit("sick") is not None  # its retries follow the policy, and count
    assert "asset_held" not in recorder.names()


def test_an_asset_id_failing_alone_with_no_sign_of_life_is_held_and_probed_at_doubling_intervals() -> None:
    circuit, clock, recorder = circuit_with()
    for _ in range(ASSET_FAILURES_TO_HOLD):
        fail(circuit, "sick")
    assert circuit.held_assets == 1 and circuit.state is State.CLOSED
    assert [kwargs["asset_id"] for name, kwargs in recorder.calls if name == "asset_held"] == ["sick"]
    assert circuit.permit("sick") is None  # held: no request
    assert circuit.permit("healthy") is not None  # the others go on
    waits = []
    for _ in range(5):
        waits.append(circuit.wait_left("sick"))
        clock.advance(circuit.wait_left("sick"))
        probe = circuit.permit("sick")
        assert probe is not None and probe.probe == "asset"
        assert circuit.permit("sick") is None  # one probe at a time
        circuit.failed(probe, error="503", counted=False)
    assert waits == [1.0, 2.0, 4.0, 8.0, 8.0]


def test_any_success_in_the_account_releases_every_held_asset_id() -> None:
    circuit, _, _ = circuit_with()
    for asset_id in ("a", "b"):
        circuit.succeeded(Permit("warm-up"))  # separate streaks: a success between them
        for _ in range(ASSET_FAILURES_TO_HOLD):
            circuit.failed(circuit.permit(asset_id) or pytest.fail("refused"), error="503", counted=False)
    assert circuit.held_assets >= 1
    circuit.succeeded(Permit("healthy"))
    assert circuit.held_assets == 0 and circuit.permit("a") is not None


def test_probes_come_one_at_a_time_at_doubling_intervals_up_to_the_cap() -> None:
    circuit, clock, recorder = opened()
    waits = []
    for _ in range(6):
        waits.append(circuit.wait_left())
        clock.advance(circuit.wait_left() - 0.001)
        assert circuit.poll() is State.OPEN  # not a moment early
        clock.advance(0.001)
        assert circuit.poll() is State.HALF_OPEN
        probe = circuit.permit("any")
        assert probe is not None and probe.probe == "account"
        assert circuit.permit("other") is None  # exactly one probe in flight
        assert not circuit.counts(probe, rate_limited=False, since=None)  # a failed probe spends no attempt
        circuit.failed(probe, error="503", counted=False)
    assert waits == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert sum(1 for name in recorder.names() if name == "probe_done") == 6


def test_a_good_probe_closes_it_and_the_next_outage_starts_from_the_base_interval() -> None:
    circuit, clock, recorder = opened()
    clock.advance(1.0)
    circuit.poll()
    probe = circuit.permit("any")
    assert probe is not None
    circuit.succeeded(probe)
    assert circuit.state is State.CLOSED
    assert ("circuit_closed", {"account": "brand-a", "open_for": 1.0, "probes": 1}) in recorder.calls
    for n in range(FAILURES_TO_OPEN):
        fail(circuit, f"asset-{n % 2}")
    assert circuit.wait_left() == 1.0


def test_a_probe_that_never_reported_frees_the_way_for_another() -> None:
    circuit, clock, _ = opened()
    clock.advance(1.0)
    circuit.poll()
    with pytest.raises(RuntimeError):
        with circuit.request("x") as permit:
            assert permit is not None and permit.probe
            raise RuntimeError("a bug between the permit and the answer")
    again = circuit.permit("x")
    assert again is not None and again.probe


def test_retry_after_pauses_everything_until_then_capped() -> None:
    circuit, clock, _ = circuit_with()
    permit = circuit.permit("a")
    assert permit is not None
    circuit.failed(permit, error="429", counted=False, rate_limited=True, retry_after=30.0)
    assert circuit.state is State.PAUSED and circuit.permit("b") is None
    assert circuit.wait_left() == 8.0  # capped at the longest probe interval
    assert not circuit.counts(permit, rate_limited=True, since=None)
    circuit.succeeded(Permit("c"))  # an upload that was already in flight went through: the wait holds
    assert circuit.state is State.PAUSED
    clock.advance(8.0)
    assert circuit.poll() is State.HALF_OPEN


def test_429s_without_retry_after_pause_twice_as_long_each_time_in_a_row() -> None:
    circuit, clock, _ = circuit_with()
    pauses = []
    for _ in range(5):
        clock.advance(circuit.wait_left())
        circuit.poll()
        permit = circuit.permit("a")
        assert permit is not None
        circuit.failed(permit, error="429", counted=False, rate_limited=True)
        pauses.append(circuit.wait_left())
    assert pauses == [1.0, 2.0, 4.0, 8.0, 8.0]
    clock.advance(8.0)
    circuit.poll()
    circuit.succeeded(circuit.permit("a") or pytest.fail("refused"))
    permit = circuit.permit("a")
    assert permit is not None
    circuit.failed(permit, error="429", counted=False, rate_limited=True)
    assert circuit.wait_left() == 1.0  # a success in between starts the doubling again


def test_a_failure_counts_only_when_the_api_worked_since_the_batch_first_failed() -> None:
    circuit, clock, _ = circuit_with()
    permit = Permit("sick")
    assert not circuit.counts(permit, rate_limited=False, since=None)  # no success ever: maybe an outage
    circuit.succeeded(Permit("healthy"))
    assert circuit.counts(permit, rate_limited=False, since=None)  # a first failure, the API works
    since = clock.now().timestamp()
    clock.advance(5)
    assert not circuit.counts(permit, rate_limited=False, since=since)  # nothing went through since it first failed
    circuit.succeeded(Permit("healthy"))
    clock.advance(3600)
    assert circuit.counts(permit, rate_limited=False, since=since)  # the evidence stands
    assert not circuit.counts(permit, rate_limited=False, since=None)  # a first failure long after the last success


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
