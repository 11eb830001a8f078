"""The one queue on a real database (SQLite and PostgreSQL), through the inbox table: the
claim (due order, leases, scope), lease owners, the heartbeat, requeue with and without
spending the attempt; and the worker loops' scheduling, on an injected clock."""

from __future__ import annotations

import asyncio
import doctest
from datetime import timedelta

import pytest
from sqlalchemy import select

from gateway.clock import FastForwardClock, ManualClock
from gateway.db.models import InboundMessage, MessageStatus
from gateway.db.types import utcnow
from gateway.db.uow import unit_of_work
from gateway.events.service import INBOX
from gateway.inbox.repository import new_message
from gateway.queue import policy
from gateway.queue import repository as queue
from gateway.queue.loop import Heartbeat, PollingLoop, Worker
from gateway.runtime import Runtime

LEASE = timedelta(seconds=30)


async def _store(runtime: Runtime, *, channel: str = "events", ago_s: float = 0) -> str:
    message = new_message(
        channel=channel,
        sender="ehr",
        external_id=f"e-{utcnow().timestamp()}",
        body=b"{}",
        content_type="application/json",
    )
    message.available_at = utcnow() - timedelta(seconds=ago_s)
    async with unit_of_work(runtime.write_session) as session:
        session.add(message)
    return message.id


async def _claim(
    runtime: Runtime, worker: str, now_offset_s: float = 0, limit: int = 10
) -> list[str]:
    now = utcnow() + timedelta(seconds=now_offset_s)
    async with unit_of_work(runtime.write_session) as session:
        rows = await queue.claim(
            session, INBOX, limit=limit, worker=worker, locked_until=now + LEASE, now=now
        )
    return [r.id for r in rows]


async def _row(runtime: Runtime, message_id: str) -> InboundMessage:
    async with runtime.sessionmaker() as session:
        row = await session.scalar(select(InboundMessage).where(InboundMessage.id == message_id))
    assert row is not None
    return row


async def test_a_claim_takes_due_rows_oldest_first_and_leases_them_to_its_owner(
    runtime: Runtime,
) -> None:
    newer = await _store(runtime, ago_s=1)
    older = await _store(runtime, ago_s=5)
    later = await _store(runtime, ago_s=-60)  # due in a minute
    other_channel = await _store(runtime, channel="intake", ago_s=9)  # not an event: out of scope

    assert await _claim(runtime, "w1") == [older, newer]
    assert await _claim(runtime, "w2") == []  # leased to w1
    row = await _row(runtime, older)
    assert (row.locked_by, row.attempts, row.status) == ("w1", 1, MessageStatus.RECEIVED)
    assert await _claim(runtime, "w2", now_offset_s=LEASE.total_seconds() + 61) == [
        older,
        newer,
        later,
    ]  # w1's leases ran out (a crash): taken over, the attempt counted again
    assert (await _row(runtime, older)).attempts == 2
    assert (await _row(runtime, other_channel)).locked_by is None


async def test_only_the_owner_finishes_and_a_requeue_may_give_the_attempt_back(
    runtime: Runtime,
) -> None:
    message_id = await _store(runtime)
    [claimed] = await _claim(runtime, "w1")
    now = utcnow()
    async with unit_of_work(runtime.write_session) as session:
        assert not await queue.finish(
            session, INBOX, row_id=claimed, worker="w2", values={"status": "processed"}
        )
        assert await queue.owned(session, INBOX, ids=[claimed], worker="w1") == {claimed}
        assert await queue.requeue(
            session, INBOX, row_id=claimed, worker="w1", available_at=now, spent=False
        )
    row = await _row(runtime, message_id)
    assert (row.locked_by, row.locked_until, row.attempts) == (None, None, 0)
    [again] = await _claim(runtime, "w2")
    async with unit_of_work(runtime.write_session) as session:
        assert await queue.requeue(
            session,
            INBOX,
            row_id=again,
            worker="w2",
            available_at=now + timedelta(minutes=5),
            spent=True,
        )
    assert (await _row(runtime, message_id)).attempts == 1
    assert await _claim(runtime, "w3") == []  # not due before the retry time
    assert await _claim(runtime, "w3", now_offset_s=301) == [message_id]


