"""The console in a real browser: headless Chromium (Debian's ``chromium`` package) driven
by Playwright, against the gateway served by uvicorn on a loopback port.

Each scenario is what a person does: signs in with the keyboard, sees a dead letter
appear and replays it, assigns and resolves an exception with a reason, overrides a
stuck case, pauses a target, signs out; a viewer cannot act and a forged form without
a CSRF token is refused. The tests write a 1280x800 screenshot of each page (to
``docs/console/``, linked from docs/CONSOLE.md, with
``GATEWAY_TEST_SCREENSHOTS=docs/console``; else to a temporary folder).

Without Chromium the tests skip with the reason, except under ``CI=true`` where a
skipped browser test fails the run (tests/conftest.py). ``GATEWAY_TEST_CHROMIUM`` names
another Chromium binary.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import uvicorn
from playwright.async_api import Browser, Page, Route, async_playwright, expect

from gateway.app import create_app
from gateway.db.models import Case, Delivery, ExceptionRecord, TargetState
from gateway.runtime import Runtime
from gateway.settings import Settings
from tests.conftest import IN_CI, ApiKeyFactory
from tests.console.conftest import PASSWORD, StaffFactory, seed
from tests.support.api import rows

pytestmark = pytest.mark.browser

# The 1280x800 screenshots of the pages: into a temporary folder, so a test run leaves
# the checkout as it was; GATEWAY_TEST_SCREENSHOTS=docs/console refreshes the ones
# docs/CONSOLE.md shows.
SHOTS = Path(
    os.environ.get("GATEWAY_TEST_SCREENSHOTS")
    or Path(tempfile.gettempdir()) / "fhir-gateway-console-screenshots"
).resolve()
VIEWPORT = {"width": 1280, "height": 800}


def chromium_path() -> str | None:
    """The Chromium binary: ``GATEWAY_TEST_CHROMIUM``, Debian's, or ``chromium`` on PATH."""
    for candidate in (
        os.environ.get("GATEWAY_TEST_CHROMIUM"),
        "/usr/lib/chromium/chromium",
        shutil.which("chromium"),
        shutil.which("chromium-browser"),
    ):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


@pytest.fixture
def database_url(sqlite_template: Path, tmp_path: Path) -> str:
    """SQLite only: the browser drives the pages, the database tests are elsewhere."""
    path = tmp_path / "gateway.db"
    shutil.copyfile(sqlite_template, path)
    return f"sqlite+aiosqlite:///{path}"


@pytest.fixture
async def base_url(settings: Settings, runtime: Runtime) -> AsyncIterator[str]:
    """The gateway served by uvicorn on a free loopback port (no worker)."""
    app = create_app(settings, runtime=runtime, run_worker=False)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
        sock.close()


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """Headless Chromium."""
    path = chromium_path()
    if path is None:
        reason = "Chromium not found (apt-get install chromium, or set GATEWAY_TEST_CHROMIUM)"
        if IN_CI:
            pytest.fail(f"CI=true but {reason}")
        pytest.skip(reason)
    async with async_playwright() as pw:
        launched = await pw.chromium.launch(executable_path=path, headless=True)
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
async def page(browser: Browser, base_url: str) -> AsyncIterator[Page]:
    """A fresh browser context at 1280x800 in New York time, that can reach only the
    gateway (anything else is aborted, as on a hospital network without internet)."""
    context = await browser.new_context(
        base_url=base_url, viewport=VIEWPORT, timezone_id="America/New_York", locale="en-US"
    )
    context.set_default_timeout(10_000)
    gateway_host = urlsplit(base_url).netloc

    async def only_the_gateway(route: Route) -> None:
        if urlsplit(route.request.url).netloc == gateway_host:
            await route.continue_()
        else:
            await route.abort("internetdisconnected")

    await context.route("**/*", only_the_gateway)
    opened = await context.new_page()
    try:
        yield opened
    finally:
        await context.close()


async def shot(page: Page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(SHOTS / f"{name}.png"))


