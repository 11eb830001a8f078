"""The console over HTTP (in process): sign-in, cookie flags, CSRF, roles, idle expiry,
every page, the actions and what they record (audit trail, case history)."""

from __future__ import annotations

import html
import re
from datetime import timedelta
from urllib.parse import unquote

import httpx
import pytest
from sqlalchemy import select

from gateway.db.models import (
    AuditEntry,
    Case,
    CaseEvent,
    Delivery,
    ExceptionRecord,
    StaffSession,
    TargetState,
)
from gateway.runtime import Runtime
from tests.console.conftest import PASSWORD, StaffFactory, csrf_of, seed, sign_in
from tests.support.api import rows


async def audit_actions(runtime: Runtime, actor: str) -> list[tuple[str, str, str]]:
    entries = await rows(runtime, AuditEntry, AuditEntry.actor == actor, order_by=AuditEntry.id)
    return [(e.action, e.entity_type, e.entity_id) for e in entries]


async def test_pages_need_a_session(console: httpx.AsyncClient) -> None:
    answer = await console.get("/console/exceptions")
    assert answer.status_code == 303
    assert answer.headers["location"] == "/console/login?next=%2Fconsole%2Fexceptions"


async def test_sign_in_sets_a_strict_cookie_and_is_audited(
    console: httpx.AsyncClient, make_staff: StaffFactory, runtime: Runtime
) -> None:
    user = await make_staff("viewer")
    page = await console.get("/console/login")
    answer = await console.post(
        "/console/login",
        data={"csrf_token": csrf_of(page.text), "username": user, "password": PASSWORD},
    )
    assert answer.status_code == 303
    cookie = next(
        v for k, v in answer.headers.multi_items() if k == "set-cookie" and "fgw_console=" in v
    )
    assert "HttpOnly" in cookie and "SameSite=lax" in cookie and "Path=/console" in cookie
    assert "Secure" not in cookie  # plain http to a loopback address (development)
    assert (await console.get("/console")).status_code == 200
    assert ("login", "StaffUser") in [a[:2] for a in await audit_actions(runtime, f"staff:{user}")]
    assert ("view", "ConsolePage", "overview") in await audit_actions(runtime, f"staff:{user}")


async def test_cookies_are_secure_outside_loopback(settings, runtime: Runtime) -> None:  # type: ignore[no-untyped-def]
    from gateway.app import create_app

    app = create_app(settings, runtime=runtime, run_worker=False)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://ops.example.org"
        ) as http,
    ):
        page = await http.get("/console/login")
    cookie = page.headers["set-cookie"]
    assert "fgw_console_login=" in cookie and "Secure" in cookie and "HttpOnly" in cookie


async def test_wrong_password_is_refused_and_audited(
    console: httpx.AsyncClient, make_staff: StaffFactory, runtime: Runtime
) -> None:
    user = await make_staff("admin")
    page = await console.get("/console/login")
    answer = await console.post(
        "/console/login",
        data={"csrf_token": csrf_of(page.text), "username": user, "password": "not the password"},
    )
    assert answer.status_code == 401
    assert "not right" in answer.text
    assert [a[0] for a in await audit_actions(runtime, f"staff:{user}")] == ["login-failed"]


async def test_sign_in_form_without_its_csrf_token_is_refused(
    console: httpx.AsyncClient, make_staff: StaffFactory
) -> None:
    user = await make_staff("admin")
    answer = await console.post(
        "/console/login", data={"username": user, "password": PASSWORD, "csrf_token": "forged"}
    )
    assert answer.status_code == 403


async def test_forged_form_without_csrf_is_refused_and_changes_nothing(
    console: httpx.AsyncClient, make_staff: StaffFactory, runtime: Runtime
) -> None:
    seeded = await seed(runtime)
    await sign_in(console, await make_staff("operator"))
    answer = await console.post(
        "/console/exceptions/act",
        data={"ids": str(seeded.exception_id), "action": "resolve", "reason": "forged"},
    )
    assert answer.status_code == 403
    assert "CSRF" in answer.text
    [row] = await rows(runtime, ExceptionRecord)
    assert row.status == "open"
    [refusal] = await rows(runtime, AuditEntry, AuditEntry.action == "refuse")
    assert refusal.actor.startswith("staff:operator") and refusal.outcome == "4"
    assert refusal.entity_id == "POST /console/exceptions/act"


