"""Probable duplicate patients: the score (typos, transpositions, swapped names), the
review queue on ingest, accept (merge) and reject with a reason, scopes and errors."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from sqlalchemy import text

from gateway.db.types import utcnow
from gateway.fhir import repository as fhir_repo
from gateway.patients import review as review_module
from gateway.patients.review import (
    LINK_THRESHOLD,
    REVIEW_THRESHOLD,
    WEIGHTS,
    detect_duplicates,
    score,
)
from gateway.runtime import Runtime
from tests import samples
from tests.conftest import ApiKeyFactory


def patient(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "resourceType": "Patient",
        "id": "p",
        "name": [{"family": "Rivera", "given": ["Jordan"]}],
        "birthDate": "1988-04-12",
        "telecom": [
            {"system": "phone", "value": "+14155552671"},
            {"system": "email", "value": "jordan.rivera@example.com"},
        ],
        "address": [{"line": ["100 Market St"], "postalCode": "94105"}],
    }
    base.update(changes)
    return base


def test_weights_sum_to_one() -> None:
    assert sum(WEIGHTS.values()) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("other", "band"),
    [
        (patient(), "link"),
        (  # a typo in the surname, another email
            patient(
                name=[{"family": "Rivira", "given": ["Jordan"]}],
                telecom=[
                    {"system": "phone", "value": "+14155552671"},
                    {"system": "email", "value": "jr1988@mail.example"},
                ],
            ),
            "review",
        ),
        (patient(name=[{"family": "Jordan", "given": ["Rivera"]}]), "link"),  # swapped
        (patient(birthDate="1988-12-04"), "review"),  # month and day transposed
        (patient(birthDate="1988-04-21"), "review"),  # two digits transposed
        (  # another person at the same address
            patient(
                name=[{"family": "Okafor", "given": ["Chidi"]}],
                telecom=[{"system": "phone", "value": "+16175550188"}],
            ),
            "none",
        ),
        (patient(birthDate="1961-07-30", telecom=[]), "none"),
    ],
)
def test_score_bands(other: dict[str, Any], band: str) -> None:
    s = score(patient(), other)
    assert s is not None
    got = (
        "link" if s.total >= LINK_THRESHOLD else "review" if s.total >= REVIEW_THRESHOLD else "none"
    )
    assert got == band, s


def test_no_score_without_a_birth_date() -> None:
    assert score(patient(), patient(birthDate=None)) is None


def typo_intakes() -> tuple[dict[str, Any], dict[str, Any]]:
    first = samples.intake()
    second = samples.intake()
    second["patient"]["last_name"] = "Rivira"
    return first, second


async def queue(client: httpx.AsyncClient, headers: dict[str, str], **params: str) -> Any:
    r = await client.get("/v1/patients/review", params=params, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


async def test_two_intakes_with_a_typo_wait_for_review_then_accept_merges(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    first, second = typo_intakes()
    a = (await client.post("/v1/intake-submissions", json=first, headers=admin_headers)).json()
    b = (await client.post("/v1/intake-submissions", json=second, headers=admin_headers)).json()
    old, new = a["patient"]["id"], b["patient"]["id"]
    assert old != new
    (item,) = (await queue(client, admin_headers))["items"]
    assert (item["patient"]["id"], item["candidate"]["id"]) == (new, old)
    assert REVIEW_THRESHOLD <= item["score"] < LINK_THRESHOLD
    assert set(item["parts"]) == set(WEIGHTS)
    r = await client.post(
        f"/v1/patients/review/{item['id']}/accept",
        json={"reason": "same person, surname typed wrong"},
        headers=admin_headers,
    )
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "accepted"
    survivor = (await client.get(f"/fhir/Patient/{old}", headers=admin_headers)).json()
    merged = (await client.get(f"/fhir/Patient/{new}", headers=admin_headers)).json()
    assert survivor["link"] == [{"other": {"reference": f"Patient/{new}"}, "type": "replaces"}]
    assert merged["link"] == [{"other": {"reference": f"Patient/{old}"}, "type": "replaced-by"}]
    assert merged["active"] is False
    # the merged patient's answers now belong to the survivor
    qrs = (
        await client.get(
            "/fhir/QuestionnaireResponse", params={"patient": old}, headers=admin_headers
        )
    ).json()
    assert qrs["total"] == 2
    # a later intake for the merged identifier lands on the survivor
    again = dict(second, submission_id=second["submission_id"] + "-b")
    c = (await client.post("/v1/intake-submissions", json=again, headers=admin_headers)).json()
    assert c["patient"]["id"] == old
    decided = await client.post(
        f"/v1/patients/review/{item['id']}/reject", json={"reason": "x"}, headers=admin_headers
    )
    assert decided.status_code == 409


async def test_reject_records_the_reason_and_keeps_both(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    first, second = typo_intakes()
    for body in (first, second):
        assert (
            await client.post("/v1/intake-submissions", json=body, headers=admin_headers)
        ).status_code == 202
    (item,) = (await queue(client, admin_headers))["items"]
    r = await client.post(
        f"/v1/patients/review/{item['id']}/reject",
        json={"reason": "twins"},
        headers=admin_headers,
    )
    assert r.status_code == 200
    assert (r.json()["status"], r.json()["reason"]) == ("rejected", "twins")
    assert r.json()["decided_by"].startswith("client:")
    assert (await queue(client, admin_headers))["items"] == []
    assert len((await queue(client, admin_headers, status="rejected"))["items"]) == 1


async def test_a_record_above_the_link_threshold_is_linked_not_queued(
    client: httpx.AsyncClient, admin_headers: dict[str, str], runtime: Runtime
) -> None:
    first = samples.intake()
    a = (await client.post("/v1/intake-submissions", json=first, headers=admin_headers)).json()
    stored = (await client.get(f"/fhir/Patient/{a['patient']['id']}", headers=admin_headers)).json()
    # the same demographics under another id (an intake always carries an email, and an
    # equal email finds the stored patient by its key before any scoring)
    async with runtime.sessionmaker() as session:
        found = await detect_duplicates(session, dict(stored, id="another-record"))
        await session.rollback()
    assert [(r.candidate_id, r.status) for r in found] == [(a["patient"]["id"], "linked")]
    assert found[0].score >= LINK_THRESHOLD


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("POST", "/v1/patients/review/999/accept", {"reason": "x"}, 404),
        ("POST", "/v1/patients/review/999/reject", {"reason": "x"}, 404),
        ("POST", "/v1/patients/review/1/accept", {}, 422),
        ("POST", "/v1/patients/review/1/reject", {"reason": ""}, 422),
    ],
)
async def test_review_errors_are_problems(
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    method: str,
    path: str,
    body: dict[str, Any],
    status: int,
) -> None:
    r = await client.request(method, path, json=body, headers=admin_headers)
    assert r.status_code == status
    assert r.headers["content-type"].startswith("application/problem+json")


async def test_the_queue_needs_ops_scopes(
    client: httpx.AsyncClient, make_api_key: ApiKeyFactory
) -> None:
    key = await make_api_key("fhir:read")
    headers = {"Authorization": f"Bearer {key}"}
    assert (await client.get("/v1/patients/review", headers=headers)).status_code == 403
    reader = {"Authorization": f"Bearer {await make_api_key('ops:read')}"}
    r = await client.post("/v1/patients/review/1/reject", json={"reason": "x"}, headers=reader)
    assert r.status_code == 403


async def test_recorded_element_conflicts_are_listed_in_the_queue(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    intake = samples.intake()
    r = await client.post("/v1/intake-submissions", json=intake, headers=admin_headers)
    patient_id = r.json()["patient"]["id"]
    checkout = samples.canonical_checkout(
        patient_external_id=intake["patient"]["external_id"],
        intake_submission_id=intake["submission_id"],
    )
    checkout["customer"].update(
        name="Jordan Q Rivera", phone="415-555-0199", email=intake["patient"]["email"]
    )
    assert (
        await client.post("/v1/checkouts", json=checkout, headers=admin_headers)
    ).status_code == 202
    page = await queue(client, admin_headers)
    (side,) = page["conflicts"]
    assert side["id"] == patient_id
    assert {c["element"] for c in side["conflicts"]} == {"name", "telecom.phone"}
    assert "Jordan Q" not in str(page)  # elements and sources, never the values


def test_every_birth_date_that_scores_is_a_blocking_variant() -> None:
    from gateway.patients.review import birth_date_part, birth_date_variants

    variants = birth_date_variants("1988-04-12")
    for other in ("1988-12-04", "1988-04-21", "1998-04-12", "1988-04-13", "1988-04-12"):
        assert birth_date_part("1988-04-12", other) > 0
        assert other in variants
    assert "1961-07-30" not in variants


async def test_an_ehr_id_of_the_merged_record_finds_the_survivor(
    client: httpx.AsyncClient, admin_headers: dict[str, str], runtime: Runtime
) -> None:
    from gateway.db.models import RemoteId
    from gateway.patients.repository import patients_for_remote_ids
    from mappers.events import PatientRef

    first, second = typo_intakes()
    a = (await client.post("/v1/intake-submissions", json=first, headers=admin_headers)).json()
    b = (await client.post("/v1/intake-submissions", json=second, headers=admin_headers)).json()
    old, new = a["patient"]["id"], b["patient"]["id"]
    async with runtime.sessionmaker() as session:
        for local, remote in ((old, "ehr-1"), (new, "ehr-2")):
            session.add(
                RemoteId(
                    target="ehr",
                    resource_type="Patient",
                    local_id=local,
                    remote_id=remote,
                    updated_at=utcnow(),
                )
            )
        await session.commit()
    (item,) = (await queue(client, admin_headers))["items"]
    r = await client.post(
        f"/v1/patients/review/{item['id']}/accept", json={"reason": "same"}, headers=admin_headers
    )
    assert r.status_code == 200
    refs = [PatientRef("remote_id", v, target="ehr") for v in ("ehr-1", "ehr-2")]
    async with runtime.sessionmaker() as session:
        found = await patients_for_remote_ids(session, refs)
    assert set(found.values()) == {old}


async def test_only_the_most_recent_candidates_of_a_birth_date_are_scored(
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    runtime: Runtime,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A birth date shared by many stored Patients (a placeholder date, synthetic data)
    costs at most MAX_CANDIDATES scores per new patient: the most recently updated."""
    ids = []
    for _ in range(3):
        body = samples.intake()  # a new patient each, the same demographics
        r = await client.post("/v1/intake-submissions", json=body, headers=admin_headers)
        assert r.status_code == 202, r.text
        ids.append(r.json()["patient"]["id"])
    stored = (await client.get(f"/fhir/Patient/{ids[0]}", headers=admin_headers)).json()
    monkeypatch.setattr(review_module, "MAX_CANDIDATES", 2)
    async with runtime.sessionmaker() as session:
        found = await detect_duplicates(session, dict(stored, id="another-record"))
        await session.rollback()
    # the two most recent are proposed; the oldest was not read
    assert {r.candidate_id for r in found} == {ids[1], ids[2]}


