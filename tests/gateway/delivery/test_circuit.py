"""The circuit breaker's state machine (``gateway.delivery.circuit``), pure: states, probe
delays, throttling and the gate a claim round reads, on a frozen clock."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from gateway.clock import ManualClock
from gateway.db.models import OAuthToken, TargetState
from gateway.delivery import circuit
from mappers.profiles.ehr import CircuitBreakerPolicy

POLICY = CircuitBreakerPolicy(failure_threshold=3, open_s=10, max_open_s=40)
START = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


def closed() -> TargetState:
    return TargetState(
        kind="ehr", target="t", circuit="closed", consecutive_failures=0, probe_failures=0
    )


def fail(state: TargetState, clock: ManualClock, **kw: object) -> circuit.FailureResult:
    return circuit.count_failure(
        state, now=clock.now(), policy=POLICY, error="ConnectError", rng=random.Random(1), **kw
    )


def test_threshold_failures_in_a_row_open_the_circuit_and_hold_deliveries() -> None:
    clock, state = ManualClock(START), closed()
    assert not fail(state, clock).holds_deliveries
    fail(state, clock)
    third = fail(state, clock)

    assert (third.before, third.circuit) == ("closed", "open")
    assert third.holds_deliveries  # the EHR is down: rows wait, not dead-lettered
    assert state.next_probe_at is not None
    assert START + timedelta(seconds=5) <= state.next_probe_at <= START + timedelta(seconds=10)
    gate = circuit.gate(state, None, now=clock.now(), max_concurrent=8, uses_token=False)
    assert (gate.claim, gate.probe) == (False, False)  # open, probe not due yet
    clock.advance(10)
    gate = circuit.gate(state, None, now=clock.now(), max_concurrent=8, uses_token=False)
    assert (gate.claim, gate.probe) == (False, True)


def test_an_answered_probe_half_opens_for_one_trial_and_a_failed_trial_opens_for_longer() -> None:
    clock, state = ManualClock(START), closed()
    for _ in range(3):
        fail(state, clock)
    clock.advance(10)
    assert circuit.count_probe(state, ok=True, now=clock.now(), policy=POLICY) == "half_open"
    gate = circuit.gate(state, None, now=clock.now(), max_concurrent=8, uses_token=False)
    assert (gate.claim, gate.max_in_flight) == (True, 1)

    trial = fail(state, clock)

    assert (trial.before, trial.circuit) == ("half_open", "open")
    assert not trial.holds_deliveries  # the trial's own attempt counts
    assert state.probe_failures == 1
    assert state.next_probe_at is not None
    assert state.next_probe_at - clock.now() >= timedelta(seconds=10)  # doubled: [10, 20]


def test_failed_probes_back_off_to_the_cap_and_keep_the_last_delivery_error() -> None:
    clock, state = ManualClock(START), closed()
    for _ in range(3):
        fail(state, clock)
    for _ in range(6):
        clock.advance(60)
        rng = random.Random(2)
        assert (
            circuit.count_probe(state, ok=False, now=clock.now(), policy=POLICY, rng=rng) == "open"
        )
    assert state.next_probe_at is not None
    assert timedelta(seconds=20) <= state.next_probe_at - clock.now() <= timedelta(seconds=40)
    assert state.last_error == "ConnectError"


def test_retry_after_throttles_the_target_until_it_passes() -> None:
    clock, state = ManualClock(START), closed()
    fail(state, clock, throttle_s=30)
    gate = circuit.gate(state, None, now=clock.now(), max_concurrent=8, uses_token=False)
    assert not gate.claim
    clock.advance(30.001)
    gate = circuit.gate(state, None, now=clock.now(), max_concurrent=8, uses_token=False)
    assert (gate.claim, gate.max_in_flight) == (True, 8)


def test_a_backing_off_token_endpoint_closes_the_gate_unless_a_token_is_still_valid() -> None:
    clock, state = ManualClock(START), closed()
    token = OAuthToken(target="t", failures=2, next_attempt_at=START + timedelta(seconds=30))
    gate = circuit.gate(state, token, now=clock.now(), max_concurrent=8, uses_token=True)
    assert not gate.claim
    token.access_token, token.expires_at = "still-valid", START + timedelta(minutes=5)
    gate = circuit.gate(state, token, now=clock.now(), max_concurrent=8, uses_token=True)
    assert gate.claim
    assert circuit.gate(None, None, now=clock.now(), max_concurrent=2, uses_token=True).claim
