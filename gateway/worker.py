"""The worker process, wired: the loops it runs and what each is given.

``fhir-gateway worker`` (and the embedded worker of ``serve``) runs one
:class:`~gateway.queue.loop.Worker` with three loops over the one queue, each with its own
concurrency:

* ``deliveries`` (:class:`~gateway.delivery.worker.DeliveryWorker`): outbox rows to EHRs
  and ops webhook subscribers, ``concurrency`` in flight;
* ``inbox`` (:class:`~gateway.events.apply.EventApplier`): stored clinical events not
  applied yet (left by a process that does not apply them, a crash, an id-only
  notification, a retry), ``inbox_concurrency`` prepared at once; it reads id-only focus
  resources with the same EHR clients as the deliveries (shared tokens, rate limits);
* ``workflow-timers`` (:class:`~gateway.workflow.timers.WorkflowTimers`): held events
  whose reorder window closed, SLA flags;
* ``cutover-guards`` (:class:`~gateway.ops.guards.GuardLoop`): EHR target mode changes
  into the audit trail, cutover guard thresholds (issue 16);
* ``audit-seal`` (:class:`~gateway.audit.chain.Sealer`): chains new audit entries into the
  hash chain every ``GATEWAY_AUDIT_SEAL_INTERVAL``, and hourly deletes those past
  ``GATEWAY_AUDIT_RETENTION``.

Changes of cases, whoever makes them, go to the subscribers' outbox
(:func:`gateway.subscribers.service.enqueue_case_webhook`): that is wired here and in the
channels, not in the workflow.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import timedelta

import httpx
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.audit.chain import Sealer
from gateway.clock import Clock
from gateway.delivery.ehr_sender import EhrSender
from gateway.delivery.recording import OnReached
from gateway.delivery.sender import Reached, Sender
from gateway.delivery.shadow import ShadowRetention
from gateway.delivery.webhooks import WebhookSender
from gateway.delivery.worker import DeliveryWorker
from gateway.egress import egress_transport
from gateway.ehr.client import TokenProvider
from gateway.ehr.factory import EhrClients
from gateway.events.apply import EventApplier
from gateway.oauth.keys import KeyCipher
from gateway.oauth.tokens import token_provider_for
from gateway.ops.guards import GuardLoop
from gateway.queue.loop import PollingLoop, Worker
from gateway.runtime import Runtime
from gateway.subscribers.service import enqueue_case_webhook, enqueue_exception_webhook
from gateway.workflow.batch import record_events
from gateway.workflow.service import EventInput
from gateway.workflow.timers import WorkflowTimers
from mappers.profiles.ehr import EhrTargetProfile


def worker_name(runtime: Runtime) -> str:
    """A lease owner name unique to one worker: host, pid and a random suffix."""
    return f"{runtime.instance_id}:{uuid.uuid4().hex[:8]}"


def ehr_clients(
    runtime: Runtime,
    *,
    http: httpx.AsyncClient | None = None,
    token_transport: httpx.AsyncBaseTransport | None = None,
    concurrency: int = 4,
    clock: Clock | None = None,
) -> EhrClients:
    """The worker's EHR clients (one connection pool; tokens and rate limits shared
    through the database), with token providers from the runtime's database, profiles
    root, signing-key cipher (``GATEWAY_KEY_ENCRYPTION_KEY``), secrets and clock."""
    clock = clock or runtime.clock
    secret = runtime.settings.key_encryption_key
    cipher = KeyCipher(secret.get_secret_value() if secret is not None else None)
    root = runtime.profiles.current.root

    def tokens(target: EhrTargetProfile) -> TokenProvider:
        return token_provider_for(
            target,
            sessionmaker=runtime.sessionmaker,
            profiles_root=root,
            cipher=cipher,
            secrets=runtime.secrets,
            transport=token_transport or egress_transport(runtime.egress),
            clock=clock,
        )

    return EhrClients(
        runtime.sessionmaker,
        tokens=tokens,
        http=http,
        max_connections=max(10, concurrency * 2),
        clock=clock,
        transport=lambda limits: egress_transport(runtime.egress, limits=limits),
    )


def default_senders(
    runtime: Runtime,
    *,
    clients: EhrClients,
    http: httpx.AsyncClient | None = None,
    clock: Clock | None = None,
) -> dict[str, Sender]:
    """The senders of every delivery kind, by kind: ``ehr`` (FHIR to EHR targets) and
    ``webhook`` (signed case state changes to ops subscribers)."""
    clock = clock or runtime.clock
    return {
        "ehr": EhrSender(
            profiles=lambda: runtime.profiles.current,
            sessions=runtime.read_session,
            clients=clients,
            provenance_tag_system=runtime.systems.provenance,
            clock=clock,
        ),
        "webhook": WebhookSender(
            sessions=runtime.read_session,
            http=http,
            clock=clock,
            transport=egress_transport(runtime.egress) if http is None else None,
        ),
    }


def record_reached(runtime: Runtime) -> OnReached:
    """Records ``ehr_delivered`` in the cases of messages that reached an EHR (with the
    current workflow; nothing without one), changes going to the subscribers: the
    delivery worker's ``on_reached``."""

    async def record(session: AsyncSession, reached: Sequence[Reached]) -> None:
        workflow = runtime.profiles.current.workflow
        if workflow is None:
            return
        events = [
            EventInput(
                source="gateway",
                event_id=f"ehr_delivered:{r.target}:{r.message_id}",
                type="ehr_delivered",
                detail=None,
                occurred_at=r.at,
                patient_id=r.patient_id,
                message_id=r.message_id,
                principal="gateway",
            )
            for r in reached
        ]
        await record_events(session, workflow, events, notify=enqueue_case_webhook)

    return record


