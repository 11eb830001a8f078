"""Partner webhooks and EHR notifications read their secrets like token requests do: the
environment, else ``GATEWAY_SECRET_ENV_FILE`` (they read only the environment before)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from gateway.runtime import Runtime
from gateway.secrets import SecretStore
from tests.support import notifications as n
from tests.support.events_env import (
    NOTIFY_ENV,
    NOTIFY_SECRET,
    PHARMACY_ENV,
    PHARMACY_SECRET,
    TARGET,
    pharmacy_webhook,
    standard_webhook_headers,
)


@pytest.fixture
def secrets_in_file(runtime: Runtime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PHARMACY_ENV)
    monkeypatch.delenv(NOTIFY_ENV)
    env_file = tmp_path / "secrets.env"
    env_file.write_text(f"{PHARMACY_ENV}={PHARMACY_SECRET}\n{NOTIFY_ENV}={NOTIFY_SECRET}\n")
    runtime.secrets = SecretStore(env_file)


async def test_a_partner_webhook_verifies_with_the_secret_from_the_file(
    client: httpx.AsyncClient, secrets_in_file: None
) -> None:
    body = pharmacy_webhook("pt-1", "shipped")
    r = await client.post(
        "/v1/partners/sunrise-pharmacy/webhooks",
        content=body,
        headers=standard_webhook_headers(body),
    )
    assert r.status_code == 202, r.text


async def test_a_notification_verifies_with_the_secret_from_the_file(
    client: httpx.AsyncClient, secrets_in_file: None
) -> None:
    r = await client.post(
        f"/v1/ehr/{TARGET}/notifications",
        json=n.bundle("handshake"),
        headers={"Authorization": f"Bearer {NOTIFY_SECRET}"},
    )
    assert r.status_code == 200, r.text
    r = await client.post(
        f"/v1/ehr/{TARGET}/notifications",
        json=n.bundle("handshake"),
        headers={"Authorization": "Bearer wrong"},
    )
    assert r.status_code == 401, r.text


async def test_without_the_secret_anywhere_the_partner_is_not_configured(
    client: httpx.AsyncClient, runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(PHARMACY_ENV)
    runtime.secrets = SecretStore(None)
    body = pharmacy_webhook("pt-1", "shipped")
    r = await client.post(
        "/v1/partners/sunrise-pharmacy/webhooks",
        content=body,
        headers=standard_webhook_headers(body),
    )
    assert r.status_code == 503, r.text
