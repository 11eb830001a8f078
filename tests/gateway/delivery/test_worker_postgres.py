"""Worker behaviour that needs several workers on one PostgreSQL: limits enforced
across workers, claims that never overlap, a crashed worker's lease."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import httpx
import pytest

from gateway.db.engine import make_engine, make_sessionmaker
from gateway.db.models import Delivery
from gateway.db.types import utcnow
from gateway.delivery import repository as repo
from gateway.runtime import Runtime
from tests.gateway.delivery.conftest import TargetFactory
from tests.support.delivery import (
    all_delivered,
    running_workers,
    submit_intakes,
    wait_until,
)
from tests.support.fake_ehr import FakeEhr, RunningEhr, run_fake_ehr_async

pytestmark = pytest.mark.postgres

EHR = tuple[FakeEhr, RunningEhr]


@pytest.fixture
def database_url(postgres_url: str) -> str:
    """PostgreSQL only."""
    return postgres_url


async def test_concurrency_limit_holds_across_workers(
    runtime: Runtime,
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    use_target: TargetFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tests.support.gateway_env import SECRET_ENV

    monkeypatch.setenv(SECRET_ENV, "s3cret")
    fake = FakeEhr(response_delay_s=0.15)
    async with run_fake_ehr_async(fake) as running:
        use_target(running, max_concurrent_requests=3)
        await submit_intakes(client, admin_headers, 15)
        async with running_workers(runtime, 3, concurrency=4):
            assert await wait_until(lambda: all_delivered(runtime, 15), timeout_s=20)

    assert fake.max_concurrent_requests == 3


async def test_rate_limit_holds_across_workers(
    runtime: Runtime,
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    ehr: EHR,
    use_target: TargetFactory,
) -> None:
    fake, running = ehr
    use_target(running, rate_limit_per_s=10, rate_burst=1)
    await submit_intakes(client, admin_headers, 12)
    async with running_workers(runtime, 3, concurrency=4):
        assert await wait_until(lambda: all_delivered(runtime, 12), timeout_s=20)

    times = sorted(fake.request_times)
    assert len(times) == 12
    # 12 requests at 10/s with a bucket of 1 take 1.1 s when sent; arrival at the EHR
    # jitters by connection set-up, so allow 0.2 s. Unlimited, they take ~50 ms.
    assert times[-1] - times[0] >= 0.9
    in_any_half_second = max(sum(1 for t in times if start <= t < start + 0.5) for start in times)
    assert in_any_half_second <= 8  # 1 (burst) + 5 (rate) + 2 (arrival jitter)


async def test_concurrent_claims_never_take_the_same_row(runtime: Runtime) -> None:
    """Eight claimers on separate connection pools race for 300 rows."""
    now = utcnow()
    async with runtime.sessionmaker() as session:
        await repo.ensure_target_states(session, [("ehr", "t")])
        session.add_all(
            Delivery(
                kind="ehr",
                target="t",
                ordering_key=f"p{i}",
                resource_refs=[f"Patient/p{i}"],
                available_at=now,
                created_at=now,
            )
            for i in range(300)
        )
        await session.commit()
    engines = [make_engine(runtime.settings.database_url, pool_size=2) for _ in range(8)]
    total = [0]

    async def claimer(index: int) -> list[int]:
        makers = make_sessionmaker(engines[index])
        got: list[int] = []
        deadline = asyncio.get_running_loop().time() + 20
        while total[0] < 300 and asyncio.get_running_loop().time() < deadline:
            async with makers() as session:
                rows = await repo.claim_for_target(
                    session,
                    kind="ehr",
                    target="t",
                    limit=7,
                    max_in_flight=10_000,
                    worker=f"w{index}",
                    lease=timedelta(minutes=5),
                    now=utcnow(),
                )
                await session.commit()
            got.extend(r.id for r in rows)
            total[0] += len(rows)
            await asyncio.sleep(0)
        return got

    try:
        claimed = await asyncio.gather(*(claimer(i) for i in range(8)))
    finally:
        for engine in engines:
            await engine.dispose()

    every = [i for ids in claimed for i in ids]
    assert len(every) == len(set(every)) == 300
    assert sum(1 for ids in claimed if ids) >= 2  # the work was shared


async def test_a_crashed_workers_rows_are_claimed_again_after_the_lease(
    runtime: Runtime,
) -> None:
    now = utcnow()
    async with runtime.sessionmaker() as session:
        await repo.ensure_target_states(session, [("ehr", "t")])
        session.add(
            Delivery(
                kind="ehr",
                target="t",
                ordering_key="p",
                resource_refs=["Patient/p"],
                available_at=now,
                created_at=now,
            )
        )
        await session.commit()
    lease = timedelta(seconds=1)

    async def claim(worker: str, at: object) -> list[Delivery]:
        async with runtime.sessionmaker() as session:
            rows = await repo.claim_for_target(
                session,
                kind="ehr",
                target="t",
                limit=5,
                max_in_flight=5,
                worker=worker,
                lease=lease,
                now=at,  # type: ignore[arg-type]
            )
            await session.commit()
            return rows

    [first] = await claim("crashed", now)
    assert await claim("other", now + timedelta(milliseconds=500)) == []  # leased
    [again] = await claim("other", now + timedelta(seconds=2))  # lease expired
    async with runtime.sessionmaker() as session:
        late = await repo.finish(
            session, delivery_id=first.id, worker="crashed", values={"status": "delivered"}
        )
        await session.commit()

    assert again.id == first.id
    assert (first.attempts, again.attempts) == (1, 2)
    assert late is False  # the crashed worker's late outcome does not win