async def test_a_viewer_reads_but_cannot_act(
    console: httpx.AsyncClient, make_staff: StaffFactory, runtime: Runtime
) -> None:
    seeded = await seed(runtime)
    csrf = await sign_in(console, await make_staff("viewer"))
    page = await console.get("/console/exceptions")
    assert page.status_code == 200 and "Resolve" not in page.text
    answer = await console.post(
        "/console/exceptions/act",
        data={
            "csrf_token": csrf,
            "ids": str(seeded.exception_id),
            "action": "resolve",
            "reason": "x",
        },
    )
    assert answer.status_code == 403
    assert "operator" in answer.text
    [row] = await rows(runtime, ExceptionRecord)
    assert row.status == "open"


async def test_every_page_renders(
    console: httpx.AsyncClient, make_staff: StaffFactory, runtime: Runtime
) -> None:
    seeded = await seed(runtime)
    await sign_in(console, await make_staff("admin"))
    for path, expect in [
        ("/console", "Cases past their SLA"),
        ("/console/exceptions", "transition_not_allowed"),
        (f"/console/exceptions/{seeded.exception_id}", "not from here"),
        ("/console/dead-letters", "Patient.identifier: a system is required"),
        ("/console/cases", seeded.case_id),
        (f"/console/cases/{seeded.case_id}", "intake_submitted"),
        ("/console/targets", "example-ehr"),
        ("/console/subscribers", "No subscribers"),
        ("/console/profiles", "Published Questionnaires"),
    ]:
        answer = await console.get(path)
        assert answer.status_code == 200, path
        assert expect in answer.text, path
        assert answer.headers["cache-control"] == "no-store"
    # the ISO time is in a tooltip
    assert 'title="20' in (await console.get("/console/exceptions")).text


async def test_empty_states_say_what_to_do(
    console: httpx.AsyncClient, make_staff: StaffFactory
) -> None:
    await sign_in(console, await make_staff("viewer"))
    assert "No dead letters" in (await console.get("/console/dead-letters")).text
    assert "No open exceptions" in (await console.get("/console")).text


async def test_assign_resolve_and_retry_are_recorded(
    console: httpx.AsyncClient, make_staff: StaffFactory, runtime: Runtime
) -> None:
    seeded = await seed(runtime)
    user = await make_staff("operator")
    csrf = await sign_in(console, user)
    ident = str(seeded.exception_id)
    assigned = await console.post(
        "/console/exceptions/act", data={"csrf_token": csrf, "ids": ident, "action": "assign-me"}
    )
    assert assigned.status_code == 303 and "notice=assigned" in assigned.headers["location"]
    mine = await console.get("/console/exceptions?owner=me")
    assert f'value="{ident}"' in mine.text
    no_reason = await console.post(
        "/console/exceptions/act", data={"csrf_token": csrf, "ids": ident, "action": "resolve"}
    )
    assert "reason-needed" in no_reason.headers["location"]
    resolved = await console.post(
        "/console/exceptions/act",
        data={"csrf_token": csrf, "ids": ident, "action": "resolve", "reason": "sent by mistake"},
    )
    assert "notice=resolved" in resolved.headers["location"]
    [row] = await rows(runtime, ExceptionRecord)
    assert (row.status, row.assigned_to, row.resolved_by, row.note) == (
        "resolved",
        user,
        f"staff:{user}",
        "sent by mistake",
    )
    actions = await audit_actions(runtime, f"staff:{user}")
    assert ("assign", "Exception", ident) in actions
    assert ("resolve", "Exception", ident) in actions
    again = await console.post(
        "/console/exceptions/act",
        data={"csrf_token": csrf, "ids": ident, "action": "retry", "reason": "again"},
    )
    assert again.status_code == 303 and "error=" not in again.headers["location"]
    assert "console_error" in again.cookies  # the message, for the next page only
    message = unquote(again.cookies["console_error"])
    page = await console.get(again.headers["location"])
    assert html.escape(message, quote=False) in page.text  # shown on the next page
    assert "console_error" not in console.cookies  # and once only
    forged = await console.get("/console/exceptions?error=Call+1-900-FAKE+now")
    assert "1-900-FAKE" not in forged.text  # a link cannot put text on a console page


async def test_replay_puts_the_dead_letter_back_in_the_queue(
    console: httpx.AsyncClient, make_staff: StaffFactory, runtime: Runtime
) -> None:
    seeded = await seed(runtime)
    user = await make_staff("operator")
    csrf = await sign_in(console, user)
    answer = await console.post(
        "/console/dead-letters/replay", data={"csrf_token": csrf, "ids": str(seeded.delivery_id)}
    )
    assert answer.status_code == 303
    [delivery] = await rows(runtime, Delivery)
    assert delivery.status == "pending" and delivery.replay_count == 1
    assert ("replay", "Delivery", str(seeded.delivery_id)) in await audit_actions(
        runtime, f"staff:{user}"
    )