async def sign_in(page: Page, username: str) -> None:
    """Sign in with the keyboard only: the username field has focus, Tab, Enter."""
    await page.goto("/console")
    await expect(page.get_by_role("heading", name="Sign in to the ops console")).to_be_visible()
    await expect(page.get_by_label("Username")).to_be_focused()
    await page.keyboard.type(username)
    await page.keyboard.press("Tab")
    await page.keyboard.type(PASSWORD)
    await page.keyboard.press("Enter")
    await expect(page.get_by_role("heading", name="Overview", exact=True)).to_be_visible()


async def delivered_over_a_day(runtime: Runtime) -> None:
    """Deliveries delivered over the last 24 hours (the overview's sparkline)."""
    from datetime import timedelta

    from gateway.db.types import utcnow

    now = utcnow()
    async with runtime.sessionmaker() as session:
        for hours_ago in range(24):
            for n in range((hours_ago * 7) % 11 + 1):
                session.add(
                    Delivery(
                        kind="ehr",
                        target="example-ehr",
                        ordering_key=f"p{hours_ago}-{n}",
                        resource_refs=[],
                        status="delivered",
                        delivered_at=now - timedelta(hours=hours_ago, minutes=n),
                    )
                )
        await session.commit()


async def test_sign_in_see_the_overview_and_sign_out(
    page: Page, make_staff: StaffFactory, runtime: Runtime
) -> None:
    await seed(runtime)
    await delivered_over_a_day(runtime)
    user = await make_staff("operator")
    await page.goto("/console/login")
    await shot(page, "sign-in")
    await sign_in(page, user)
    assert page.url.endswith("/console")
    await expect(page.get_by_role("row", name="example-ehr")).to_contain_text("1")  # dead letter
    await expect(
        page.get_by_role("img", name="Deliveries per hour over the last 24 hours")
    ).to_be_visible()
    await expect(page.get_by_role("link", name="case-1")).to_be_visible()  # past its SLA
    # times in the viewer's zone, the ISO instant in the tooltip
    when = page.locator("time").first
    assert (await when.get_attribute("title") or "").endswith("+00:00")
    await expect(when).not_to_contain_text("UTC")  # console.js ran (deferred)
    await shot(page, "overview")
    await page.get_by_role("button", name="Sign out").click()
    await expect(page.get_by_role("status")).to_have_text("You are signed out.")
    await page.goto("/console/exceptions")
    await expect(page.get_by_role("heading", name="Sign in to the ops console")).to_be_visible()


async def test_a_dead_letter_appears_and_is_replayed(
    page: Page, make_staff: StaffFactory, runtime: Runtime
) -> None:
    await sign_in(page, await make_staff("operator"))
    await page.get_by_role("link", name="Dead letters").click()
    await expect(page.get_by_text("No dead letters.")).to_be_visible()
    seeded = await seed(runtime)  # the EHR refused a delivery: 422 with an OperationOutcome
    await page.reload()
    card = page.get_by_role("article", name=f"Delivery {seeded.delivery_id} to example-ehr")
    await expect(card).to_contain_text("Patient.identifier: a system is required")
    await expect(card).to_contain_text("Patient.identifier[0].system")
    await shot(page, "dead-letters")
    # the profile was fixed: replay it
    await card.get_by_role("button", name=f"Replay delivery {seeded.delivery_id}").click()
    await expect(page.get_by_role("status")).to_have_text("Back in the delivery queue.")
    await expect(page.get_by_text("No dead letters.")).to_be_visible()
    [delivery] = await rows(runtime, Delivery)
    assert (delivery.status, delivery.replay_count) == ("pending", 1)


@pytest.fixture
def profiles_dir(tmp_path: Path) -> Path:
    """A copy of the bundled profiles that a test may fix on disk."""
    from gateway.settings import BUNDLED_PROFILES_DIR

    dest = tmp_path / "profiles"
    shutil.copytree(BUNDLED_PROFILES_DIR, dest)
    return dest


