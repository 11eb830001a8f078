"""Queries on ``oauth_tokens`` (one shared token per target) and ``signing_keys``."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.db.bulk import insert_ignore
from gateway.db.models import OAuthToken, SigningKey


def _dialect(session: AsyncSession) -> str:
    return session.bind.dialect.name if session.bind is not None else "sqlite"


async def get_token_row(session: AsyncSession, target: str) -> OAuthToken | None:
    """The target's token row as committed now (not a cached identity), or None."""
    return await session.scalar(
        select(OAuthToken)
        .where(OAuthToken.target == target)
        .execution_options(populate_existing=True)
    )


async def lock_token_row(session: AsyncSession, target: str) -> OAuthToken:
    """The target's token row, created if missing, locked ``FOR UPDATE`` on PostgreSQL.

    Another process that asks for the same row waits until this transaction ends and then
    reads what it wrote: that is the single-flight refresh across processes. SQLite has no
    row locks (and runs one worker): the row is read without one.
    """
    await session.execute(
        insert_ignore(session, OAuthToken)
        .values(target=target, failures=0)
        .on_conflict_do_nothing()
    )
    stmt = (
        select(OAuthToken)
        .where(OAuthToken.target == target)
        .execution_options(populate_existing=True)
    )
    if _dialect(session) == "postgresql":
        stmt = stmt.with_for_update()
    row = await session.scalar(stmt)
    assert row is not None  # inserted above
    return row


async def take_refresh_lease(
    session: AsyncSession, target: str, *, now: datetime, until: datetime
) -> bool:
    """Become the one process that refreshes ``target``'s token (SQLite: no row locks).

    True when this caller holds the lease until ``until``; False while another holds an
    unexpired one. Whether the row's token is usable is for the caller to check after.
    """
    await session.execute(
        insert_ignore(session, OAuthToken)
        .values(target=target, failures=0)
        .on_conflict_do_nothing()
    )
    result = await session.execute(
        update(OAuthToken)
        .where(
            OAuthToken.target == target,
            or_(OAuthToken.refresh_lease_until.is_(None), OAuthToken.refresh_lease_until < now),
        )
        .values(refresh_lease_until=until)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


async def clear_token(session: AsyncSession, *, target: str, token: str) -> bool:
    """Forget ``token`` if it is still the target's current one; True if it was."""
    result = await session.execute(
        update(OAuthToken)
        .where(OAuthToken.target == target, OAuthToken.access_token == token)
        .values(access_token=None, expires_at=None)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


async def token_rows(session: AsyncSession, targets: Sequence[str]) -> dict[str, OAuthToken]:
    """Token rows of ``targets`` by target name (targets without one are missing)."""
    if not targets:
        return {}
    rows = await session.scalars(
        select(OAuthToken)
        .where(OAuthToken.target.in_(list(targets)))
        .execution_options(populate_existing=True)
    )
    return {r.target: r for r in rows}


# --------------------------------------------------------------------------- signing keys


def _active(now: datetime) -> Any:
    return and_(
        SigningKey.activates_at <= now,
        or_(SigningKey.retired_at.is_(None), SigningKey.retired_at > now),
    )


async def active_key(session: AsyncSession, *, alg: str, now: datetime) -> SigningKey | None:
    """The key that signs ``alg`` assertions at ``now`` (the latest activated one)."""
    return await session.scalar(
        select(SigningKey)
        .where(SigningKey.alg == alg, _active(now))
        .order_by(SigningKey.activates_at.desc())
        .limit(1)
    )


async def pending_keys(session: AsyncSession, *, alg: str, now: datetime) -> list[SigningKey]:
    """Keys of ``alg`` published but not signing yet (a rotation in progress)."""
    rows = await session.scalars(
        select(SigningKey).where(SigningKey.alg == alg, SigningKey.activates_at > now)
    )
    return list(rows)


async def published_keys(session: AsyncSession, *, now: datetime) -> list[SigningKey]:
    """Keys in the JWKS at ``now``: created, and not past ``published_until``."""
    rows = await session.scalars(
        select(SigningKey)
        .where(
            SigningKey.created_at <= now,
            or_(SigningKey.published_until.is_(None), SigningKey.published_until > now),
        )
        .order_by(SigningKey.alg, SigningKey.activates_at)
    )
    return list(rows)


async def all_keys(session: AsyncSession) -> list[SigningKey]:
    """Every stored key, oldest first."""
    rows = await session.scalars(select(SigningKey).order_by(SigningKey.created_at))
    return list(rows)


async def delete_unpublished(session: AsyncSession, *, now: datetime) -> list[str]:
    """Delete keys whose ``published_until`` has passed; returns their kids."""
    rows = list(
        await session.scalars(
            select(SigningKey).where(
                SigningKey.published_until.is_not(None), SigningKey.published_until <= now
            )
        )
    )
    for row in rows:
        await session.delete(row)
    return [r.kid for r in rows]
