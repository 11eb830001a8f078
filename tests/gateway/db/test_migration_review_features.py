"""Migration 0021 fills ``patient_review_features`` from the Patients already stored, on
SQLite and PostgreSQL: a Patient with a name and a birth date gets its normalized row
(inactive ones marked), one without a birth date none; the new patient's duplicate
review then finds the old ones."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select, text

from gateway.db.engine import make_engine, make_sessionmaker
from gateway.db.identity_models import PatientFeatures
from gateway.db.migrate import alembic_config, upgrade
from gateway.db.models import FhirResource
from gateway.patients.review import detect_duplicates


def _patient(pid: str, **changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "resourceType": "Patient",
        "id": pid,
        "name": [{"family": "Gómez", "given": ["José", "Luis"]}],
        "birthDate": "1979-03-08",
        "telecom": [{"system": "phone", "value": "+1 (415) 555-2671"}],
        "address": [{"line": ["1 Main St."], "postalCode": "94105-1234"}],
    }
    base.update(changes)
    return base


def _down(database_url: str) -> None:
    from alembic import command

    command.downgrade(alembic_config(database_url), "0020_lookup_indexes")


async def test_the_migration_fills_the_features_of_stored_patients(database_url: str) -> None:
    await asyncio.to_thread(_down, database_url)
    engine = make_engine(database_url)
    stored = [
        _patient("p-active"),
        _patient("p-merged", active=False),
        {k: v for k, v in _patient("p-no-birth-date").items() if k != "birthDate"},
    ]
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    # as the gateway stores times: SQLite naive UTC, PostgreSQL timestamptz
    at = when.replace(tzinfo=None) if engine.dialect.name == "sqlite" else when
    insert = text(
        "INSERT INTO fhir_resources (resource_type, id, version_id, resource, created_at,"
        " updated_at) VALUES ('Patient', :id, 1, :resource, :at, :at)"
    )
    try:
        async with engine.begin() as conn:
            for resource in stored:
                await conn.execute(
                    insert, {"id": resource["id"], "resource": json.dumps(resource), "at": at}
                )
        await asyncio.to_thread(upgrade, database_url)
        sessions = make_sessionmaker(engine)
        async with sessions() as session:
            rows = {r.patient_id: r for r in await session.scalars(select(PatientFeatures))}
            assert set(rows) == {"p-active", "p-merged"}
            active = rows["p-active"]
            assert (active.family, active.given, active.birth_date) == (
                "gomez",
                "jose luis",
                "1979-03-08",
            )
            assert (active.phone, active.address_line, active.postal_code) == (
                "4155552671",
                "1 main st",
                "94105",
            )
            assert active.active is True and rows["p-merged"].active is False
            assert active.updated_at == when
            found = await detect_duplicates(session, _patient("p-new"))
            assert [(r.candidate_id, r.status) for r in found] == [("p-active", "linked")]
            await session.rollback()
    finally:
        await engine.dispose()


async def test_review_features_command_fills_only_the_missing_rows(database_url: str) -> None:
    """``fhir-gateway db review-features`` (:func:`fill_review_features`): a Patient stored
    without its row (by a process of the earlier release) gets it, across pages; one that
    has its row keeps it as it is; a second run adds nothing."""
    from gateway.fhir import repository as fhir_repo
    from gateway.patients.review import fill_review_features

    engine = make_engine(database_url)
    insert = text(
        "INSERT INTO fhir_resources (resource_type, id, version_id, resource, created_at,"
        " updated_at) VALUES ('Patient', :id, 1, :resource, :at, :at)"
    )
    at = datetime(2026, 1, 2, tzinfo=UTC)
    try:
        sessions = make_sessionmaker(engine)
        async with sessions() as session:
            await fhir_repo.save_resource(
                session, _patient("p-kept"), message_id=None, patient_id="p-kept"
            )
            for n in range(5):
                await session.execute(
                    insert,
                    {
                        "id": f"p-old-{n}",
                        "resource": json.dumps(_patient(f"p-old-{n}")),
                        "at": at.replace(tzinfo=None) if engine.dialect.name == "sqlite" else at,
                    },
                )
            await session.commit()
            kept = await session.get(PatientFeatures, "p-kept")
            assert kept is not None
            kept_at = kept.updated_at
            assert await fill_review_features(session, page=2) == 5
            assert await fill_review_features(session, page=2) == 0
            session.expire_all()
            rows = {r.patient_id: r for r in await session.scalars(select(PatientFeatures))}
            assert set(rows) == {"p-kept", *(f"p-old-{n}" for n in range(5))}
            assert rows["p-kept"].updated_at == kept_at
            assert rows["p-old-3"].updated_at == at and rows["p-old-3"].family == "gomez"
    finally:
        await engine.dispose()


async def test_review_features_rebuild_recomputes_older_rows_only(database_url: str) -> None:
    """``--rebuild`` recomputes every Patient's row from its current version (a process
    of the earlier release updated the Patient without its row), but never writes over
    a row from a newer version than the one it read (a live write meanwhile wins)."""
    from sqlalchemy import update

    from gateway.fhir import repository as fhir_repo
    from gateway.patients.review import fill_review_features

    engine = make_engine(database_url)
    try:
        async with make_sessionmaker(engine)() as session:
            for pid in ("p-stale", "p-newer"):
                await fhir_repo.save_resource(
                    session, _patient(pid), message_id=None, patient_id=pid
                )
            await session.commit()
            # an old process renamed p-stale (its resource only); a live write of p-newer
            # is dated after what the rebuild will read
            renamed = _patient("p-stale", name=[{"family": "Okafor", "given": ["Ada"]}])
            await session.execute(
                update(FhirResource)
                .where(FhirResource.resource_type == "Patient", FhirResource.id == "p-stale")
                .values(resource=renamed)
            )
            later = datetime(2099, 1, 1, tzinfo=UTC)
            await session.execute(
                update(PatientFeatures)
                .where(PatientFeatures.patient_id == "p-newer")
                .values(family="live", updated_at=later)
            )
            await session.commit()
            assert await fill_review_features(session) == 0  # nothing missing
            assert await fill_review_features(session, rebuild=True) == 2  # both computed
            session.expire_all()
            stale = await session.get(PatientFeatures, "p-stale")
            newer = await session.get(PatientFeatures, "p-newer")
            assert stale is not None and (stale.family, stale.given) == ("okafor", "ada")
            assert newer is not None and newer.family == "live"  # not overwritten
    finally:
        await engine.dispose()