async def test_replay_after_fixing_the_profile_with_the_diff_first(
    page: Page,
    make_staff: StaffFactory,
    make_api_key: ApiKeyFactory,
    runtime: Runtime,
    profiles_dir: Path,
) -> None:
    from tests import samples

    accepted = await page.request.post(
        "/v1/intake-submissions",
        data=samples.intake(),
        headers={"Authorization": f"Bearer {await make_api_key('intake:write')}"},
    )
    assert accepted.status == 202
    message_id = (await accepted.json())["message_id"]
    async with runtime.sessionmaker() as session:  # the EHR refused the Observation
        dead = Delivery(
            kind="ehr",
            target="example-ehr",
            ordering_key="p",
            inbound_message_id=message_id,
            resource_refs=[],
            status="dead",
            dead_reason="rejected",
            last_status_code=422,
            operation_outcome={
                "resourceType": "OperationOutcome",
                "issue": [
                    {
                        "severity": "error",
                        "code": "code-invalid",
                        "details": {
                            "text": "LOINC 29463-7 display must be 'Body weight (measured)'"
                        },
                        "expression": ["Observation.code.coding[0].display"],
                    }
                ],
            },
        )
        session.add(dead)
        await session.commit()
    # the informatics team fixes the profile and reloads
    profile = profiles_dir / "intake" / "glp1-weight-management-v1.yaml"
    profile.write_text(
        profile.read_text().replace("display: Body weight}", "display: Body weight (measured)}")
    )
    runtime.profiles.reload()
    await sign_in(page, await make_staff("operator"))
    await page.get_by_role("link", name="Dead letters").click()
    await page.get_by_role(
        "link", name=f"Preview the re-map of delivery {dead.id} with the current profiles"
    ).click()
    await expect(page.locator("pre.diff")).to_contain_text("Body weight (measured)")
    await shot(page, "remap-preview")
    await page.get_by_role("button", name="Store the re-mapped versions and replay").click()
    await expect(page.get_by_role("status")).to_have_text(
        "Re-mapped with the current profiles and back in the delivery queue."
    )
    [replayed] = await rows(runtime, Delivery, Delivery.id == dead.id)
    assert replayed.status == "pending"


async def test_assign_an_exception_and_resolve_it_with_a_reason(
    page: Page, make_staff: StaffFactory, runtime: Runtime
) -> None:
    seeded = await seed(runtime)
    user = await make_staff("operator")
    await sign_in(page, user)
    await page.get_by_role("link", name="Exceptions").click()
    await page.get_by_label(f"Select exception {seeded.exception_id}").check()
    await page.get_by_role("button", name="Assign to me").click()
    await expect(page.get_by_role("status")).to_have_text("Assigned.")
    row = page.get_by_role("row", name=str(seeded.exception_id))
    await expect(row).to_contain_text(user)
    await shot(page, "exceptions")
    await row.get_by_role("link", name=str(seeded.exception_id), exact=True).click()
    await page.get_by_label("Reason (required; no patient data)").fill("duplicate of a fixed event")
    await page.get_by_role("button", name="Resolve").click()
    await expect(page.get_by_role("status")).to_have_text("Resolved.")
    await shot(page, "exception")
    [exception] = await rows(runtime, ExceptionRecord)
    assert (exception.status, exception.assigned_to, exception.note) == (
        "resolved",
        user,
        "duplicate of a fixed event",
    )


async def test_override_a_stuck_case(
    page: Page, make_staff: StaffFactory, runtime: Runtime
) -> None:
    seeded = await seed(runtime)
    await sign_in(page, await make_staff("operator"))
    await page.get_by_role("link", name=seeded.case_id).click()  # from "past their SLA"
    await expect(page.locator("#case-state")).to_have_text("awaiting_review")
    await page.get_by_label("New state").select_option("in_review")
    await page.get_by_label("Reason (required; kept in the case history; no patient data)").fill(
        "reviewer took it by phone"
    )
    await page.get_by_role("button", name="Override").click()
    await expect(page.get_by_role("status")).to_have_text("The case state was overridden.")
    await expect(page.locator("#case-state")).to_have_text("in_review")
    await expect(page.get_by_text("Reason: reviewer took it by phone")).to_be_visible()
    await shot(page, "case")
    [case] = await rows(runtime, Case)
    assert case.state == "in_review"


