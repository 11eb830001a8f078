"""Queued INSERTs sent straight to the driver (:mod:`gateway.db.bulk`), on SQLite and
PostgreSQL: the values a Core INSERT would write (defaults, JSON, times), the session's
transaction, and the database's refusals as SQLAlchemy raises them."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import event, select
from sqlalchemy.exc import IntegrityError

from gateway.db.bulk import BulkInserts, row_values
from gateway.db.models import Case, PatientKey, ProfileMapping
from gateway.runtime import Runtime


async def test_rows_of_several_tables_are_written_with_their_defaults(runtime: Runtime) -> None:
    bulk = BulkInserts()
    bulk.add(PatientKey, key_type="email", key_value="bulk@example.com", patient_id="p-bulk")
    bulk.add(
        ProfileMapping,
        inbound_message_id="m-bulk",
        action="ingest",
        profile_kind="intake",
        profile_id="glp1",
        profile_version="2",
        profile_hash="abc",
        resource_versions=["Patient/p-bulk/_history/1"],
        attribution={"utm_source": "news", "n": [1, 2]},
        actor="test",
        created_at=datetime(2026, 12, 7, 12, 0, tzinfo=UTC),
    )
    seen: list[str] = []
    listener = lambda *args: seen.append(str(args[2]))  # noqa: E731
    event.listen(runtime.engine.sync_engine, "before_cursor_execute", listener)
    try:
        async with runtime.sessionmaker() as session:
            await bulk.flush(session)
            await session.commit()
    finally:
        event.remove(runtime.engine.sync_engine, "before_cursor_execute", listener)
    assert [s.split()[2] for s in seen] == ["patient_keys", "profile_mappings"]  # hooks told
    assert len(bulk) == 0
    async with runtime.sessionmaker() as session:
        key = await session.scalar(select(PatientKey).where(PatientKey.patient_id == "p-bulk"))
        mapping = await session.scalar(
            select(ProfileMapping).where(ProfileMapping.inbound_message_id == "m-bulk")
        )
    assert key is not None and key.created_at is not None  # the Python-side default
    assert mapping is not None and mapping.id is not None  # the database's identity
    assert mapping.attribution == {"utm_source": "news", "n": [1, 2]}  # JSON round trip
    assert mapping.resource_versions == ["Patient/p-bulk/_history/1"]
    assert mapping.created_at.replace(tzinfo=UTC) == datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


async def test_rows_join_the_session_transaction(runtime: Runtime) -> None:
    bulk = BulkInserts()
    bulk.add(PatientKey, key_type="email", key_value="rolled@example.com", patient_id="p-r")
    async with runtime.sessionmaker() as session:
        await bulk.flush(session)
        await session.rollback()
    async with runtime.sessionmaker() as session:
        assert (
            await session.scalar(select(PatientKey).where(PatientKey.patient_id == "p-r")) is None
        )


async def test_a_refused_row_raises_integrity_error(runtime: Runtime) -> None:
    async with runtime.sessionmaker() as session:
        bulk = BulkInserts()
        for _ in range(2):  # the same primary key twice
            bulk.add(PatientKey, key_type="email", key_value="twice@example.com", patient_id="p")
        with pytest.raises(IntegrityError):
            await bulk.flush(session)
        await session.rollback()


def test_row_values_keeps_none_only_where_no_default_applies() -> None:
    case = Case(id="c-1", patient_id="p-1", program="glp1", state="intake_received", version=1)
    values = row_values(case)
    assert values["id"] == "c-1" and values["version"] == 1
    assert "opened_at" not in values  # None, and the column has a default: it applies
    assert values["sla_due_at"] is None  # None, no default: written as NULL


async def test_queued_updates_run_after_the_inserts(runtime: Runtime) -> None:
    """``add_statement``: an ``UPDATE ... WHERE id = :_id`` (the outbox rows' outcomes,
    :func:`gateway.queue.repository.write_rows`) runs with each row's values after the
    queued INSERTs: JSON and times processed as SQLAlchemy would."""
    from gateway.db.models import Delivery
    from gateway.delivery import repository as repo
    from gateway.queue import repository as queue

    async with runtime.sessionmaker() as session:
        delivery = Delivery(kind="ehr", target="t", ordering_key="p", resource_refs=[])
        session.add(delivery)
        await session.commit()
        delivered_at = datetime(2026, 12, 7, 21, 0, tzinfo=UTC)
        bulk = BulkInserts()
        bulk.add(PatientKey, key_type="email", key_value="upd@example.com", patient_id="p-u")
        await queue.write_rows(
            session,
            repo.OUTBOX,
            [
                {
                    "id": delivery.id,
                    "status": "delivered",
                    "delivered_at": delivered_at,
                    "operation_outcome": {"resourceType": "OperationOutcome", "issue": []},
                }
            ],
            bulk=bulk,
        )
        assert len(bulk) == 2
        await bulk.flush(session)
        await session.commit()
    async with runtime.sessionmaker() as session:
        stored = await session.get(Delivery, delivery.id)
        assert stored is not None and stored.status == "delivered"
        assert stored.delivered_at.replace(tzinfo=UTC) == delivered_at
        assert stored.operation_outcome == {"resourceType": "OperationOutcome", "issue": []}
        assert await session.scalar(select(PatientKey).where(PatientKey.patient_id == "p-u"))


async def test_many_rows_of_one_table_keep_their_values_and_order(runtime: Runtime) -> None:
    """Several rows of one table in one executemany: identities in the order the rows
    were queued, JSON (objects, lists, a string, null) and times as given."""
    bulk = BulkInserts()
    attributions = [{"utm_source": "a", "n": [1, 2]}, None, {"nested": {"x": "é"}}, "plain", {}]
    when = datetime(2026, 12, 7, 23, 0, tzinfo=UTC)
    for i, attribution in enumerate(attributions):
        bulk.add(
            ProfileMapping,
            inbound_message_id=f"m-many-{i}",
            action="ingest",
            profile_kind="intake",
            profile_id="glp1",
            profile_version=str(i),
            profile_hash="abc",
            resource_versions=[f"Patient/p-{i}/_history/1"],
            attribution=attribution,
            actor="test",
            created_at=when,
        )
    async with runtime.sessionmaker() as session:
        await bulk.flush(session)
        await session.commit()
        rows = (
            await session.scalars(
                select(ProfileMapping)
                .where(ProfileMapping.inbound_message_id.like("m-many-%"))
                .order_by(ProfileMapping.id)
            )
        ).all()
    assert [r.inbound_message_id for r in rows] == [f"m-many-{i}" for i in range(5)]
    assert [r.attribution for r in rows] == attributions
    assert [r.profile_version for r in rows] == ["0", "1", "2", "3", "4"]
    assert all(r.created_at.replace(tzinfo=UTC) == when for r in rows)
