"""The queries that prepare a claimed batch (stored resources with the target's remote
ids; outside references' ids and identifiers) find their rows by key: on SQLite a
row-value ``IN`` would scan the whole ``fhir_resources`` table for every batch."""

from __future__ import annotations

from typing import Any

from sqlalchemy import event

from gateway.db.models import FhirResource, RemoteId
from gateway.db.types import utcnow
from gateway.delivery import repository as repo
from gateway.runtime import Runtime


async def _store(runtime: Runtime) -> None:
    now = utcnow()
    async with runtime.sessionmaker() as session:
        for i in range(3):
            session.add(
                FhirResource(
                    resource_type="Patient",
                    id=f"p{i}",
                    version_id=1,
                    resource={"resourceType": "Patient", "id": f"p{i}"},
                    identifier_system="urn:mrn",
                    identifier_value=f"m{i}",
                    patient_id=f"p{i}",
                    created_at=now,
                    updated_at=now,
                )
            )
        session.add(
            RemoteId(
                target="t", resource_type="Patient", local_id="p1", remote_id="r1", updated_at=now
            )
        )
        await session.commit()


async def test_prepare_queries_find_resources_by_key(runtime: Runtime) -> None:
    await _store(runtime)
    statements: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if "fhir_resources" in statement:
            statements.append((statement, parameters))

    event.listen(runtime.engine.sync_engine, "before_cursor_execute", capture)
    try:
        async with runtime.sessionmaker() as session:
            resources, remote = await repo.resources_for_target(
                session, target="t", refs=["Patient/p0", "Patient/p1", "Patient/missing"]
            )
            outside_remote, identifiers = await repo.outside_for_target(
                session, target="t", refs=["Patient/p1", "Patient/p2"]
            )
    finally:
        event.remove(runtime.engine.sync_engine, "before_cursor_execute", capture)

    assert sorted(resources) == ["Patient/p0", "Patient/p1"]
    assert remote == {"Patient/p1": "r1"}
    assert outside_remote == {"Patient/p1": "r1"}
    assert identifiers == {"Patient/p1": ("urn:mrn", "m1"), "Patient/p2": ("urn:mrn", "m2")}
    assert len(statements) == 2
    if runtime.engine.dialect.name != "sqlite":
        return
    async with runtime.engine.connect() as conn:
        for statement, parameters in statements:
            plan = (await conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters)).all()
            details = " ".join(str(row[-1]) for row in plan)
            assert "SCAN fhir_resources" not in details, details
