"""Tests for mappers.workflow.decide over the bundled workflow profile."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from mappers.profiles import ProfileSet, WorkflowProfile
from mappers.workflow import Decision, decide, event_key

T0 = datetime(2026, 11, 24, 10, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def workflow(profile_set: ProfileSet) -> WorkflowProfile:
    return profile_set.workflow_or_raise


def run(
    workflow: WorkflowProfile,
    state: str | None,
    event_type: str,
    detail: str | None = None,
    *,
    source: str = "ehr",
    late: bool = False,
) -> Decision:
    return decide(
        workflow,
        state=state,
        event_type=event_type,
        detail=detail,
        source=source,
        occurred_at=T0 - timedelta(hours=1) if late else T0,
        last_occurred_at=T0 - timedelta(minutes=30),
    )


def test_event_key() -> None:
    assert event_key("decision", "approved") == "decision:approved"
    assert event_key("shipped", None) == "shipped"


# --------------------------------------------------------------------------- rejections


def test_unknown_event_type_is_rejected(workflow: WorkflowProfile) -> None:
    d = run(workflow, "awaiting_review", "teleported")
    assert (d.outcome, d.reason) == ("rejected", "unknown_event")


@pytest.mark.parametrize(
    ("event_type", "detail", "source"),
    [
        ("decision", "approved", "pharmacy"),
        ("shipped", None, "ehr"),
        ("payment_completed", None, "intake"),
        ("ehr_delivered", None, "ehr"),
    ],
)
def test_a_sender_that_does_not_own_the_event_is_rejected(
    workflow: WorkflowProfile, event_type: str, detail: str | None, source: str
) -> None:
    d = run(workflow, "in_review", event_type, detail, source=source)
    assert (d.outcome, d.reason) == ("rejected", "not_owner")
    assert d.to_state is None


@pytest.mark.parametrize(
    ("event_type", "detail"),
    [("decision", None), ("decision", "maybe"), ("provider_assigned", "dr-house")],
)
def test_a_missing_unknown_or_unexpected_detail_is_rejected(
    workflow: WorkflowProfile, event_type: str, detail: str | None
) -> None:
    d = run(workflow, "in_review", event_type, detail)
    assert (d.outcome, d.reason) == ("rejected", "invalid_detail")


def test_a_transition_the_table_does_not_allow_is_rejected(workflow: WorkflowProfile) -> None:
    d = run(workflow, "awaiting_review", "shipped", source="pharmacy")
    assert (d.outcome, d.reason) == ("rejected", "transition_not_allowed")
    assert d.message is not None and "awaiting_review" in d.message


def test_no_event_leaves_a_terminal_state_unless_the_table_says_so(
    workflow: WorkflowProfile,
) -> None:
    assert run(workflow, "denied", "decision", "approved").outcome == "rejected"
    assert run(workflow, "denied", "result_available").outcome == "recorded"


# --------------------------------------------------------------------------- opening a case


@pytest.mark.parametrize(
    ("event_type", "source", "state"),
    [("intake_submitted", "intake", "intake_received"), ("payment_completed", "checkout", "paid")],
)
def test_opening_events_open_a_case(
    workflow: WorkflowProfile, event_type: str, source: str, state: str
) -> None:
    assert run(workflow, None, event_type, source=source) == Decision("applied", to_state=state)


def test_other_events_do_not_open_a_case(workflow: WorkflowProfile) -> None:
    d = run(workflow, None, "decision", "approved")
    assert (d.outcome, d.reason) == ("rejected", "no_case")


def test_ownership_is_checked_before_opening(workflow: WorkflowProfile) -> None:
    d = run(workflow, None, "intake_submitted", source="ehr")
    assert (d.outcome, d.reason) == ("rejected", "not_owner")


# --------------------------------------------------------------------------- transitions


@pytest.mark.parametrize(
    ("state", "event_type", "detail", "source", "to_state"),
    [
        ("intake_received", "payment_completed", None, "checkout", "awaiting_review"),
        ("paid", "intake_submitted", None, "intake", "awaiting_review"),
        ("awaiting_review", "provider_assigned", None, "ehr", "in_review"),
        ("in_review", "decision", "approved", "provider_network", "approved"),
        ("in_review", "decision", "denied", "ehr", "denied"),
        ("in_review", "decision", "more_info_needed", "ehr", "more_info_needed"),
        ("approved", "prescription_sent", None, "ehr", "prescribed"),
        ("prescribed", "order_received", None, "pharmacy", "at_pharmacy"),
        ("at_pharmacy", "dispensed", None, "pharmacy", "dispensed"),
        ("dispensed", "shipped", None, "pharmacy", "shipped"),
        ("shipped", "refill_requested", None, "patient_portal", "refill_pending"),
        ("refill_pending", "prescription_sent", None, "ehr", "prescribed"),
    ],
)
def test_allowed_transitions_move_the_case(
    workflow: WorkflowProfile,
    state: str,
    event_type: str,
    detail: str | None,
    source: str,
    to_state: str,
) -> None:
    assert run(workflow, state, event_type, detail, source=source) == Decision(
        "applied", to_state=to_state
    )


@pytest.mark.parametrize(
    ("state", "event_type", "source"),
    [
        ("in_review", "provider_assigned", "ehr"),
        ("awaiting_review", "intake_submitted", "intake"),
        ("shipped", "delivered_to_patient", "pharmacy"),
        ("approved", "ehr_delivered", "gateway"),
    ],
)
def test_a_self_transition_is_recorded_without_moving(
    workflow: WorkflowProfile, state: str, event_type: str, source: str
) -> None:
    assert run(workflow, state, event_type, source=source) == Decision("recorded", to_state=state)


# --------------------------------------------------------------------------- late events


def test_a_late_event_without_a_transition_is_recorded_as_late(workflow: WorkflowProfile) -> None:
    # the provider asked for more information before approving, but it arrived after
    d = run(workflow, "approved", "decision", "more_info_needed", late=True)
    assert d.outcome == "late"
    assert d.to_state is None


def test_a_late_event_never_moves_the_case_backward(workflow: WorkflowProfile) -> None:
    on_time = run(workflow, "more_info_needed", "provider_assigned")
    late = run(workflow, "more_info_needed", "provider_assigned", late=True)
    assert on_time == Decision("applied", to_state="in_review")
    assert late.outcome == "late"


def test_a_late_event_moves_backward_when_the_table_allows_it(workflow: WorkflowProfile) -> None:
    d = run(workflow, "more_info_needed", "intake_submitted", source="intake", late=True)
    assert d == Decision("applied", to_state="awaiting_review")


def test_a_late_event_that_moves_forward_is_applied(workflow: WorkflowProfile) -> None:
    d = run(workflow, "awaiting_review", "provider_assigned", late=True)
    assert d == Decision("applied", to_state="in_review")


def test_a_late_event_from_the_wrong_sender_is_still_rejected(workflow: WorkflowProfile) -> None:
    d = run(workflow, "approved", "decision", "denied", source="pharmacy", late=True)
    assert (d.outcome, d.reason) == ("rejected", "not_owner")