async def test_override_needs_a_reason_and_is_recorded(
    console: httpx.AsyncClient, make_staff: StaffFactory, runtime: Runtime
) -> None:
    seeded = await seed(runtime)
    user = await make_staff("operator")
    csrf = await sign_in(console, user)
    url = f"/console/cases/{seeded.case_id}/override"
    answer = await console.post(url, data={"csrf_token": csrf, "state": "in_review"})
    assert "reason-needed" in answer.headers["location"]
    answer = await console.post(
        url,
        data={"csrf_token": csrf, "state": "in_review", "reason": "reviewer picked it up by phone"},
    )
    assert "notice=overridden" in answer.headers["location"]
    [case] = await rows(runtime, Case)
    assert case.state == "in_review"
    history = await rows(runtime, CaseEvent, CaseEvent.type == "override")
    assert [(e.from_state, e.to_state, e.note, e.principal) for e in history] == [
        ("awaiting_review", "in_review", "reviewer picked it up by phone", f"staff:{user}")
    ]
    assert ("override", "Case", seeded.case_id) in await audit_actions(runtime, f"staff:{user}")
    page = await console.get(f"/console/cases/{seeded.case_id}")
    assert "reviewer picked it up by phone" in page.text


async def test_pause_and_resume_a_target(
    console: httpx.AsyncClient, make_staff: StaffFactory, runtime: Runtime
) -> None:
    await seed(runtime)
    user = await make_staff("operator")
    csrf = await sign_in(console, user)
    answer = await console.post(
        "/console/targets/ehr/example-ehr/pause",
        data={"csrf_token": csrf, "reason": "EHR maintenance window"},
    )
    assert "notice=paused" in answer.headers["location"]
    [state] = await rows(runtime, TargetState)
    assert state.paused_at is not None and state.paused_by == f"staff:{user}"
    assert "EHR maintenance window" in (await console.get("/console/targets")).text
    await console.post("/console/targets/ehr/example-ehr/resume", data={"csrf_token": csrf})
    [state] = await rows(runtime, TargetState)
    assert state.paused_at is None
    actions = [a[0] for a in await audit_actions(runtime, f"staff:{user}")]
    assert "pause" in actions and "resume" in actions


async def test_subscribers_need_admin_and_show_a_secret_once(
    console: httpx.AsyncClient, make_staff: StaffFactory, runtime: Runtime
) -> None:
    operator_csrf = await sign_in(console, await make_staff("operator"))
    refused = await console.post(
        "/console/subscribers",
        data={"csrf_token": operator_csrf, "name": "crm", "url": "http://127.0.0.1:9/h"},
    )
    assert refused.status_code == 403
    console.cookies.clear()
    csrf = await sign_in(console, await make_staff("admin"))
    added = await console.post(
        "/console/subscribers",
        data={
            "csrf_token": csrf,
            "name": "crm",
            "url": "http://127.0.0.1:9/hooks",
            "event_types": "case.state_changed",
        },
    )
    assert added.status_code == 200, added.text
    assert "whsec_" in added.text
    listed = await console.get("/console/subscribers")
    assert "crm" in listed.text and "whsec_" not in listed.text


async def test_sessions_expire_when_idle(
    console: httpx.AsyncClient, make_staff: StaffFactory, runtime: Runtime
) -> None:
    await sign_in(console, await make_staff("viewer"))
    async with runtime.sessionmaker() as session:
        for row in await session.scalars(select(StaffSession)):
            row.last_seen_at = (
                row.last_seen_at - runtime.settings.console_idle_timeout - timedelta(seconds=1)
            )
        await session.commit()
    answer = await console.get("/console")
    assert answer.status_code == 303 and answer.headers["location"].startswith("/console/login")


async def test_sign_out_ends_the_session(
    console: httpx.AsyncClient, make_staff: StaffFactory, runtime: Runtime
) -> None:
    csrf = await sign_in(console, await make_staff("viewer"))
    cookie = console.cookies.get("fgw_console")
    answer = await console.post("/console/logout", data={"csrf_token": csrf})
    assert answer.status_code == 303
    assert await rows(runtime, StaffSession) == []
    console.cookies.set("fgw_console", cookie or "", domain="127.0.0.1", path="/console")
    assert (await console.get("/console")).status_code == 303


@pytest.mark.parametrize("next_url", ["https://evil.example/", "//evil.example", "/console/../x"])
async def test_no_open_redirect_after_sign_in(
    console: httpx.AsyncClient, make_staff: StaffFactory, next_url: str
) -> None:
    user = await make_staff("viewer")
    page = await console.get("/console/login")
    answer = await console.post(
        "/console/login",
        data={
            "csrf_token": csrf_of(page.text),
            "username": user,
            "password": PASSWORD,
            "next": next_url,
        },
    )
    assert answer.headers["location"] == "/console"


