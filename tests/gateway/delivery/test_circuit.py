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


def test_an_answered_probe_half_opens_for_a_few_trials_and_failed_trials_open_for_longer() -> None:
    clock, state = ManualClock(START), closed()
    for _ in range(3):
        fail(state, clock)
    clock.advance(10)
    assert circuit.count_probe(state, ok=True, now=clock.now(), policy=POLICY) == "half_open"
    gate = circuit.gate(state, None, now=clock.now(), max_concurrent=8, uses_token=False, trials=3)
    assert (gate.claim, gate.max_in_flight) == (True, 3)

    first = fail(state, clock)
    assert (first.before, first.circuit) == ("half_open", "half_open")  # 1 of 3: not yet
    trial = fail(state, clock)

    assert (trial.before, trial.circuit) == ("half_open", "open")  # 2 of 3 failed
    assert not trial.holds_deliveries  # the trial's own attempt counts
    assert state.probe_failures == 1
    assert state.open_reason == "2 of 3 half-open trials failed"
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


def answer(state: TargetState, clock: ManualClock, n: int = 1) -> str:
    return circuit.count_answers(state, now=clock.now(), policy=POLICY, answered=n, delivered=True)


def test_the_failure_rate_over_the_window_opens_the_circuit_not_failures_in_a_row() -> None:
    policy = CircuitBreakerPolicy(
        failure_threshold=50, failure_rate=0.5, minimum_calls=10, window_s=30
    )
    clock, state = ManualClock(START), closed()
    for _ in range(4):  # every other call fails: 50 %, but fewer than 10 calls yet
        circuit.count_answers(state, now=clock.now(), policy=policy, answered=1, delivered=True)
        result = circuit.count_failure(state, now=clock.now(), policy=policy, error="503")
        clock.advance(1)
    assert result.circuit == "closed"
    circuit.count_answers(state, now=clock.now(), policy=policy, answered=1, delivered=True)
    result = circuit.count_failure(state, now=clock.now(), policy=policy, error="503")

    assert (result.before, result.circuit) == ("closed", "open")  # 5 of 10
    assert state.open_reason == "failure rate 50% over 10 calls in the last 30 s"
    assert state.consecutive_failures == 1  # not in a row


def test_a_low_failure_rate_never_opens_the_circuit() -> None:
    policy = CircuitBreakerPolicy(failure_threshold=5, minimum_calls=10, window_s=30)
    clock, state = ManualClock(START), closed()
    for i in range(300):  # 20 % of calls fail, one call every 0.4 s for two minutes
        if i % 5 == 0:
            result = circuit.count_failure(state, now=clock.now(), policy=policy, error="503")
            assert result.circuit == "closed"
        else:
            circuit.count_answers(state, now=clock.now(), policy=policy, answered=1, delivered=True)
        clock.advance(0.4)
    rate, calls = circuit.failure_rate(state, now=clock.now(), policy=policy)
    assert 0.15 <= rate <= 0.25
    assert 60 <= calls <= 80  # about 30 s of calls


def test_the_window_slides_old_failures_out() -> None:
    policy = CircuitBreakerPolicy(window_s=30)
    clock, state = ManualClock(START), closed()
    for _ in range(4):
        circuit.count_failure(state, now=clock.now(), policy=policy, error="503")
    assert circuit.failure_rate(state, now=clock.now(), policy=policy) == (1.0, 4.0)
    clock.advance(45)  # the failures' window is half out of the last 30 s
    assert circuit.failure_rate(state, now=clock.now(), policy=policy) == (1.0, 2.0)
    clock.advance(15)
    assert circuit.failure_rate(state, now=clock.now(), policy=policy) == (0.0, 0.0)


def test_successful_trials_close_the_circuit_and_reset_the_doubling() -> None:
    clock, state = ManualClock(START), closed()
    for _ in range(3):
        fail(state, clock)
    for _ in range(3):  # three failed probes: the wait has doubled up to the cap
        clock.advance(60)
        circuit.count_probe(state, ok=False, now=clock.now(), policy=POLICY)
    assert state.probe_failures == 3
    clock.advance(60)
    circuit.count_probe(state, ok=True, now=clock.now(), policy=POLICY)
    assert answer(state, clock) == "half_open"  # 1 of 3
    assert answer(state, clock) == "closed"  # 2 of 3 succeeded: the third cannot change it

    assert (state.probe_failures, state.consecutive_failures) == (0, 0)
    assert state.next_probe_at is None and state.open_reason is None
    for _ in range(3):  # the next outage starts from open_s again
        fail(state, clock)
    assert state.next_probe_at is not None
    assert state.next_probe_at - clock.now() <= timedelta(seconds=10)


def test_a_trial_round_with_one_success_reopens_without_doubling() -> None:
    clock, state = ManualClock(START), closed()
    for _ in range(3):
        fail(state, clock)
    clock.advance(60)
    circuit.count_probe(state, ok=False, now=clock.now(), policy=POLICY)
    clock.advance(60)
    circuit.count_probe(state, ok=True, now=clock.now(), policy=POLICY)
    answer(state, clock)
    fail(state, clock)
    assert fail(state, clock).circuit == "open"
    assert state.probe_failures == 0  # one trial succeeded: the EHR is partly back
    assert state.next_probe_at is not None
    assert state.next_probe_at - clock.now() <= timedelta(seconds=10)


def test_retry_after_is_the_pause_of_an_open_circuit_within_the_cap() -> None:
    policy = CircuitBreakerPolicy(failure_threshold=2, open_s=10, max_retry_after_s=60)
    clock, state = ManualClock(START), closed()
    circuit.count_failure(state, now=clock.now(), policy=policy, error="503", retry_after_s=1)
    opened = circuit.count_failure(
        state, now=clock.now(), policy=policy, error="503", retry_after_s=2
    )
    assert opened.circuit == "open"
    assert state.next_probe_at == clock.now() + timedelta(seconds=2)  # not [5, 10] s
    assert state.open_reason is not None and "Retry-After (2 s)" in state.open_reason

    clock.advance(2)
    circuit.count_probe(state, ok=True, now=clock.now(), policy=policy)
    for _ in range(2):  # the trials fail with an hour's Retry-After: capped at 60 s
        circuit.count_failure(
            state, now=clock.now(), policy=policy, error="503", retry_after_s=3600
        )
    assert state.circuit == "open"
    assert state.next_probe_at == clock.now() + timedelta(seconds=60)


def test_a_late_answer_on_an_open_circuit_counts_as_a_trial() -> None:
    clock, state = ManualClock(START), closed()
    for _ in range(3):
        fail(state, clock)
    assert answer(state, clock) == "half_open"
    assert answer(state, clock) == "closed"


def test_worst_wait_for_a_trial_with_the_defaults_is_max_open_s() -> None:
    policy = CircuitBreakerPolicy()
    clock, state = ManualClock(START), closed()
    for _ in range(policy.failure_threshold):
        circuit.count_failure(state, now=clock.now(), policy=policy, error="ConnectError")
    waits = []
    for _ in range(20):  # a long outage: every probe fails
        assert state.next_probe_at is not None
        clock.advance(state.next_probe_at - clock.now())
        circuit.count_probe(state, ok=False, now=clock.now(), policy=policy)
        assert state.next_probe_at is not None
        waits.append((state.next_probe_at - clock.now()).total_seconds())
    assert max(waits) <= policy.max_open_s == 30
    assert min(waits[5:]) >= policy.max_open_s / 2
