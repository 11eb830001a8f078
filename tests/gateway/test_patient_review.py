async def test_survivors_follow_a_chain_of_merges(runtime: Runtime) -> None:
    from gateway.db.models import MatchReviewStatus, PatientMatchReview
    from gateway.db.types import utcnow
    from gateway.patients.review import survivors

    async with runtime.sessionmaker() as session:
        for survivor, replaced, status in (
            ("b", "c", MatchReviewStatus.ACCEPTED),  # c merged into b
            ("a", "b", MatchReviewStatus.LINKED),  # then b into a
            ("x", "y", MatchReviewStatus.REJECTED),  # two people
            ("x", "z", MatchReviewStatus.PENDING),
        ):
            session.add(
                PatientMatchReview(
                    patient_id=survivor,
                    candidate_id=replaced,
                    score=0.8,
                    features={},
                    status=status,
                    created_at=utcnow(),
                )
            )
        await session.commit()
        assert await survivors(session, ["c", "b", "y", "z", "a"]) == {"c": "a", "b": "a"}


async def test_fhir_searches_and_reads_are_audited_with_their_patients(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    from gateway.db.models import AuditEntry

    out = await submit(client, admin_headers, samples.intake())
    patient = out["patient"]["id"]
    r = await client.get("/fhir/Observation", params={"patient": patient}, headers=admin_headers)
    assert r.json()["total"] == 3
    await client.get(f"/fhir/Patient/{patient}/$everything", headers=admin_headers)
    async with runtime.sessionmaker() as session:
        rows = list(
            await session.scalars(
                select(AuditEntry).where(AuditEntry.action == "search").order_by(AuditEntry.id)
            )
        )
    assert [(r.entity_type, r.patient_id) for r in rows] == [
        ("Observation", patient),
        ("Patient", patient),
    ]
    assert rows[0].query == f"patient={patient}"
