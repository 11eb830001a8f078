"""The cost of an intake acknowledgement in SQL statements, and the lookups' query plans
(SQLite and PostgreSQL, real databases)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
from sqlalchemy import event, text

from gateway.db.models import Case, InboundMessage, MessageStatus, PatientKey
from gateway.db.types import utcnow
from gateway.patients import repository as patients_repo
from gateway.runtime import Runtime
from tests import samples
from tests.conftest import ApiKeyFactory
from tests.support.api import signed_stripe

#: A new submission (new patient, no EHR target): the inbox row claimed (an INSERT ...
#: ON CONFLICT DO NOTHING: the database settles a copy sent at the same time), 1 patient-key
#: lookup, the new patient's keys claimed, 1 subscribers read, 6 INSERTs (resources,
#: audit, element sources, case, case event, profile mapping) and the inbox row's outcome
#: (UPDATE). Was 16 before the ingest work; 11 with a look-up of the inbox key first and
#: the inbox row inserted last (twins then raced to the end and were retried). 12 since
#: the audit trail (issue 11): the case event's AuditEvent row is written with the case,
#: after the resources' audit rows went in one statement with the resources. 14 since the
#: FHIR face (issue 13): a new patient is scored against the stored Patients (1 SELECT;
#: a probable duplicate would add its review row). 12 since the rows of the resources,
#: their audit entries, the element sources, the profile mapping, the new case and its
#: history row are queued and sent together (one PostgreSQL pipeline: one round trip for
#: the six INSERTs), the case event's audit row in the same INSERT as the resources'.
#: 13 since the new Patient's duplicate-review features (migration 0021) are inserted
#: with it: a seventh INSERT in the same pipeline (no round trip more on PostgreSQL).
NEW_SUBMISSION_STATEMENTS = 13
#: A new paid Stripe checkout event (new patient): as an intake, plus the
#: MedicationRequest look-up, the Stripe customer id's key, and the savepoint around the
#: mapping (a checkout that does not map leaves nothing of it behind); and, since the audit
#: trail, the case event's audit row (15 since that row goes in the resources' INSERT).
#: A checkout's Patient has no birth date: no duplicate-review features row.
STRIPE_EVENT_STATEMENTS = 15


@contextmanager
def statements(runtime: Runtime) -> Iterator[list[str]]:
    """The SQL statements the runtime's engine sends while the block runs."""
    seen: list[str] = []

    def record(*args: Any) -> None:
        seen.append(str(args[2]))

    event.listen(runtime.engine.sync_engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(runtime.engine.sync_engine, "before_cursor_execute", record)


async def test_new_submission_statements_and_a_replay_two(
    client: httpx.AsyncClient, runtime: Runtime, make_api_key: ApiKeyFactory
) -> None:
    headers = {"Authorization": f"Bearer {await make_api_key('intake:write')}"}
    await client.post("/v1/intake-submissions", json=samples.intake(), headers=headers)  # warm
    body = samples.intake()
    body["submission_id"] = "sub-statements-1"
    body["patient"]["external_id"] = "pt-statements-1"
    body["patient"]["email"] = "statements-1@example.com"
    # not a probable duplicate of the warm-up's patient (that would add a review row)
    body["patient"].update(last_name="Okafor", birth_date="07/30/1961", phone="(617) 555-0188")
    raw = json.dumps(body)
    with statements(runtime) as seen:
        first = await client.post("/v1/intake-submissions", content=raw, headers=headers)
    assert first.status_code == 202, first.text
    writes = [s.split()[0] for s in seen if not s.startswith(("SELECT", "PRAGMA"))]
    assert len(seen) == NEW_SUBMISSION_STATEMENTS, "\n".join(s[:90] for s in seen)
    assert writes == ["INSERT"] * 9 + ["UPDATE"], seen  # the claim first, its outcome last
    queued = [s.split()[2] for s in seen if s.startswith("INSERT")][2:]
    # one INSERT per table, the case before its history (foreign key)
    assert queued == [
        "fhir_resources",
        "patient_review_features",
        "audit_log",
        "profile_mappings",
        "patient_element_sources",
        "cases",
        "case_events",
    ], queued
    with statements(runtime) as seen:
        again = await client.post("/v1/intake-submissions", content=raw, headers=headers)
    assert again.json() == {**first.json(), "replayed": True}
    assert [s.split()[0] for s in seen] == ["INSERT", "SELECT"], seen  # claim, stored answer


async def test_inbox_row_is_stored_whole_with_its_answer(
    client: httpx.AsyncClient, runtime: Runtime, make_api_key: ApiKeyFactory
) -> None:
    headers = {"Authorization": f"Bearer {await make_api_key('intake:write')}"}
    r = await client.post("/v1/intake-submissions", json=samples.intake(), headers=headers)
    assert r.status_code == 202, r.text
    async with runtime.sessionmaker() as session:
        message = await session.get(InboundMessage, r.json()["message_id"])
    assert message is not None
    assert message.status == MessageStatus.PROCESSED
    assert message.processed_at is not None
    assert message.response == r.json()


async def test_new_case_sla_deadline_matches_a_recomputation(
    client: httpx.AsyncClient, runtime: Runtime, make_api_key: ApiKeyFactory
) -> None:
    """The deadline written with a new case's INSERT (from its own history) is the one a
    recomputation from the stored history gives."""
    from gateway.workflow.sla import refresh_sla

    headers = {"Authorization": f"Bearer {await make_api_key('intake:write')}"}
    r = await client.post("/v1/intake-submissions", json=samples.intake(), headers=headers)
    case_id = r.json()["case"]["id"]
    workflow = runtime.profiles.current.workflow_or_raise
    async with runtime.sessionmaker() as session:
        case = await session.get(Case, case_id)
        assert case is not None
        stored = (case.sla_due_at, case.sla_timer)
        await refresh_sla(session, workflow, case, case.updated_at)
        assert (case.sla_due_at, case.sla_timer) == stored
        await session.rollback()


async def test_patient_key_lookup_finds_many_keys_by_index(runtime: Runtime) -> None:
    keys = [("email", f"p{i}@example.com") for i in range(3)] + [("submission", "s-1")]
    async with runtime.sessionmaker() as session:
        for i, (kind, value) in enumerate(keys[:2]):
            session.add(
                PatientKey(
                    key_type=kind, key_value=value, patient_id=f"pat-{i}", created_at=utcnow()
                )
            )
        await session.commit()
        found = await patients_repo.patients_for_keys(session, keys)
        assert found == {keys[0]: "pat-0", keys[1]: "pat-1"}
        if runtime.engine.dialect.name == "sqlite":
            # A row-value IN scans the table on SQLite; the OR of key lookups must not.
            compiled = patients_repo.patient_key_lookup(keys).compile(
                runtime.engine.sync_engine, compile_kwargs={"literal_binds": True}
            )
            plan = (await session.execute(text(f"EXPLAIN QUERY PLAN {compiled}"))).all()
            details = " ".join(str(row[-1]) for row in plan)
            assert "SCAN patient_keys" not in details, details
            assert "USING INDEX" in details, details


async def test_stripe_checkout_event_statements(
    client: httpx.AsyncClient, runtime: Runtime
) -> None:
    """A new paid checkout event (new patient): 3 reads (patient keys, the
    MedicationRequest by checkout id, subscribers), 8 INSERTs, a savepoint, and one
    UPDATE (the inbox row's outcome); its retry: 2 statements (the claim, the answer)."""
    event = samples.stripe_event()
    payload, headers = signed_stripe(event)
    with statements(runtime) as seen:
        first = await client.post("/v1/webhooks/stripe", content=payload, headers=headers)
    assert first.status_code == 200, first.text
    assert first.json()["status"] == "accepted"
    assert [s for s in seen if s.startswith("UPDATE")] == [seen[-1]], seen
    assert len(seen) == STRIPE_EVENT_STATEMENTS, seen
    with statements(runtime) as seen:
        again = await client.post("/v1/webhooks/stripe", content=payload, headers=headers)
    assert again.json() == {**first.json(), "replayed": True}
    assert [s.split()[0] for s in seen] == ["INSERT", "SELECT"], seen
