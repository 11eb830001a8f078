"""Helpers for API tests: credentials, signed Stripe requests, reading the database."""

from __future__ import annotations

import json
import time
from typing import Any, TypeVar

from sqlalchemy import func, select

from gateway.cli import stripe_signature_header
from gateway.runtime import Runtime

#: The Stripe signing secret of the test settings (``tests/conftest.py``).
STRIPE_SECRET = "whsec_test_secret_for_tests_only"
#: The identifier system of intake/checkout patient ids under the default base.
EXTERNAL_ID_SYSTEM = "https://fhir-gateway.example.org/sid/external-patient-id"

T = TypeVar("T")


def bearer(key: str) -> dict[str, str]:
    """``Authorization: Bearer <key>``."""
    return {"Authorization": f"Bearer {key}"}


def signed_stripe(
    event: dict[str, Any], *, secret: str = STRIPE_SECRET, timestamp: int | None = None
) -> tuple[bytes, dict[str, str]]:
    """The raw body and headers of a Stripe webhook delivery of ``event``."""
    payload = json.dumps(event).encode()
    t = int(time.time()) if timestamp is None else timestamp
    return payload, {
        "Stripe-Signature": stripe_signature_header(secret, payload, timestamp=t),
        "Content-Type": "application/json",
    }


async def count(runtime: Runtime, model: type, *where: Any) -> int:
    """Rows of ``model`` matching ``where``."""
    async with runtime.sessionmaker() as session:
        return int(await session.scalar(select(func.count()).select_from(model).where(*where)) or 0)


async def rows(runtime: Runtime, model: type[T], *where: Any, order_by: Any = None) -> list[T]:
    """Rows of ``model`` matching ``where`` (detached; read-only use)."""
    async with runtime.sessionmaker() as session:
        stmt = select(model).where(*where)
        if order_by is not None:
            stmt = stmt.order_by(order_by)
        return list((await session.scalars(stmt)).all())


async def table_counts(runtime: Runtime) -> dict[str, int]:
    """``table name -> row count`` for every table of the gateway that holds data
    (``audit_chain``, the hash chain's one head row, is left out)."""
    from gateway.db.models import Base

    out = {}
    async with runtime.sessionmaker() as session:
        for table in Base.metadata.sorted_tables:
            if table.name == "audit_chain":
                continue
            out[table.name] = int(
                await session.scalar(select(func.count()).select_from(table)) or 0
            )
    return out
