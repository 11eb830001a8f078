"""Cutover guards (issue 16): thresholds in the target profile, a breach alerts the ops
subscribers, shows on /v1/ops/targets, pauses the target when asked, and clears."""

from __future__ import annotations

import shutil
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
import yaml
from sqlalchemy import select

from gateway.db.models import Delivery, ExceptionRecord, Subscriber, TargetState
from gateway.db.types import utcnow
from gateway.ops.guards import evaluate, open_breaches
from gateway.runtime import Runtime
from gateway.subscribers.service import new_secret
from tests.conftest import BUNDLED_PROFILES_DIR


@pytest.fixture
def profiles_dir(tmp_path: Path) -> Path:
    dest = tmp_path / "profiles"
    shutil.copytree(BUNDLED_PROFILES_DIR, dest)
    (dest / "ehr" / "guarded.yaml").write_text(
        yaml.safe_dump(
            {
                "kind": "ehr",
                "name": "guarded",
                "base_url": "http://127.0.0.1:9/fhir",
                "auth": {"method": "none"},
                "guards": {
                    "window_s": 3600,
                    "max_exceptions_per_hour": 2,
                    "min_intake_acceptance_pct": 80,
                    "min_samples": 4,
                    "auto_pause": True,
                },
            }
        )
    )
    return dest


async def add_exceptions(runtime: Runtime, n: int, *, channel: str = "intake") -> None:
    async with runtime.sessionmaker() as session:
        for _ in range(n):
            session.add(
                ExceptionRecord(kind="rejected_input", channel=channel, problems=[], payload=b"{}")
            )
        session.add(
            Subscriber(
                name="ops",
                url="http://127.0.0.1:9/h",
                secret=new_secret(),
                event_types=["target.*"],
            )
        )
        await session.commit()


async def webhook_types(runtime: Runtime) -> list[str]:
    async with runtime.sessionmaker() as session:
        rows = (await session.scalars(select(Delivery).where(Delivery.kind == "webhook"))).all()
    return [r.payload["type"] for r in rows if r.payload]


async def test_a_breach_alerts_shows_and_pauses_then_clears(
    runtime: Runtime, client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    await add_exceptions(runtime, 4)  # 4 per hour > 2; acceptance 0 of 4 < 80%
    now = utcnow()
    async with runtime.write_session() as session:
        assert await evaluate(session, runtime.profiles.current, now=now) == 2
        await session.commit()
    assert sorted(await webhook_types(runtime)) == ["target.guard_breached"] * 2
    async with runtime.sessionmaker() as session:
        breaches = await open_breaches(session)
        state = await session.get(TargetState, ("ehr", "guarded"))
    assert {(b.guard, b.value) for b in breaches} == {
        ("exceptions_per_hour", 4.0),
        ("intake_acceptance", 0.0),
    }
    assert state is not None and state.throttled_until is not None and state.throttled_until > now

    targets = (await client.get("/v1/ops/targets", headers=admin_headers)).json()
    [guarded] = [t for t in targets if t["name"] == "guarded"]
    assert {b["guard"] for b in guarded["guard_breaches"]} == {
        "exceptions_per_hour",
        "intake_acceptance",
    }
    assert all(b["paused"] for b in guarded["guard_breaches"])

    async with runtime.write_session() as session:  # evaluated again: no second alert
        assert await evaluate(session, runtime.profiles.current, now=now) == 0
        await session.commit()

    later = now + timedelta(hours=2)  # the exceptions left the window
    async with runtime.write_session() as session:
        changes = await evaluate(session, runtime.profiles.current, now=later)
        await session.commit()
    assert changes == 1  # exceptions per hour back to 0; acceptance has too few samples now
    assert (await webhook_types(runtime)).count("target.guard_cleared") == 1


async def test_below_the_minimum_samples_a_rate_is_not_judged(runtime: Runtime) -> None:
    await add_exceptions(runtime, 1, channel="hl7")  # 1 per hour, no intakes at all
    async with runtime.write_session() as session:
        assert await evaluate(session, runtime.profiles.current, now=utcnow()) == 0
        await session.commit()


async def test_the_worker_loop_evaluates_once_per_check_interval(runtime: Runtime) -> None:
    from gateway.ops.guards import GuardLoop

    await add_exceptions(runtime, 4)
    now = utcnow()
    loop = GuardLoop(
        sessions=runtime.write_session, profiles=lambda: runtime.profiles.current, now=lambda: now
    )
    await loop.step()
    await loop.step()  # within check_every_s: no second evaluation, no second alert
    assert sorted(await webhook_types(runtime)) == ["target.guard_breached"] * 2


async def test_a_guard_pause_never_shortens_a_longer_hold(runtime: Runtime) -> None:
    """An EHR's 429 ``Retry-After`` held the target for an hour: the guard's pause (two
    check intervals) leaves that hold as it is."""
    now = utcnow()
    an_hour = now + timedelta(hours=1)
    async with runtime.write_session() as session:
        session.add(TargetState(kind="ehr", target="guarded", throttled_until=an_hour))
        await session.commit()
    await add_exceptions(runtime, 4)
    async with runtime.write_session() as session:
        assert await evaluate(session, runtime.profiles.current, now=now) == 2
        await session.commit()
    async with runtime.sessionmaker() as session:
        state = await session.get(TargetState, ("ehr", "guarded"))
    assert state is not None and state.throttled_until == an_hour