async def test_remap_preview_before_replaying_a_dead_letter(
    console: httpx.AsyncClient,
    make_staff: StaffFactory,
    runtime: Runtime,
    admin_headers: dict[str, str],
) -> None:
    from tests import samples

    accepted = await console.post(
        "/v1/intake-submissions", json=samples.intake(), headers=admin_headers
    )
    assert accepted.status_code == 202, accepted.text
    message_id = accepted.json()["message_id"]
    async with runtime.sessionmaker() as session:
        dead = Delivery(
            kind="ehr",
            target="example-ehr",
            ordering_key="p",
            inbound_message_id=message_id,
            resource_refs=[],
            status="dead",
            dead_reason="rejected",
        )
        session.add(dead)
        await session.commit()
    user = await make_staff("operator")
    await sign_in(console, user)
    listed = await console.get("/console/dead-letters")
    assert f"/console/dead-letters/{dead.id}/preview" in listed.text
    preview = await console.get(f"/console/dead-letters/{dead.id}/preview")
    assert preview.status_code == 200
    assert "No difference: the current profiles produce what is stored" in preview.text
    assert ("preview", "Delivery", str(dead.id)) in await audit_actions(runtime, f"staff:{user}")
    csrf = csrf_of(preview.text)
    answer = await console.post(f"/console/dead-letters/{dead.id}/remap", data={"csrf_token": csrf})
    assert "notice=remapped" in answer.headers["location"]
    replayed = await rows(runtime, Delivery, Delivery.id == dead.id)
    assert replayed[0].status == "pending"
    missing = await console.get("/console/dead-letters/999999/preview")
    assert missing.status_code == 404


async def test_overview_sparkline_counts_the_last_24_hours(
    console: httpx.AsyncClient, make_staff: StaffFactory, runtime: Runtime
) -> None:
    from gateway.db.types import utcnow

    now = utcnow()
    async with runtime.sessionmaker() as session:
        for hours_ago in (0, 1, 1, 5, 30):  # the last one is outside the window
            session.add(
                Delivery(
                    kind="ehr",
                    target="example-ehr",
                    ordering_key="p",
                    resource_refs=[],
                    status="delivered",
                    delivered_at=now - timedelta(hours=hours_ago),
                )
            )
        await session.commit()
    await sign_in(console, await make_staff("viewer"))
    page = await console.get("/console")
    assert "Delivered in the last 24 hours: 4 (at most 2 an hour)" in page.text
    assert page.text.count("<rect ") == 24


async def test_the_overview_refreshing_itself_does_not_keep_the_session_alive(
    console: httpx.AsyncClient, make_staff: StaffFactory, runtime: Runtime
) -> None:
    await sign_in(console, await make_staff("viewer"))
    [before] = await rows(runtime, StaffSession)
    page = await console.get("/console?auto=1")
    assert page.status_code == 200 and 'content="30; url=/console?auto=1"' in page.text
    [after] = await rows(runtime, StaffSession)
    assert after.last_seen_at == before.last_seen_at
    await console.get("/console")
    [used] = await rows(runtime, StaffSession)
    assert used.last_seen_at > before.last_seen_at


async def test_cases_page_by_cursor_without_skipping_equal_times(
    console: httpx.AsyncClient, make_staff: StaffFactory, runtime: Runtime
) -> None:
    from gateway.db.types import utcnow

    opened = utcnow()
    async with runtime.sessionmaker() as session:
        for i in range(60):  # more than a page, all opened at the same instant
            session.add(
                Case(id=f"c{i:03d}", patient_id="p", program="x", state="paid", opened_at=opened)
            )
        await session.commit()
    await sign_in(console, await make_staff("viewer"))
    first = await console.get("/console/cases")
    next_link = re.search(r'href="(/console/cases\?[^"]+)" rel="next"', first.text)
    assert next_link is not None
    second = await console.get(next_link.group(1).replace("&amp;", "&"))
    seen = set(re.findall(r'href="/console/cases/(c\d+)"', first.text)) | set(
        re.findall(r'href="/console/cases/(c\d+)"', second.text)
    )
    assert len(seen) == 60


async def test_signing_in_deletes_abandoned_sessions(
    console: httpx.AsyncClient, make_staff: StaffFactory, runtime: Runtime
) -> None:
    await sign_in(console, await make_staff("viewer"))
    async with runtime.sessionmaker() as session:
        for row in await session.scalars(select(StaffSession)):
            row.last_seen_at = row.last_seen_at - timedelta(days=2)
        await session.commit()
    console.cookies.clear()
    await sign_in(console, await make_staff("viewer"))
    assert len(await rows(runtime, StaffSession)) == 1
