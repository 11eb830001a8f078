"""The one patient match (``gateway.patients``): refs in priority order, conflicts named
without values, keys learned and registered first come, first served."""

from __future__ import annotations

from sqlalchemy import select

from gateway.db.models import ExceptionRecord, PatientKey, RemoteId
from gateway.patients import repository as repo
from gateway.patients.matching import (
    find_patient,
    match_or_register,
    record_conflicts,
)
from gateway.runtime import Runtime
from mappers.events import PatientRef

MRN = PatientRef("identifier", "mrn-1", system="urn:example:mrn")
OTHER_MRN = PatientRef("identifier", "mrn-9", system="urn:example:other")
EMAIL = PatientRef("email", "pat@example.com")
REMOTE = PatientRef("remote_id", "ehr-pat-7", target="acme")


async def _keys(runtime: Runtime) -> dict[tuple[str, str], str]:
    async with runtime.sessionmaker() as session:
        rows = await session.scalars(select(PatientKey))
        return {(r.key_type, r.key_value): r.patient_id for r in rows}


async def test_a_new_patient_is_registered_with_every_key(runtime: Runtime) -> None:
    async with runtime.write_session() as session:
        match = await match_or_register(session, [MRN, EMAIL], id_system="urn:pid", new_id="p-new")
        await session.commit()
    assert (match.patient_id, match.new, match.row) == ("p-new", True, None)
    assert await _keys(runtime) == {
        MRN.key: "p-new",
        EMAIL.key: "p-new",
        ("identifier", "urn:pid|p-new"): "p-new",
    }


async def test_the_first_ref_that_matches_wins_and_the_others_are_conflicts(
    runtime: Runtime,
) -> None:
    async with runtime.write_session() as session:
        await repo.claim_keys(session, "p-1", [EMAIL.key])
        await repo.claim_keys(session, "p-2", [MRN.key])
        session.add(
            RemoteId(
                target="acme",
                resource_type="Patient",
                local_id="p-3",
                remote_id="ehr-pat-7",
            )
        )
        await session.flush()
        match = await find_patient(session, [REMOTE, MRN, EMAIL, OTHER_MRN])
        assert (match.patient_id, match.matched_on) == ("p-3", REMOTE)
        assert match.conflicts == [MRN, EMAIL]
        assert match.learned == 1  # OTHER_MRN, unknown so far, is now p-3's
        record_conflicts(session, match, channel="events", sender="ehr", message_id=None)
        await session.commit()
    assert (await _keys(runtime))[OTHER_MRN.key] == "p-3"
    async with runtime.sessionmaker() as session:
        [record] = (await session.scalars(select(ExceptionRecord))).all()
    assert record.kind == "patient_match_conflict"
    assert record.problems[0]["message"] == (
        "matched on Patient id in EHR acme; identifier urn:example:mrn, email "
        "point at another patient"
    )
    assert "mrn-1" not in str(record.problems) and "pat@example.com" not in str(record.problems)


async def test_nothing_matches_an_event_and_nothing_is_registered(runtime: Runtime) -> None:
    async with runtime.write_session() as session:
        match = await find_patient(session, [MRN, REMOTE])
        await session.commit()
    assert match.patient_id is None
    assert match.tried == ["identifier urn:example:mrn", "Patient id in EHR acme"]
    assert await _keys(runtime) == {}


async def test_a_key_of_another_patient_stays_with_it(runtime: Runtime) -> None:
    async with runtime.write_session() as session:
        assert await repo.claim_keys(session, "p-1", [EMAIL.key, MRN.key]) == {
            EMAIL.key,
            MRN.key,
        }
        assert await repo.claim_keys(session, "p-2", [EMAIL.key, OTHER_MRN.key]) == {OTHER_MRN.key}
        await session.commit()
    assert await _keys(runtime) == {EMAIL.key: "p-1", MRN.key: "p-1", OTHER_MRN.key: "p-2"}
