"""The merge-review queue on the console: two intakes with a surname typo wait as a
probable duplicate; an operator merges one pair and rejects another, with reasons."""

from __future__ import annotations

import httpx

from gateway.db.models import AuditEntry, PatientReview
from gateway.runtime import Runtime
from tests import samples
from tests.console.conftest import StaffFactory, sign_in
from tests.support.api import rows


async def _pair(console: httpx.AsyncClient, headers: dict[str, str], surname: str) -> None:
    first = samples.intake()
    second = samples.intake()
    second["patient"]["last_name"] = surname
    for body in (first, second):
        answer = await console.post("/v1/intake-submissions", json=body, headers=headers)
        assert answer.status_code == 202, answer.text


async def test_merge_and_reject_probable_duplicates(
    console: httpx.AsyncClient,
    make_staff: StaffFactory,
    runtime: Runtime,
    admin_headers: dict[str, str],
) -> None:
    await _pair(console, admin_headers, "Rivira")
    [review] = await rows(runtime, PatientReview)
    user = await make_staff("operator")
    csrf = await sign_in(console, user)
    page = await console.get("/console/duplicates")
    assert f"Review {review.id}: Patient/{review.patient_id}" in page.text
    no_reason = await console.post(
        f"/console/duplicates/{review.id}/accept", data={"csrf_token": csrf}
    )
    assert "reason-needed" in no_reason.headers["location"]
    merged = await console.post(
        f"/console/duplicates/{review.id}/accept",
        data={"csrf_token": csrf, "survivor": review.candidate_id, "reason": "surname typo"},
    )
    assert "notice=merged" in merged.headers["location"], merged.headers["location"]
    [decided] = await rows(runtime, PatientReview)
    assert (decided.status, decided.reason, decided.decided_by) == (
        "accepted",
        "surname typo",
        f"staff:{user}",
    )
    again = await console.post(
        f"/console/duplicates/{review.id}/reject", data={"csrf_token": csrf, "reason": "x"}
    )
    assert "console_error" in again.cookies  # decided already: said on the next page
    updates = await rows(runtime, AuditEntry, AuditEntry.actor == f"staff:{user}")
    assert {e.patient_id for e in updates if e.action == "update"} == {
        review.patient_id,
        review.candidate_id,
    }
    assert "No probable duplicates to review" in (await console.get("/console/duplicates")).text


async def test_a_viewer_sees_the_queue_but_cannot_decide(
    console: httpx.AsyncClient,
    make_staff: StaffFactory,
    runtime: Runtime,
    admin_headers: dict[str, str],
) -> None:
    await _pair(console, admin_headers, "Rivira")
    [review] = await rows(runtime, PatientReview)
    csrf = await sign_in(console, await make_staff("viewer"))
    page = await console.get("/console/duplicates")
    assert f"Review {review.id}" in page.text and "Merge review" not in page.text
    refused = await console.post(
        f"/console/duplicates/{review.id}/reject", data={"csrf_token": csrf, "reason": "x"}
    )
    assert refused.status_code == 403
    [still] = await rows(runtime, PatientReview)
    assert still.status == "open"
