"""Re-mapping a stored message after a profile change: the diff first, then --apply."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from gateway.cli import app
from gateway.db.models import Delivery, FhirResource, ProfileMapping
from gateway.errors import NotFoundError, UnprocessableError
from gateway.ingest.remap import remap_message
from gateway.ingest.storage import IngestContext
from gateway.runtime import Runtime
from gateway.settings import Settings
from tests import samples
from tests.conftest import ApiKeyFactory
from tests.support.profiles import GLP1_V1, copy_profiles, edit_yaml


@pytest.fixture
def profiles_dir(tmp_path: Path) -> Path:
    root = copy_profiles(tmp_path / "profiles")
    # an enabled target on a closed loopback port: deliveries are enqueued, never sent here
    (root / "ehr/test-target.yaml").write_text(
        "kind: ehr\nname: test-target\nbase_url: http://127.0.0.1:9/fhir\n"
        "auth: {method: none}\n"
        "send: [Patient, QuestionnaireResponse, Observation, Flag, Provenance]\n"
    )
    return root


def _change_profile(root: Path) -> None:
    def change(d: dict[str, object]) -> None:
        d["derived"]["observations"][0]["decimals"] = 1  # type: ignore[index]
        d["items"][0]["text"] = "Your weight today?"  # type: ignore[index]

    edit_yaml(root / GLP1_V1, change)


async def _ingest(client: httpx.AsyncClient, make_api_key: ApiKeyFactory) -> str:
    key = await make_api_key("intake:write")
    r = await client.post(
        "/v1/intake-submissions", json=samples.intake(), headers={"Authorization": f"Bearer {key}"}
    )
    assert r.status_code == 202, r.text
    return str(r.json()["message_id"])


async def test_diff_then_apply(
    client: httpx.AsyncClient, runtime: Runtime, make_api_key: ApiKeyFactory, profiles_dir: Path
) -> None:
    message_id = await _ingest(client, make_api_key)
    _change_profile(profiles_dir)
    runtime.profiles.reload()

    async with runtime.sessionmaker() as session:
        result = await remap_message(
            session, IngestContext.of(runtime), message_id, apply=False, actor="test"
        )
        await session.commit()
    assert not result.applied
    assert any(
        line.startswith("Observation/") and line.endswith(".valueQuantity.value: -96.16 +96.2")
        for line in result.diff
    ), result.diff
    assert any(
        line.endswith('.item[0].text: -"What is your current weight?" +"Your weight today?"')
        for line in result.diff
    )
    async with runtime.sessionmaker() as session:
        assert await session.scalar(select(func.count()).select_from(Delivery)) == 1
        versions = await session.scalar(select(func.max(FhirResource.version_id)))
    assert versions == 1  # nothing stored without apply

    async with runtime.sessionmaker() as session:
        result = await remap_message(
            session, IngestContext.of(runtime), message_id, apply=True, actor="test"
        )
        await session.commit()
    assert result.applied and result.stored is not None
    changed = sorted(r["resourceType"] for r in result.stored["resources"])
    assert changed == ["Observation", "Provenance", "QuestionnaireResponse"]
    source = runtime.profiles.current.source_of("intake/glp1-weight-management/1")
    assert source is not None
    async with runtime.sessionmaker() as session:
        mappings = list(
            await session.scalars(
                select(ProfileMapping).where(ProfileMapping.inbound_message_id == message_id)
            )
        )
        assert [m.action for m in mappings] == ["ingest", "remap"]
        assert mappings[1].profile_hash == source.content_hash != mappings[0].profile_hash
        deliveries = list(await session.scalars(select(Delivery).order_by(Delivery.id)))
        assert len(deliveries) == 2
        assert deliveries[1].resource_refs[0].startswith("Patient/")
        assert deliveries[1].resource_refs[-1].startswith("Provenance/")
        prov = await session.get(
            FhirResource, ("Provenance", deliveries[1].resource_refs[-1].split("/")[1])
        )
        assert prov is not None
        assert prov.resource["activity"]["coding"][0]["code"] == "UPDATE"
        assert prov.resource["policy"][0].endswith(source.content_hash)

    async with runtime.sessionmaker() as session:
        again = await remap_message(
            session, IngestContext.of(runtime), message_id, apply=True, actor="test"
        )
    assert again.diff == [] and not again.applied


async def test_an_unchanged_profile_changes_nothing_and_a_derived_change_only_its_resource(
    client: httpx.AsyncClient, runtime: Runtime, make_api_key: ApiKeyFactory, profiles_dir: Path
) -> None:
    message_id = await _ingest(client, make_api_key)
    async with runtime.sessionmaker() as session:
        result = await remap_message(
            session, IngestContext.of(runtime), message_id, apply=False, actor="t"
        )
    assert result.diff == []  # was QuestionnaireResponse.status: -"completed" +"amended"

    edit_yaml(profiles_dir / GLP1_V1, lambda d: d["derived"]["observations"][0].update(decimals=1))
    runtime.profiles.reload()
    async with runtime.sessionmaker() as session:
        result = await remap_message(
            session, IngestContext.of(runtime), message_id, apply=True, actor="t"
        )
        await session.commit()
    assert result.diff and all(line.startswith("Observation/") for line in result.diff)
    assert result.stored is not None
    changed = sorted(r["resourceType"] for r in result.stored["resources"])
    assert changed == ["Observation", "Provenance"]  # the answers did not change


async def test_checkout_remap_and_errors(
    client: httpx.AsyncClient, runtime: Runtime, make_api_key: ApiKeyFactory
) -> None:
    key = await make_api_key("checkout:write")
    r = await client.post(
        "/v1/checkouts",
        json=samples.canonical_checkout(),
        headers={"Authorization": f"Bearer {key}"},
    )
    message_id = r.json()["message_id"]
    async with runtime.sessionmaker() as session:
        result = await remap_message(
            session, IngestContext.of(runtime), message_id, apply=False, actor="t"
        )
        assert result.diff == []
        with pytest.raises(NotFoundError):
            await remap_message(
                session, IngestContext.of(runtime), "no-such-message", apply=False, actor="t"
            )


async def test_a_message_that_no_longer_maps(
    client: httpx.AsyncClient, runtime: Runtime, make_api_key: ApiKeyFactory, profiles_dir: Path
) -> None:
    message_id = await _ingest(client, make_api_key)
    edit_yaml(profiles_dir / GLP1_V1, lambda d: d.update(status="retired"))
    runtime.profiles.reload()
    async with runtime.sessionmaker() as session:
        with pytest.raises(UnprocessableError) as exc:
            await remap_message(
                session, IngestContext.of(runtime), message_id, apply=True, actor="t"
            )
    assert [p.code for p in exc.value.problems] == ["retired_form"]


async def test_cli_remap(
    client: httpx.AsyncClient,
    runtime: Runtime,
    make_api_key: ApiKeyFactory,
    profiles_dir: Path,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    message_id = await _ingest(client, make_api_key)
    _change_profile(profiles_dir)
    monkeypatch.setenv("GATEWAY_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("GATEWAY_PROFILES_DIR", str(profiles_dir))
    runner = CliRunner()
    shown = await asyncio.to_thread(runner.invoke, app, ["profiles", "remap", message_id])
    assert shown.exit_code == 0, shown.output
    assert "-96.16 +96.2" in shown.output
    assert "run again with --apply" in shown.output
    applied = await asyncio.to_thread(
        runner.invoke, app, ["profiles", "remap", message_id, "--apply"]
    )
    assert applied.exit_code == 0, applied.output
    assert "applied: 3 resource version(s) stored, 1 delivery(ies) enqueued" in applied.output
    missing = await asyncio.to_thread(runner.invoke, app, ["profiles", "remap", "nope"])
    assert missing.exit_code == 1