async def test_candidates_are_read_through_the_birth_date_index(runtime: Runtime) -> None:
    """The candidate query uses ``ix_patient_review_features_birth_date`` (migration
    0021) on both databases: without it every new patient would read every stored
    Patient's features."""
    dialect = runtime.engine.dialect.name
    statement = review_module.candidates_statement("1988-04-12", dialect)
    compiled = statement.compile(runtime.engine.sync_engine, compile_kwargs={"literal_binds": True})
    async with runtime.sessionmaker() as session:
        if runtime.engine.dialect.name == "postgresql":
            # A few rows: the planner would rightly scan; forbid it to see the index match.
            await session.execute(text("SET LOCAL enable_seqscan = off"))
            plan = (await session.execute(text(f"EXPLAIN {compiled}"))).scalars().all()
            details = " ".join(plan)
        else:
            plan = (await session.execute(text(f"EXPLAIN QUERY PLAN {compiled}"))).all()
            details = " ".join(str(row[-1]) for row in plan)
            assert "SCAN patient_review_features" not in details, details
        assert "ix_patient_review_features_birth_date" in details, details
        await session.rollback()


async def test_candidates_statement_finds_the_date_and_its_typos_first(runtime: Runtime) -> None:
    """Active candidates of the date come first, then a typo of it; another date and an
    inactive (merged) Patient are not read."""
    async with runtime.sessionmaker() as session:
        for pid, born, active in (
            ("a", "1988-04-12", True),
            ("b", "1988-04-21", True),
            ("c", "1975-01-01", True),
            ("d", "1988-04-12", False),
        ):
            await fhir_repo.save_resource(
                session,
                patient(id=pid, birthDate=born, active=active),
                message_id=None,
                patient_id=pid,
                current=None,
            )
        await session.flush()
        statement = review_module.candidates_statement("1988-04-12", runtime.engine.dialect.name)
        rows = (await session.execute(statement)).all()
        assert [row[0] for row in rows] == ["a", "b"]
        await session.rollback()


