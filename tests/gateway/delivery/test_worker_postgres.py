"""Worker behaviour that needs several workers on one PostgreSQL: limits enforced
across workers, claims that never overlap, a crashed worker's lease."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

import httpx
import pytest
from sqlalchemy import select, text

from gateway.clock import SYSTEM_CLOCK
from gateway.db.engine import make_engine, make_sessionmaker
from gateway.db.models import Delivery
from gateway.db.types import utcnow
from gateway.delivery import repository as repo
from gateway.delivery.circuit import ensure_target_states
from gateway.queue import repository as queue
from gateway.runtime import Runtime
from testkit.ehr import LocalEhr, RunningEhr, run_ehr_async
from tests.gateway.delivery.conftest import TargetFactory
from tests.support.delivery import (
    all_delivered,
    deliveries,
    running_workers,
    submit_intakes,
    wait_until,
)
from tests.support.ehr import EhrFactory

pytestmark = pytest.mark.postgres

EHR = tuple[LocalEhr, RunningEhr]


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
    make_ehr: EhrFactory,
) -> None:
    from tests.support.gateway_env import SECRET_ENV

    monkeypatch.setenv(SECRET_ENV, "s3cret")
    fake = make_ehr(response_delay_s=0.15)
    async with run_ehr_async(fake) as running:
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
    # The real clock: the EHR measures requests per real second (a test clock's sleep
    # would skip the limiter's waits instead of waiting them out).
    async with running_workers(runtime, 3, concurrency=4, clock=SYSTEM_CLOCK):
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
        await ensure_target_states(session, [("ehr", "t")])
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
        await ensure_target_states(session, [("ehr", "t")])
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
        late = await queue.finish(
            session, repo.OUTBOX, row_id=first.id, worker="crashed", values={"status": "delivered"}
        )
        await session.commit()

    assert again.id == first.id
    assert (first.attempts, again.attempts) == (1, 2)
    assert late is False  # the crashed worker's late outcome does not win


async def test_concurrent_claims_keep_each_cases_order_and_the_in_flight_cap(
    runtime: Runtime,
) -> None:
    """Four claimers on separate pools, each finishing what it claimed: a case's row is
    never claimed while an earlier row of the case is unfinished, rows of a case are
    claimed in id order (a crashed worker's expired rows first), and the target never has
    more rows in flight than its cap."""
    now = utcnow()
    cases = [f"p{i}" for i in range(12)]
    async with runtime.sessionmaker() as session:
        await ensure_target_states(session, [("ehr", "t")])
        for round_ in range(3):
            for key in cases:
                crashed = round_ == 0 and key in cases[:4]  # leases ran out long ago
                session.add(
                    Delivery(
                        kind="ehr",
                        target="t",
                        ordering_key=key,
                        resource_refs=[f"Patient/{key}"],
                        available_at=now - timedelta(minutes=10),
                        created_at=now,
                        status="in_flight" if crashed else "pending",
                        locked_by="crashed" if crashed else None,
                        locked_until=now - timedelta(minutes=5) if crashed else None,
                    )
                )
            await session.flush()
        await session.commit()
        rows = (await session.execute(select(Delivery.id, Delivery.ordering_key))).all()
    remaining = {key: sorted(i for i, k in rows if k == key) for key in cases}
    total = sum(len(ids) for ids in remaining.values())
    active: dict[str, int] = {}
    cap = 5
    in_flight = [0]
    peak = [0]
    engines = [make_engine(runtime.settings.database_url, pool_size=2) for _ in range(4)]

    async def claimer(index: int) -> int:
        makers = make_sessionmaker(engines[index])
        done = 0
        deadline = asyncio.get_running_loop().time() + 20
        while any(remaining.values()) and asyncio.get_running_loop().time() < deadline:
            async with makers() as session:
                claimed = await repo.claim_for_target(
                    session,
                    kind="ehr",
                    target="t",
                    limit=3,
                    max_in_flight=cap,
                    worker=f"w{index}",
                    lease=timedelta(minutes=5),
                    now=utcnow(),
                )
                await session.commit()
            for row in claimed:
                key = row.ordering_key
                assert key not in active, f"{row.id} claimed while {active.get(key)} unfinished"
                assert row.id == remaining[key][0], f"{key}: {row.id} before {remaining[key]}"
                active[key] = row.id
            in_flight[0] += len(claimed)
            peak[0] = max(peak[0], in_flight[0])
            await asyncio.sleep(0)  # let the others claim while these are "sent"
            for row in claimed:
                async with makers() as session:
                    # Forget the row before its outcome is committed: a claim that sees it
                    # finished then never finds it still active here.
                    del active[row.ordering_key]
                    remaining[row.ordering_key].remove(row.id)
                    in_flight[0] -= 1
                    assert await queue.finish(
                        session,
                        repo.OUTBOX,
                        row_id=row.id,
                        worker=f"w{index}",
                        values={"status": "delivered"},
                    )
                    await session.commit()
                done += 1
            await asyncio.sleep(0)
        return done

    try:
        counts = await asyncio.gather(*(claimer(i) for i in range(4)))
    finally:
        for engine in engines:
            await engine.dispose()

    assert sum(counts) == total
    assert not any(remaining.values())
    assert peak[0] <= cap


async def test_no_transaction_is_held_open_while_a_request_is_at_the_ehr(
    runtime: Runtime,
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    ehr: EHR,
    use_target: TargetFactory,
) -> None:
    """While the EHR holds the requests of a claim round, no session of the workers has
    a transaction open since before the request (the round committed its claims and
    target locks before sending; short transactions of other rounds may come and go)."""
    fake, running = ehr
    use_target(running)
    await submit_intakes(client, admin_headers, 3)
    fake.hang_fhir(3, 1.5)

    async def open_transactions() -> int:
        async with runtime.engine.connect() as conn:
            return int(
                await conn.scalar(
                    text(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = "
                        "current_database() AND pid <> pg_backend_pid() "
                        "AND state LIKE 'idle in transaction%' "
                        "AND clock_timestamp() - xact_start > interval '900 milliseconds'"
                    )
                )
                or 0
            )

    async def hanging() -> bool:  # a request has been at the EHR for 1 s
        return fake.in_flight >= 1 and time.monotonic() - fake.request_times[-1] >= 1.0

    async with running_workers(runtime, 2, concurrency=4):
        assert await wait_until(hanging, timeout_s=10, interval_s=0.01)
        assert await open_transactions() == 0
        assert await wait_until(lambda: all_delivered(runtime, 3), timeout_s=20)


async def test_outcome_written_on_a_new_connection_after_the_server_dropped_the_pool(
    runtime: Runtime,
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    use_target: TargetFactory,
    monkeypatch: pytest.MonkeyPatch,
    postgres_url: str,
    make_ehr: EhrFactory,
) -> None:
    """PostgreSQL restarts (or fails over) while a delivery is at the EHR: the pool's
    connections are dead, and without pre-ping the outcome's write is the first to find out.
    It is written on a new connection, not lost until the lease (60 s) sends it again."""
    import psycopg

    from gateway.worker import delivery_worker
    from tests.conftest import PG_URL
    from tests.support.gateway_env import SECRET_ENV

    monkeypatch.setenv(SECRET_ENV, "s3cret")
    assert not runtime.settings.database_pool_pre_ping
    fake = make_ehr(response_delay_s=0.5)
    async with run_ehr_async(fake) as running:
        use_target(running)
        await submit_intakes(client, admin_headers, 1)
        worker = delivery_worker(runtime, concurrency=1)
        try:
            round_ = asyncio.create_task(worker.run_once())
            assert await wait_until(lambda: _in_flight(fake), timeout_s=10)
            dbname = postgres_url.rsplit("/", 1)[1]
            with psycopg.connect(PG_URL, autocommit=True) as admin:
                dropped = admin.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = %s AND pid <> pg_backend_pid()",
                    (dbname,),
                ).fetchone()
            assert dropped is not None and dropped[0] >= 1  # the pool held connections
            assert await round_ == 1
        finally:
            await worker.aclose()

    [row] = await deliveries(runtime)
    assert (row.status, row.attempts, row.locked_by) == ("delivered", 1, None)
    assert len(fake.requests) == 1


async def _in_flight(fake: LocalEhr) -> bool:
    return fake.in_flight > 0