def delivery_worker(
    runtime: Runtime,
    *,
    concurrency: int = 4,
    senders: Mapping[str, Sender] | None = None,
    clients: EhrClients | None = None,
    http: httpx.AsyncClient | None = None,
    token_transport: httpx.AsyncBaseTransport | None = None,
    clock: Clock | None = None,
    name: str | None = None,
) -> DeliveryWorker:
    """The deliveries loop, wired from ``runtime``.

    Args:
        runtime: the wired runtime.
        concurrency: deliveries in flight at once in this process.
        senders: the sender per kind (default: :func:`default_senders`).
        clients: the EHR clients (default: new ones, :func:`ehr_clients`).
        http: shared HTTP client for FHIR requests and webhooks (one connection pool).
        token_transport: httpx transport for token requests (tests).
        clock: the clock (default: the runtime's).
        name: the lease owner name (default: :func:`worker_name`).
    """
    clock = clock or runtime.clock
    if senders is None:
        clients = clients or ehr_clients(
            runtime,
            http=http,
            token_transport=token_transport,
            concurrency=concurrency,
            clock=clock,
        )
        senders = default_senders(runtime, clients=clients, http=http, clock=clock)
    settings = runtime.settings
    return DeliveryWorker(
        sessions=runtime.write_session,
        senders=senders,
        name=name or worker_name(runtime),
        concurrency=concurrency,
        lease=settings.worker_lease,
        poll=settings.worker_poll_interval,
        clock=clock,
        on_reached=record_reached(runtime),
    )


def build_worker(
    runtime: Runtime,
    *,
    concurrency: int = 4,
    inbox_concurrency: int = 4,
    http: httpx.AsyncClient | None = None,
    token_transport: httpx.AsyncBaseTransport | None = None,
    clock: Clock | None = None,
    name: str | None = None,
) -> Worker:
    """The worker process's loops (see the module docstring), wired from ``runtime``.

    Args:
        runtime: the wired runtime.
        concurrency: deliveries in flight at once (``fhir-gateway worker --concurrency``).
        inbox_concurrency: stored events prepared at once (EHR reads).
        http: shared HTTP client for FHIR requests and webhooks.
        token_transport: httpx transport for token requests (tests).
        clock: the clock of every loop (default: the runtime's).
        name: the lease owner name of every loop (default: :func:`worker_name`).
    """
    clock = clock or runtime.clock
    name = name or worker_name(runtime)
    poll = runtime.settings.worker_poll_interval
    clients = ehr_clients(
        runtime, http=http, token_transport=token_transport, concurrency=concurrency, clock=clock
    )
    deliveries = delivery_worker(
        runtime, concurrency=concurrency, clients=clients, http=http, clock=clock, name=name
    )
    applier = EventApplier.for_runtime(
        runtime, clients=clients, worker=name, clock=clock, concurrency=inbox_concurrency
    )
    timers = WorkflowTimers(
        sessions=runtime.write_session,
        workflow=lambda: runtime.profiles.current.workflow,
        notify=enqueue_case_webhook,
        clock=clock,
        escalate=enqueue_exception_webhook,
    )
    guard_loop = GuardLoop(
        sessions=runtime.write_session, profiles=lambda: runtime.profiles.current, now=clock.now
    )
    sealer = Sealer(
        sessions=runtime.write_session, retention=runtime.settings.audit_retention, now=clock.now
    )
    shadows = ShadowRetention(
        sessions=runtime.write_session, retention=runtime.settings.shadow_retention, now=clock.now
    )
    return Worker(
        [
            deliveries,
            PollingLoop("inbox", applier.step, poll=poll),
            PollingLoop("workflow-timers", timers.step, poll=poll),
            PollingLoop("audit-seal", sealer.step, poll=runtime.settings.audit_seal_interval),
            PollingLoop("cutover-guards", guard_loop.step, poll=poll),
            PollingLoop("shadow-retention", shadows.step, poll=timedelta(hours=1)),
        ],
        name=name,
    )