async def test_review_features_follow_each_version_of_the_patient(runtime: Runtime) -> None:
    """The features row is written with the Patient, replaced with each new version
    (normalized: accents, case and punctuation folded; phone digits), and deleted when
    the Patient no longer has a birth date."""
    from gateway.db.identity_models import PatientFeatures

    first = patient(id="p1", name=[{"family": "Núñez", "given": ["Ana-María"]}])
    async with runtime.sessionmaker() as session:
        await fhir_repo.save_resource(session, first, message_id=None, patient_id="p1")
        await session.commit()
        row = await session.get(PatientFeatures, "p1")
        assert row is not None
        assert (row.family, row.given, row.birth_date) == ("nunez", "anamaria", "1988-04-12")
        assert row.active is True
        second = dict(first, active=False, telecom=[{"system": "phone", "value": "(415) 555-2671"}])
        await fhir_repo.save_resource(session, second, message_id=None, patient_id="p1")
        await session.commit()
        session.expire_all()
        row = await session.get(PatientFeatures, "p1")
        assert row is not None and (row.active, row.phone) == (False, "4155552671")
        third = {k: v for k, v in second.items() if k != "birthDate"}
        await fhir_repo.save_resource(session, third, message_id=None, patient_id="p1")
        await session.commit()
        session.expire_all()
        assert await session.get(PatientFeatures, "p1") is None


