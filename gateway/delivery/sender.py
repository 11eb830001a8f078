"""The interface between the generic outbox machinery and one kind of delivery.

The worker (:mod:`gateway.delivery.worker`) claims rows, leases them, enforces per-target
concurrency, rate and circuit breaking, applies the retry policy, dead-letters, and
records attempts; it does not know what a delivery *is*. A :class:`Sender` per
``deliveries.kind`` does: it lists its targets with their policies and sends one claimed
row, answering with an :data:`Outcome`. EHR deliveries are
:class:`gateway.delivery.ehr_sender.EhrSender`; an ops webhook sender plugs in the same
way::

    class WebhookSender:
        kind = "webhook"
        async def targets(self) -> list[TargetConfig]: ...   # one per subscriber
        async def send(self, delivery: Delivery) -> Outcome: ...  # POST the signed payload
        async def probe(self, target: str) -> bool: return True  # or a HEAD request
        async def aclose(self) -> None: ...

    # gateway.worker.default_senders registers one sender per kind
    {"ehr": EhrSender(...), "webhook": WebhookSender(sessions=runtime.sessionmaker)}

An outcome's ``effects`` run in the transaction that records it, and only if the worker
still holds the row's lease (a row taken over by another worker after a lost lease is
that worker's to finish).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy.ext.asyncio import AsyncSession

from gateway.db.models import Delivery
from mappers.profiles.ehr import CircuitBreakerPolicy, RetryPolicy

#: Database work to do with an outcome, in the same transaction (e.g. store the ids the
#: EHR assigned, record a case event). Flushes at most.
Effect = Callable[[AsyncSession], Awaitable[None]]


@dataclass(frozen=True)
class BatchedRows:
    """Rows an outcome adds to one write shared by the outcomes recorded together: the
    rows of every outcome of a batch with the same ``key`` are written by one call of
    ``write`` (the first one's), in one statement (e.g. the EHR's ids of a batch of
    deliveries to one target)."""

    key: Hashable
    rows: Sequence[Any]
    write: Callable[[AsyncSession, list[Any]], Awaitable[None]]


#: What an outcome writes with it: a callable, or rows of a shared write.
Effects = Effect | BatchedRows


@dataclass(frozen=True)
class TargetConfig:
    """Delivery policy of one target of one kind.

    Attributes:
        kind: the ``deliveries.kind`` (``ehr``, ``webhook``).
        name: the target name (``deliveries.target``).
        retry: backoff, attempts and age limits of its deliveries.
        circuit: when to pause the target and how to probe it.
        max_concurrent: deliveries in flight to it at once, across all workers.
        uses_token: its deliveries need the shared OAuth token of ``oauth_tokens[name]``
            (claims wait while that token's auth circuit is open).
    """

    kind: str
    name: str
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    circuit: CircuitBreakerPolicy = field(default_factory=CircuitBreakerPolicy)
    max_concurrent: int = 8
    uses_token: bool = False


@dataclass(frozen=True)
class Reached:
    """The resources of an inbound message reached a target: what a case records as
    ``ehr_delivered`` (the worker is given what to do with it: its ``on_reached``)."""

    target: str
    message_id: str
    patient_id: str
    at: datetime


@dataclass(frozen=True)
class Delivered:
    """Sent and accepted. ``reached`` is handed on in the transaction that records the
    outcome, after ``effects``, together with those of the other outcomes written with it
    (in order). ``shadow``: a target in shadow mode compared the delivery with what it
    holds and wrote nothing (the row ends ``shadowed``, not ``delivered``)."""

    status_code: int | None = 200
    effects: Effects | None = None
    reached: Reached | None = None
    shadow: bool = False


@dataclass(frozen=True)
class Failed:
    """A transient failure (transport error, timeout, 408/409/425/429/5xx): retry later,
    at least ``retry_after_s`` from now when the server said so."""

    error: str
    status_code: int | None = None
    retry_after_s: float | None = None
    effects: Effects | None = None


@dataclass(frozen=True)
class Rejected:
    """A permanent failure (4xx): dead-letter now, with the peer's OperationOutcome."""

    error: str
    status_code: int | None = None
    operation_outcome: dict[str, Any] | None = None
    reason: str = "rejected"
    effects: Effects | None = None


@dataclass(frozen=True)
class NeedsReview:
    """A person must decide (e.g. several patients in the EHR match ours): ``review``
    says what was found (ids only)."""

    error: str
    review: dict[str, Any]
    status_code: int | None = None
    operation_outcome: dict[str, Any] | None = None
    effects: Effects | None = None


@dataclass(frozen=True)
class Wait:
    """Nothing was sent (no token, target misconfigured or gone): put the row back for
    ``wait_s`` seconds without spending an attempt."""

    error: str
    wait_s: float
    reason: str = "waiting"
    effects: Effects | None = None


Outcome = Delivered | Failed | Rejected | NeedsReview | Wait


class Sender(Protocol):
    """Sends the deliveries of one kind."""

    kind: str

    async def targets(self) -> list[TargetConfig]:
        """The enabled targets of this kind and their policies."""
        ...

    async def send(self, delivery: Delivery) -> Outcome:
        """Send one claimed delivery. Never raises for a peer's failure: every failure
        is an outcome (an unexpected exception counts as a transient failure)."""
        ...

    async def probe(self, target: str) -> bool:
        """Is ``target`` answering again? (circuit breaker probe; True: try a delivery)."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...
