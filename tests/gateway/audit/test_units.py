"""Unit tests of the audit package's pure parts: the entry hash, the search parameters."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from gateway.audit.chain import GENESIS, entry_hash
from gateway.audit.fhir import AuditSearchError, parse_query
from gateway.audit.service import ACTION_CODES, entry_values
from gateway.clients.actor import Actor, acting_as, current_actor
from gateway.db.models import AuditEntry


def entry(**changes: object) -> AuditEntry:
    fields: dict[str, object] = {
        "id": 1,
        "at": datetime(2026, 1, 1, tzinfo=UTC),
        "actor": "a",
        "agent_kind": "client",
        "action": "read",
        "code": "R",
        "outcome": "0",
        "entity_type": "Patient",
        "entity_id": "p1",
    }
    return AuditEntry(**{**fields, **changes})


def test_the_hash_covers_every_field_and_the_previous_hash() -> None:
    base = entry_hash(entry(), seq=1, prev_hash=GENESIS)
    assert base[:16] == "1959b3ae9ffc9aac"  # the worked example of the docstring
    assert entry_hash(entry(), seq=2, prev_hash=GENESIS) != base
    assert entry_hash(entry(), seq=1, prev_hash="1" * 64) != base
    for change in ({"actor": "b"}, {"patient_id": "p2"}, {"outcome": "4"}, {"detail": {"x": 1}}):
        assert entry_hash(entry(**change), seq=1, prev_hash=GENESIS) != base, change
    # The same instant in another offset is the same entry.
    moved = datetime(2025, 12, 31, 19, tzinfo=timezone(timedelta(hours=-5)))
    assert entry_hash(entry(at=moved), seq=1, prev_hash=GENESIS) == base


def test_entries_take_the_current_actor_and_a_known_action() -> None:
    assert current_actor().name == "worker"
    with acting_as(Actor("client", "crm", 7, "10.0.0.1")):
        values = entry_values(action="search", entity_type="Case", entity_id="*")
    assert (values["actor"], values["client_id"], values["source_address"], values["code"]) == (
        "crm",
        7,
        "10.0.0.1",
        "E",
    )
    assert set(ACTION_CODES.values()) <= {"C", "R", "U", "D", "E"}
    with pytest.raises(KeyError):
        entry_values(action="peek", entity_type="Case", entity_id="x")


def test_search_parameters_are_parsed_or_every_problem_named() -> None:
    query = parse_query(
        patient="Patient/p1",
        agent="crm",
        dates=["ge2026-12", "lt2026-12-07T10:00:00+01:00"],
        action="R,E",
        count=10,
        offset=20,
    )
    assert query.patient == "p1" and query.actions == ("R", "E")
    (prefix, start, end), (prefix2, start2, _) = query.dates
    assert (prefix, start, end) == (
        "ge",
        datetime(2026, 12, 1, tzinfo=UTC),
        datetime(2027, 1, 1, tzinfo=UTC),
    )
    assert (prefix2, start2) == ("lt", datetime(2026, 12, 7, 9, tzinfo=UTC))
    with pytest.raises(AuditSearchError) as caught:
        parse_query(
            patient="Patient/a/b",
            agent=None,
            dates=["2026-13-45", "2026-12-07T10:00"],
            action="Z",
            count=501,
            offset=None,
        )
    assert [p for p, _ in caught.value.problems] == ["patient", "date", "date", "action", "_count"]