def test_placeholder_phones_and_emails_do_not_score() -> None:
    """Kept as exported by a bulk import, ``n/a`` and ``000-000-0000`` are shared by
    unrelated patients: they are not evidence of a duplicate (the next usable one is)."""
    placeholders = [
        {"system": "phone", "value": "000-000-0000"},
        {"system": "email", "value": "n/a"},
    ]
    a = patient(telecom=placeholders, name=[{"family": "Okafor", "given": ["Ada"]}])
    b = patient(telecom=placeholders)
    s = score(a, b)
    assert s is not None and "phone" not in s.parts and "email" not in s.parts
    c = patient(telecom=[*placeholders, {"system": "phone", "value": "+14155552671"}])
    s = score(c, b)
    assert s is not None and "phone" not in s.parts  # b has no usable phone
    s = score(c, patient())
    assert s is not None and s.parts["phone"] == 1.0


def test_the_candidate_prefilter_never_drops_a_pair_that_scores() -> None:
    """``may_reach_review`` skips only candidates that cannot reach the review threshold:
    over a population's names and near-duplicates of them (a typo in a name, a swapped
    name, a birth-date typo, other phones, emails and addresses), every pair scoring at
    or above :data:`REVIEW_THRESHOLD` passes it, and it skips most unrelated people."""
    import random

    from gateway.patients.review import REVIEW_THRESHOLD, features, may_reach_review, score
    from testkit.samples import person

    rng = random.Random(7)

    def as_patient(n: int) -> dict[str, Any]:
        p = person(n)
        return patient(
            name=[{"family": p["last_name"], "given": [p["first_name"]]}],
            birthDate=p["birth_date_iso"],
            telecom=[{"system": "phone", "value": p["phone"]}],
        )

    def near(p: dict[str, Any]) -> dict[str, Any]:
        q = dict(p)
        family = p["name"][0]["family"]
        given = p["name"][0]["given"][0]
        change = rng.randrange(4)
        if change == 0 and len(family) > 2:
            i = rng.randrange(len(family))
            family = family[:i] + rng.choice("aeiourst") + family[i + 1 :]
        elif change == 1:
            family, given = given, family
        elif change == 2:
            y, m, d = p["birthDate"].split("-")
            q["birthDate"] = f"{y}-{m}-{d[::-1]}" if d[::-1] <= "28" else p["birthDate"]
        q["name"] = [{"family": family, "given": [given]}]
        if rng.random() < 0.5:
            q["telecom"] = [{"system": "email", "value": f"x{rng.randrange(99)}@example.com"}]
        return q

    people = [as_patient(n) for n in range(300)]
    pairs = [(a, near(a)) for a in people] + [
        (rng.choice(people), rng.choice(people)) for _ in range(3000)
    ]
    reaching = skipped = 0
    for a, b in pairs:
        s = score(a, b)
        names = features(b).names
        assert names is not None
        passes = may_reach_review(features(a), names, b["birthDate"])
        if s is not None and s.total >= REVIEW_THRESHOLD:
            reaching += 1
            assert passes, (a, b, s)
        elif not passes:
            skipped += 1
    assert reaching >= 200  # the near-duplicates were exercised
    assert skipped >= 1500  # and most unrelated pairs are skipped


