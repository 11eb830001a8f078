"""Two messages for one patient at once, on PostgreSQL (real concurrent transactions):
the database settles them, no retry."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError

from gateway.db.models import FhirResource, PatientKey
from gateway.db.types import utcnow
from gateway.patients.matching import match_or_register
from gateway.runtime import Runtime
from mappers.events import PatientRef

pytestmark = pytest.mark.postgres

EMAIL = PatientRef("email", "pat@example.com")
EXTERNAL = PatientRef("identifier", "pt-1", system="urn:example:app")


@pytest.fixture
def database_url(postgres_url: str) -> str:
    """PostgreSQL only."""
    return postgres_url


async def test_a_new_patient_registered_meanwhile_is_joined(runtime: Runtime) -> None:
    """A registers a new patient and has not committed; B, for the same person, waits at
    its key insert, then joins A's patient (B's own keys move to it)."""
    first = runtime.sessionmaker()
    second = runtime.sessionmaker()
    try:
        a = await match_or_register(first, [EMAIL], id_system="urn:pid", new_id="p-a")
        assert a.new
        first.add(_patient_row("p-a"))
        await first.flush()
        joining = asyncio.create_task(
            match_or_register(second, [EXTERNAL, EMAIL], id_system="urn:pid", new_id="p-b")
        )
        await _wait_for_lock_wait(runtime)
        assert not joining.done()
        await first.commit()
        b = await joining
        await second.commit()
    finally:
        await first.close()
        await second.close()
    assert (b.patient_id, b.new, b.matched_on) == ("p-a", False, EMAIL)
    assert b.row is not None and b.row.id == "p-a"
    async with runtime.sessionmaker() as session:
        keys = {
            (r.key_type, r.key_value): r.patient_id
            for r in await session.scalars(select(PatientKey))
        }
    assert keys == {
        EMAIL.key: "p-a",
        EXTERNAL.key: "p-a",  # B's key joined A's patient
        ("identifier", "urn:pid|p-a"): "p-a",  # B's tentative id is gone
    }


async def test_a_matched_patient_is_locked_until_the_message_is_stored(runtime: Runtime) -> None:
    async with runtime.write_session() as session:
        await match_or_register(session, [EMAIL], id_system="urn:pid", new_id="p-a")
        session.add(_patient_row("p-a"))
        await session.commit()
    async with runtime.sessionmaker() as holder, runtime.sessionmaker() as other:
        match = await match_or_register(holder, [EMAIL], id_system="urn:pid", new_id="unused")
        assert match.patient_id == "p-a" and match.row is not None
        with pytest.raises(DBAPIError, match="could not obtain lock"):
            await other.execute(
                text("SELECT id FROM fhir_resources WHERE id = 'p-a' FOR UPDATE NOWAIT")
            )


def _patient_row(patient_id: str) -> FhirResource:
    return FhirResource(
        resource_type="Patient",
        id=patient_id,
        version_id=1,
        resource={"resourceType": "Patient", "id": patient_id},
        patient_id=patient_id,
        created_at=utcnow(),
        updated_at=utcnow(),
    )


async def _wait_for_lock_wait(runtime: Runtime) -> None:
    """Until a session of this database waits for a lock (pg_stat_activity).

    PostgreSQL reads pg_stat_activity once per transaction, so each look is its own
    transaction: a loop inside one would keep seeing the first snapshot."""
    async with runtime.engine.connect() as conn:
        for _ in range(500):
            waiting = await conn.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock'"
                )
            )
            await conn.rollback()
            if waiting:
                return
            await asyncio.sleep(0.01)
    raise AssertionError("the second transaction never waited for the first")