async def test_claim_one_takes_a_message_by_id_only_when_it_is_free(runtime: Runtime) -> None:
    message_id = await _store(runtime)
    now = utcnow()
    async with unit_of_work(runtime.write_session) as session:
        first = await queue.claim_one(
            session, INBOX, row_id=message_id, worker="w1", locked_until=now + LEASE, now=now
        )
        second = await queue.claim_one(
            session, INBOX, row_id=message_id, worker="w2", locked_until=now + LEASE, now=now
        )
    assert first is not None and first.locked_by == "w1"
    assert second is None


async def test_the_heartbeat_extends_only_its_own_leases(runtime: Runtime) -> None:
    clock = ManualClock()
    mine = await _store(runtime, ago_s=2)
    theirs = await _store(runtime, ago_s=1)
    now = clock.now()
    async with unit_of_work(runtime.write_session) as session:
        await queue.claim(session, INBOX, limit=1, worker="w1", locked_until=now + LEASE, now=now)
        await queue.claim(session, INBOX, limit=1, worker="w2", locked_until=now + LEASE, now=now)
    heartbeat = Heartbeat(
        INBOX, sessions=runtime.write_session, worker="w1", lease=LEASE, clock=clock
    )
    heartbeat.hold(mine)
    heartbeat.hold(theirs)  # not its lease: left alone
    clock.advance(20)
    assert await heartbeat.beat() == 1
    assert (await _row(runtime, mine)).locked_until == clock.now() + LEASE
    assert (await _row(runtime, theirs)).locked_until == now + LEASE
    heartbeat.drop(mine)
    heartbeat.drop(theirs)
    assert await heartbeat.beat() == 0


async def test_a_polling_loop_runs_again_at_once_while_it_finds_work_and_survives_errors() -> None:
    done: list[int] = []
    work = [3, 2, 0, "boom", 1, 0]

    async def step() -> int:
        item = work.pop(0) if work else 0
        if item == "boom":
            raise RuntimeError("a step failed")
        done.append(int(item))
        if not work:
            stop.set()
        return int(item)

    stop = asyncio.Event()
    loop = PollingLoop("test", step, poll=timedelta(milliseconds=1))
    worker = Worker([loop], name="w")
    await asyncio.wait_for(worker.run(stop), 5)
    assert done == [3, 2, 0, 1, 0]  # the failing step was logged and the loop went on
    assert worker.loop("test") is loop
    with pytest.raises(KeyError):
        worker.loop("missing")


async def test_a_woken_loop_does_not_wait_for_its_poll_interval() -> None:
    calls = 0
    stop = asyncio.Event()

    async def step() -> int:
        nonlocal calls
        calls += 1
        if calls == 2:
            stop.set()
        return 0

    loop = PollingLoop("test", step, poll=timedelta(hours=1))
    task = asyncio.create_task(loop.run(stop))
    await asyncio.sleep(0)
    loop.wake()
    await asyncio.wait_for(task, 5)  # an hour's poll, ended by the wake-up
    assert calls == 2


async def test_test_clocks_move_only_forward() -> None:
    frozen = ManualClock()
    start, tick = frozen.now(), frozen.monotonic()
    await frozen.sleep(90)
    assert frozen.now() - start == timedelta(seconds=90)
    assert frozen.monotonic() - tick == 90
    fast = FastForwardClock()
    before = utcnow()
    fast.advance(timedelta(hours=1))
    assert fast.now() - before >= timedelta(hours=1)
    with pytest.raises(ValueError):
        fast.advance(-1)


def test_the_retry_policy_worked_examples_hold() -> None:
    failures, tried = doctest.testmod(policy)
    assert tried >= 1 and failures == 0