async def test_pause_a_target(page: Page, make_staff: StaffFactory, runtime: Runtime) -> None:
    await seed(runtime)
    await sign_in(page, await make_staff("operator"))
    await page.get_by_role("link", name="Targets").click()
    await page.get_by_label("Reason").fill("EHR maintenance until 02:00")
    await page.get_by_role("button", name="Pause example-ehr").click()
    await expect(page.get_by_role("status")).to_contain_text("The target is paused")
    await expect(page.get_by_role("button", name="Resume example-ehr")).to_be_visible()
    await shot(page, "targets")
    [state] = await rows(runtime, TargetState)
    assert state.pause_reason == "EHR maintenance until 02:00"


async def test_a_viewer_cannot_act(page: Page, make_staff: StaffFactory, runtime: Runtime) -> None:
    seeded = await seed(runtime)
    await sign_in(page, await make_staff("viewer"))
    await page.get_by_role("link", name="Exceptions").click()
    await expect(page.get_by_role("row", name=str(seeded.exception_id))).to_be_visible()
    await expect(page.get_by_role("button", name="Resolve")).to_have_count(0)
    await page.goto(f"/console/cases/{seeded.case_id}")
    await expect(page.get_by_role("button", name="Override")).to_have_count(0)
    # a post made by hand, with the viewer's own CSRF token, is refused for the role
    token = await page.locator('input[name="csrf_token"]').first.input_value()
    answer = await page.request.post(
        "/console/exceptions/act",
        form={
            "csrf_token": token,
            "ids": str(seeded.exception_id),
            "action": "resolve",
            "reason": "x",
        },
        max_redirects=0,
    )
    assert answer.status == 403
    [exception] = await rows(runtime, ExceptionRecord)
    assert exception.status == "open"


async def test_a_forged_form_without_a_csrf_token_is_refused(
    page: Page, make_staff: StaffFactory, runtime: Runtime
) -> None:
    seeded = await seed(runtime)
    await sign_in(page, await make_staff("operator"))
    # a page that posts to the console with the user's cookie but without the token
    await page.evaluate(
        """id => {
            const f = document.createElement("form");
            f.method = "post"; f.action = "/console/exceptions/act";
            for (const [k, v] of [["ids", id], ["action", "resolve"], ["reason", "forged"]]) {
                const i = document.createElement("input"); i.type = "hidden";
                i.name = k; i.value = v; f.appendChild(i);
            }
            document.body.appendChild(f); f.submit();
        }""",
        str(seeded.exception_id),
    )
    await expect(page.get_by_role("heading", name="Refused")).to_be_visible()
    await expect(page.get_by_role("alert")).to_contain_text("CSRF")
    [exception] = await rows(runtime, ExceptionRecord)
    assert exception.status == "open"


async def test_the_other_pages(page: Page, make_staff: StaffFactory, runtime: Runtime) -> None:
    await seed(runtime)
    await sign_in(page, await make_staff("admin"))
    await page.get_by_role("link", name="Cases", exact=True).click()
    await expect(page.get_by_role("link", name="case-1")).to_be_visible()
    await shot(page, "cases")
    await page.get_by_role("link", name="Subscribers").click()
    await page.get_by_label("Name").fill("crm")
    await page.get_by_label("URL (https)").fill("http://127.0.0.1:9/hooks")
    await page.get_by_label("case.state_changed").check()
    await page.get_by_role("button", name="Add subscriber").click()
    await expect(page.locator("#new-secret")).to_contain_text("whsec_")
    await shot(page, "subscribers")
    await page.get_by_role("link", name="Profiles").click()
    await expect(page.get_by_role("heading", name="Active profiles")).to_be_visible()
    await expect(page.get_by_role("row", name="workflow")).to_be_visible()
    await shot(page, "profiles")


async def test_api_docs_render_without_the_internet(page: Page) -> None:
    await page.goto("/docs")
    await expect(page.locator(".swagger-ui .info .title")).to_contain_text("fhir-gateway")
    await expect(page.locator(".opblock-tag").first).to_be_visible()
    await shot(page, "api-docs")
