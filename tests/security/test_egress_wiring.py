"""Egress control where the gateway sends: subscriber registration, webhooks at connect
time, EHR targets' URLs in the profiles, and notification focus references that would
make the gateway read what the EHR's topic does not name."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from sqlalchemy import delete, select

from gateway.clock import FastForwardClock
from gateway.db.models import Delivery, ExceptionRecord, OAuthToken
from gateway.egress import EgressPolicy
from gateway.ehr.errors import EhrRejectedError, EhrUnavailableError
from gateway.runtime import Runtime
from gateway.settings import Settings
from gateway.worker import delivery_worker, ehr_clients
from mappers.profiles import ProfileLoadError
from testkit.ehr import LocalEhr, RunningEhr, run_ehr_async
from tests.support import notifications as n
from tests.support.delivery import drain
from tests.support.ehr import EhrFactory
from tests.support.events_env import (
    BEACON_ENV,
    BEACON_SECRET,
    NOTIFY_ENV,
    NOTIFY_SECRET,
    PHARMACY_ENV,
    PHARMACY_SECRET,
    TARGET,
    Subscriber,
    events_profiles,
    new_patient,
    run_subscriber,
)
from tests.support.inbox import apply_pending

FAST = {"base_delay_s": 0.01, "max_delay_s": 0.02, "max_attempts": 3, "max_age_s": 60}


@pytest.fixture
def secrets_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for env, value in (
        (NOTIFY_ENV, NOTIFY_SECRET),
        (PHARMACY_ENV, PHARMACY_SECRET),
        (BEACON_ENV, BEACON_SECRET),
        ("TEST_EHR_CLIENT_SECRET", "s3cret"),
    ):
        monkeypatch.setenv(env, value)


# --------------------------------------------------------------------------- subscribers


@pytest.mark.parametrize(
    "url",
    [
        "https://169.254.169.254/latest/meta-data/iam/",
        "https://10.0.0.7/hooks",
        "https://[fd00:ec2::254]/",
        "https://crm:plain-password-123@crm.example.com/hooks",
        "http://crm.example.com/hooks",
    ],
)
async def test_a_subscriber_url_the_policy_refuses_is_not_registered(
    client: httpx.AsyncClient, admin_headers: dict[str, str], url: str
) -> None:
    body = {"name": "crm", "url": url, "event_types": ["*"]}
    r = await client.post("/v1/ops/subscribers", json=body, headers=admin_headers)
    assert r.status_code == 422, r.text
    assert [(e["field"], e["code"]) for e in r.json()["errors"]] == [("url", "egress_refused")]
    assert "plain-password-123" not in r.text
    assert (await client.get("/v1/ops/subscribers", headers=admin_headers)).json() == []


@pytest.fixture
async def subscriber() -> AsyncIterator[tuple[Subscriber, str]]:
    sub = Subscriber(secret="")
    async with run_subscriber(sub) as url:
        yield sub, url


async def test_webhooks_are_checked_again_at_connect_time(
    client: httpx.AsyncClient,
    runtime: Runtime,
    admin_headers: dict[str, str],
    subscriber: tuple[Subscriber, str],
) -> None:
    """A subscriber registered while loopback was allowed (tests) whose address is refused
    by the policy the worker runs with: nothing reaches it; the webhook is dead-lettered
    after its retries."""
    sub, url = subscriber
    body = {"name": "crm", "url": url, "event_types": ["*"], "retry": FAST}
    r = await client.post("/v1/ops/subscribers", json=body, headers=admin_headers)
    assert r.status_code == 201, r.text
    await new_patient(client, admin_headers)  # case.opened
    strict = dataclasses.replace(runtime, egress=EgressPolicy())
    worker = delivery_worker(strict, clock=FastForwardClock())
    try:
        await drain(strict, worker)
    finally:
        await worker.aclose()
    assert sub.attempts == 0
    async with runtime.sessionmaker() as session:
        rows = (await session.scalars(select(Delivery).where(Delivery.kind == "webhook"))).all()
    assert [d.status for d in rows] == ["dead"]


# --------------------------------------------------------------------------- EHR targets


def _with_target(dest: Path, base_url: str) -> Path:
    root = events_profiles(dest, fhir_base=base_url, enabled=True)
    return root


@pytest.mark.parametrize(
    ("base_url", "allowlist", "refused"),
    [
        ("http://10.0.0.1/fhir", [], True),  # http, private
        ("https://10.0.0.1/fhir", [], True),  # private
        ("https://10.0.0.1/fhir", ["10.0.0.0/24"], False),
        ("https://ehr:pw@ehr.example.com/fhir", [], True),  # credentials
        ("https://ehr.example.com/fhir", [], False),
    ],
)
def test_an_enabled_ehr_target_needs_a_url_the_policy_allows(
    tmp_path: Path,
    secrets_env: None,
    database_url: str,
    base_url: str,
    allowlist: list[str],
    refused: bool,
) -> None:
    settings = Settings(
        database_url=database_url,
        profiles_dir=_with_target(tmp_path / "profiles", base_url),
        egress_allow_loopback=False,
        egress_allowlist=allowlist,
        _env_file=None,  # type: ignore[call-arg]
    )
    if not refused:
        Runtime.create(settings)
        return
    with pytest.raises(ProfileLoadError) as err:
        Runtime.create(settings)
    [problem] = err.value.problems
    assert problem.code == "egress_refused"
    assert problem.location.endswith("base_url")
    assert "pw@" not in str(err.value)


async def test_a_reload_with_a_refused_ehr_url_keeps_the_running_profiles(
    tmp_path: Path, secrets_env: None, database_url: str
) -> None:
    root = _with_target(tmp_path / "profiles", "https://ehr.example.com/fhir")
    settings = Settings(
        database_url=database_url,
        profiles_dir=root,
        egress_allow_loopback=False,
        _env_file=None,  # type: ignore[call-arg]
    )
    runtime = Runtime.create(settings)
    try:
        target = root / "ehr" / f"{TARGET}.yaml"
        data = yaml.safe_load(target.read_text())
        data["base_url"] = "https://169.254.169.254/fhir"
        target.write_text(yaml.safe_dump(data))
        with pytest.raises(ProfileLoadError):
            runtime.profiles.reload()
        assert runtime.profiles.current.ehr[TARGET].base_url == "https://ehr.example.com/fhir"
    finally:
        await runtime.close()


# --------------------------------------------------------------------------- focus


@pytest.fixture
async def ehr(make_ehr: EhrFactory) -> AsyncIterator[tuple[LocalEhr, RunningEhr]]:
    fake = make_ehr(client_id="gateway", client_secret="s3cret")
    async with run_ehr_async(fake) as running:
        yield fake, running


@pytest.fixture
def profiles_dir(tmp_path: Path, secrets_env: None, ehr: tuple[LocalEhr, RunningEhr]) -> Path:
    return events_profiles(
        tmp_path / "profiles", fhir_base=ehr[1].fhir_base, token_url=ehr[1].token_url
    )


@pytest.mark.parametrize(
    ("focus", "code"),
    [
        ("Task/..", "invalid_focus"),
        ("Task/.", "invalid_focus"),
        ("Task/a b", "invalid_focus"),
        ("Patient/e-1", "focus_type_not_allowed"),  # the test EHR's table maps no Patient
        ("Organization/o-1", "focus_type_not_allowed"),
    ],
)
async def test_a_focus_that_is_not_a_mapped_type_and_id_is_not_read(
    client: httpx.AsyncClient,
    runtime: Runtime,
    ehr: tuple[LocalEhr, RunningEhr],
    focus: str,
    code: str,
) -> None:
    fake, _ = ehr
    body: dict[str, Any] = n.bundle(
        "event-notification", events_since=1, events=[(1, None, focus)], id_only=[focus]
    )
    r = await client.post(
        f"/v1/ehr/{TARGET}/notifications",
        json=body,
        headers={"Authorization": f"Bearer {NOTIFY_SECRET}"},
    )
    assert r.status_code == 202, r.text
    clients = ehr_clients(runtime)
    try:
        await apply_pending(runtime, clients=clients)
    finally:
        await clients.aclose()
    async with runtime.sessionmaker() as session:
        [kept] = (await session.scalars(select(ExceptionRecord))).all()
    assert kept.problems[0]["code"] == code
    assert [req for req in fake.requests if req[0] == "GET"] == []


async def test_ehr_and_token_requests_are_checked_at_connect_time(
    runtime: Runtime, ehr: tuple[LocalEhr, RunningEhr]
) -> None:
    """The EHR clients of a process whose policy refuses loopback: neither the token
    endpoint nor the FHIR endpoint is reached."""
    fake, _ = ehr
    strict = dataclasses.replace(runtime, egress=EgressPolicy())
    clients = ehr_clients(strict)
    try:
        target = strict.profiles.current.ehr[TARGET]
        with pytest.raises(EhrUnavailableError):
            await clients.client_for(target).read("Task", "t-1")
    finally:
        await clients.aclose()
    assert fake.requests == [] and fake.token_requests == []
    # control: the same read with the tests' policy reaches the EHR (the token endpoint's
    # backoff after the refused attempt cleared first)
    async with runtime.sessionmaker() as session:
        await session.execute(delete(OAuthToken))
        await session.commit()
    clients = ehr_clients(runtime)
    try:
        with pytest.raises(EhrRejectedError):  # 404: no such Task, but it was asked
            await clients.client_for(target).read("Task", "t-1")
    finally:
        await clients.aclose()
    assert len(fake.token_requests) == 1