async def test_stored_features_score_as_the_resources_do(runtime: Runtime) -> None:
    """The candidates come from ``patient_review_features`` (normalized when the Patient
    was stored), not from the resources: over stored Patients of one birth date and its
    typos, with accents, swapped and mistyped names, placeholder and missing phones,
    emails in other cases, addresses with a line or a postal code only, and a merged
    (inactive) one, ``detect_duplicates`` proposes exactly the pairs that ``score`` on
    the two resources puts at or above the threshold, with the same scores and parts."""
    import random

    rng = random.Random(11)
    dates = ["1988-04-12", "1988-04-21", "1988-12-04", "1989-04-12", "1988-04-13"]
    families = ["Rivera", "Rivira", "Núñez", "Nunez", "O'Brien", "Obrien", "Smith"]
    givens = [["Jordan"], ["Jordan", "Lee"], ["José"], ["Jose"], ["Ana-María"]]

    def telecom() -> list[dict[str, str]]:
        out = []
        phone = rng.choice(["+14155552671", "(415) 555-2671", "000-000-0000", "415-555-0100", None])
        if phone:
            out.append({"system": "phone", "value": phone})
        email = rng.choice(["Jordan.Rivera@Example.com", "jordan.rivera@example.com", "n/a", None])
        if email:
            out.append({"system": "email", "value": email})
        return out

    def address() -> list[dict[str, Any]]:
        return rng.choice(
            [
                [],
                [{"line": ["100 Market St"], "postalCode": "94105"}],
                [{"line": ["100 Market Street"], "postalCode": "94105-1200"}],
                [{"postalCode": "94105"}],
                [{"line": ["1 Main St"]}],
            ]
        )

    def person(pid: str) -> dict[str, Any]:
        family, given = rng.choice(families), rng.choice(givens)
        if rng.random() < 0.2:
            name = {"family": given[0], "given": [family]}  # swapped
        else:
            name = {"family": family, "given": given}
        return patient(
            id=pid,
            name=[name],
            birthDate=rng.choice(dates),
            telecom=telecom(),
            address=address(),
            active=rng.random() > 0.1,
        )

    stored = [person(f"s{i}") for i in range(120)]
    async with runtime.sessionmaker() as session:
        for p in stored:
            await fhir_repo.save_resource(session, p, message_id=None, patient_id=p["id"])
        await session.commit()
        proposed = 0
        for n in range(25):
            probe = person(f"probe-{n}")
            found = await detect_duplicates(session, probe)
            await session.rollback()
            expected = {}
            for other in stored:
                s = score(probe, other)
                if (
                    other.get("active") is not False
                    and s is not None
                    and s.total >= REVIEW_THRESHOLD
                ):
                    expected[other["id"]] = (s.total, s.parts)
            assert {r.candidate_id: (r.score, r.parts) for r in found} == expected
            proposed += len(expected)
    assert proposed > 100  # the population does produce duplicates to compare
