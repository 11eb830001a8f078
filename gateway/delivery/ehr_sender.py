"""Sending EHR deliveries: stored FHIR resources -> the target's FHIR REST API.

The resources are read from ``fhir_resources`` at send time (the row holds only their
``Type/id``, decided at enqueue: :func:`gateway.delivery.outbox.enqueue_ehr_deliveries`),
turned into the target's REST calls once (:func:`mappers.bundle.rest_calls`, with the
target's overrides), and written with its ``write_strategy``:

* ``transaction``: one transaction Bundle; when the target's ``max_bundle_entries`` is
  smaller, several, sent one after the other, each referring to resources of earlier ones
  by the ids the EHR assigned (read from each transaction-response);
* ``individual``: the same calls sent one at a time, in dependency order: a conditional
  create (``If-None-Exist`` on the business identifier) for a resource the EHR has not
  seen, ``PUT Type/<remote id>`` for one it has; references are rewritten to the ids the
  EHR assigned, resources outside the delivery are looked up by identifier.

Both are idempotent on replay: every create is conditional and every known resource is an
update. The ids the EHR assigned are stored in ``remote_ids`` (also after a partial
success), so a later change goes as an update of the EHR's resource.

Outcomes: see :mod:`gateway.delivery.sender`. A 412 (a conditional create that matches
several resources: duplicate patients in the EHR) is looked up and goes to review with the
matching ids, not into a retry loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from gateway.clock import SYSTEM_CLOCK, Clock
from gateway.db.models import Delivery
from gateway.db.uow import SessionFactory
from gateway.delivery import repository as repo
from gateway.delivery import shadow
from gateway.delivery.sender import (
    BatchedRows,
    Delivered,
    Failed,
    NeedsReview,
    Outcome,
    Reached,
    Rejected,
    TargetConfig,
    Wait,
)
from gateway.ehr.client import EhrClient, outcome_summary, status_error
from gateway.ehr.errors import (
    EhrConfigError,
    EhrError,
    EhrRejectedError,
    EhrUnavailableError,
    TokenUnavailableError,
)
from gateway.ehr.factory import EhrClients
from gateway.inbox.repository import new_exception
from gateway.logging import get_logger
from mappers.bundle import (
    EntryInfo,
    RestCall,
    business_identifier,
    identifier_search,
    if_none_exist,
    local_references,
    parse_transaction_response,
    rest_calls,
    split_for_transaction,
    transaction_bundle,
)
from mappers.ehr_overrides import Transform, target_transform
from mappers.errors import Problem
from mappers.profiles import ProfileSet
from mappers.profiles.ehr import EhrTargetProfile

log = get_logger(__name__)

#: How long a delivery waits when its target is misconfigured or gone (seconds).
CONFIG_WAIT_S = 60.0
#: How long a delivery waits for a token when the error gives no time (seconds).
TOKEN_WAIT_S = 1.0


def _ref(resource: dict[str, Any]) -> str:
    return f"{resource['resourceType']}/{resource['id']}"


@dataclass
class _Progress:
    """What the EHR told us so far in one attempt (kept even when a later step fails)."""

    remote: dict[str, str]
    learned: list[repo.RemoteIdRow] = field(default_factory=list)

    def learn(
        self, resource: dict[str, Any], remote_id: str | None, remote_version: str | None
    ) -> None:
        if not remote_id:
            return
        self.remote[_ref(resource)] = remote_id
        version = (resource.get("meta") or {}).get("versionId")
        self.learned.append(
            repo.RemoteIdRow(
                resource["resourceType"],
                resource["id"],
                remote_id,
                remote_version,
                int(version) if version and str(version).isdigit() else None,
            )
        )


@dataclass(frozen=True)
class _Prepared:
    """What one delivery needs from the database, loaded with its batch."""

    refs: list[str]
    resources: list[dict[str, Any]]
    remote_ids: dict[str, str]
    identifiers: dict[str, tuple[str, str]]


class EhrSender:
    """The :class:`~gateway.delivery.sender.Sender` of ``kind = "ehr"`` deliveries.

    Args:
        profiles: the current profile set (read for each batch: a reload applies to the
            next one).
        sessions: read sessions (stored resources, known EHR ids).
        clients: the process's EHR clients (shared tokens, rate limits).
        provenance_tag_system: the ``meta.tag`` system of our Provenance (its
            conditional create).
        clock: the worker's clock.
    """

    kind = "ehr"

    def __init__(
        self,
        *,
        profiles: Callable[[], ProfileSet],
        sessions: SessionFactory,
        clients: EhrClients,
        provenance_tag_system: str,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._profiles = profiles
        self._sessions = sessions
        self.clients = clients
        self._provenance = provenance_tag_system
        self._clock = clock
        self._prepared: dict[int, _Prepared] = {}
        self._transforms: dict[str, tuple[EhrTargetProfile, ProfileSet, Transform]] = {}

    def _transform(self, target: EhrTargetProfile) -> Transform:
        """The target's overrides as one function, built once per target profile (a
        reload builds it again)."""
        profiles = self._profiles()
        cached = self._transforms.get(target.name)
        if cached is not None and cached[0] is target and cached[1] is profiles:
            return cached[2]
        transform = target_transform(target, profiles.concept_maps)
        self._transforms[target.name] = (target, profiles, transform)
        return transform

    async def targets(self) -> list[TargetConfig]:
        """The enabled EHR targets of the current profiles."""
        return [
            TargetConfig(
                kind=self.kind,
                name=t.name,
                retry=t.retry,
                circuit=t.circuit_breaker,
                max_concurrent=t.max_concurrent_requests,
                uses_token=t.auth.method != "none",
            )
            for t in self._profiles().enabled_targets()
        ]

    async def probe(self, target: str) -> bool:
        """``GET [base]/metadata`` answers: a 2xx, or a 4xx (servers such as the Google
        Cloud Healthcare API want a token for the CapabilityStatement too, and the probe
        sends none); not a transport failure, timeout, 408/425/429 or 5xx."""
        profile = self._profiles().ehr.get(target)
        if profile is None:
            return False
        try:
            await self.clients.client_for(profile).capabilities()
        except EhrRejectedError as exc:
            log.info("delivery.probe_answered", target=target, status_code=exc.status_code)
            return True
        except EhrError as exc:
            log.info("delivery.probe_failed", target=target, status_code=exc.status_code)
            return False
        return True

    async def aclose(self) -> None:
        """Close the EHR clients."""
        await self.clients.aclose()

    async def prepare(self, deliveries: list[Delivery]) -> None:
        """Load what a batch of claimed deliveries needs in one query (two when the
        resources refer to resources outside their deliveries), not two per delivery (the
        worker calls this right after claiming)."""
        profiles = self._profiles()
        by_target: dict[str, list[Delivery]] = {}
        for delivery in deliveries:
            by_target.setdefault(delivery.target, []).append(delivery)
        async with self._sessions() as session:
            for name, batch in by_target.items():
                target = profiles.ehr.get(name)
                if target is None:
                    continue
                loaded = await self._load(session, target, [list(d.resource_refs) for d in batch])
                for delivery, prepared in zip(batch, loaded, strict=True):
                    self._prepared[delivery.id] = prepared

    async def _load(
        self, session: AsyncSession, target: EhrTargetProfile, batches: list[list[str]]
    ) -> list[_Prepared]:
        """Resources, known remote ids and outside identifiers for lists of refs."""
        every = sorted({r for refs in batches for r in refs})
        by_ref, remote_ids = await repo.resources_for_target(
            session, target=target.name, refs=every
        )
        outside: list[set[str]] = []
        for refs in batches:
            referenced: set[str] = set()
            for ref in refs:
                if ref in by_ref:
                    referenced |= local_references(by_ref[ref])
            outside.append(referenced - set(refs))
        all_outside = sorted(set().union(*outside)) if outside else []
        outside_remote, identifiers = await repo.outside_for_target(
            session, target=target.name, refs=all_outside
        )
        remote_ids.update(outside_remote)
        out = []
        for refs, extra in zip(batches, outside, strict=True):
            mine = set(refs) | extra
            out.append(
                _Prepared(
                    refs=refs,
                    resources=[by_ref[r] for r in refs if r in by_ref],
                    remote_ids={k: v for k, v in remote_ids.items() if k in mine},
                    identifiers={k: v for k, v in identifiers.items() if k in extra},
                )
            )
        return out

    # ------------------------------------------------------------------ sending

    async def send(self, delivery: Delivery) -> Outcome:
        """Deliver one claimed row to its EHR (see the module docstring)."""
        prepared = self._prepared.pop(delivery.id, None)
        target = self._profiles().ehr.get(delivery.target)
        if target is None or not target.enabled:
            return Wait("target is not configured or disabled", CONFIG_WAIT_S, "target")
        refs = list(delivery.resource_refs)
        if not refs:
            return Delivered(status_code=None)  # replayed after the target stopped taking them
        if prepared is None or prepared.refs != refs:
            async with self._sessions() as session:
                [prepared] = await self._load(session, target, [refs])
        resources, remote_ids, identifiers = (
            prepared.resources,
            prepared.remote_ids,
            dict(prepared.identifiers),
        )
        if len(resources) != len(refs):
            return Rejected(
                "stored resources are missing", status_code=None, reason="missing_resources"
            )
        for resource in resources:  # fallback for split Bundles: conditional references
            ident = business_identifier(resource)
            if ident is not None:
                identifiers[_ref(resource)] = ident
        client = self.clients.client_for(target)
        progress = _Progress(dict(remote_ids))
        try:
            if target.mode == "shadow":
                return await self._shadow(delivery, client, target, resources, identifiers)
            if target.write_strategy == "individual":
                await self._send_individual(client, target, resources, identifiers, progress)
            else:
                await self._send_transactions(client, target, resources, identifiers, progress)
        except TokenUnavailableError as exc:
            return Wait(
                str(exc), exc.retry_after_s or TOKEN_WAIT_S, "token", self._save(target, progress)
            )
        except EhrConfigError as exc:
            return Wait(
                str(exc), exc.retry_after_s or CONFIG_WAIT_S, "config", self._save(target, progress)
            )
        except EhrUnavailableError as exc:
            return Failed(
                str(exc), exc.status_code, exc.retry_after_s, self._save(target, progress)
            )
        except EhrRejectedError as exc:
            if exc.status_code == 412:
                return await self._review(delivery, client, target, resources, progress, exc)
            return Rejected(
                str(exc),
                exc.status_code,
                exc.operation_outcome,
                effects=self._save(target, progress),
            )
        return self._delivered(delivery, target, progress)

    async def _shadow(
        self,
        delivery: Delivery,
        client: EhrClient,
        target: EhrTargetProfile,
        resources: list[dict[str, Any]],
        identifiers: dict[str, tuple[str, str]],
    ) -> Outcome:
        """Shadow mode: build the target's calls as for a live write, read the EHR by
        business identifier, record what the write would have done; write nothing
        (:mod:`gateway.delivery.shadow`). Search failures raise as for a write."""
        calls = self._calls(target, resources, remote_ids={}, outside_identifiers=identifiers)
        rows = await shadow.compare_calls(
            client, calls, resources, provenance_tag_system=self._provenance
        )
        now = self._clock.now()
        name, delivery_id, message_id = target.name, delivery.id, delivery.inbound_message_id

        async def effects(session: AsyncSession) -> None:
            await shadow.save_results(
                session,
                target=name,
                delivery_id=delivery_id,
                message_id=message_id,
                rows=rows,
                now=now,
            )

        return Delivered(200, effects, None, shadow=True)

    def _calls(
        self,
        target: EhrTargetProfile,
        resources: list[dict[str, Any]],
        *,
        remote_ids: dict[str, str],
        outside_identifiers: dict[str, tuple[str, str]],
    ) -> list[RestCall]:
        """The target's REST calls for ``resources`` (both write strategies)."""
        return rest_calls(
            resources,
            remote_ids=remote_ids,
            outside_identifiers=outside_identifiers,
            provenance_tag_system=self._provenance,
            transform=self._transform(target),
        )

    async def _send_transactions(
        self,
        client: EhrClient,
        target: EhrTargetProfile,
        resources: list[dict[str, Any]],
        identifiers: dict[str, tuple[str, str]],
        progress: _Progress,
    ) -> None:
        for chunk in split_for_transaction(resources, target.max_bundle_entries):
            calls = self._calls(
                target, chunk, remote_ids=progress.remote, outside_identifiers=identifiers
            )
            response = await client.transaction(transaction_bundle(calls))
            try:
                entries = (
                    parse_transaction_response(response, chunk)
                    if response
                    else [EntryInfo(r["resourceType"], r["id"], None, None, "") for r in chunk]
                )
            except ValueError as exc:
                # 2xx without a usable transaction-response: it may have been applied; a
                # retry is safe because every entry is conditional or an update.
                raise EhrUnavailableError(f"unusable transaction-response ({exc})") from exc
            failed = next((e for e in entries if e.failed), None)
            if failed is not None and failed.status_code is not None:  # failed: a status
                # A 200 whose entries failed: a batch-response, or a server that processed
                # the transaction as one. Nothing is learnt from it (what the other entries
                # say may have been rolled back); a replay finds them by ifNoneExist.
                raise status_error(
                    failed.status_code,
                    failed.outcome,
                    f"EHR answered {failed.status_code} to a {failed.resource_type} entry "
                    f"({outcome_summary(failed.outcome)})",
                )
            for stored, entry, call in zip(chunk, entries, calls, strict=True):
                remote_id = entry.remote_id
                if remote_id is None and call.if_none_exist:
                    # Some servers leave out ``location`` (often when ifNoneExist matched):
                    # find the id, or a later change would be a create the EHR ignores.
                    remote_id = await _find_one(client, call.resource_type, call.if_none_exist)
                progress.learn(stored, remote_id, entry.remote_version)

    async def _send_individual(
        self,
        client: EhrClient,
        target: EhrTargetProfile,
        resources: list[dict[str, Any]],
        identifiers: dict[str, tuple[str, str]],
        progress: _Progress,
    ) -> None:
        in_delivery = {_ref(r) for r in resources}
        # Conditional references exist only in transactions: find outside resources the
        # EHR has by their identifier; unresolved optional references are then dropped.
        for ref, (system, value) in list(identifiers.items()):
            if ref in in_delivery or ref in progress.remote:
                continue
            resource_type = ref.split("/", 1)[0]
            found = await client.search_ids(resource_type, identifier_search(system, value))
            if len(found) == 1:
                progress.remote[ref] = found[0]
        outside = {k: v for k, v in identifiers.items() if k in in_delivery}
        for stored in split_for_transaction(resources, 1):
            # One call at a time: each refers to the earlier ones by the ids just learnt.
            [call] = self._calls(
                target, stored, remote_ids=progress.remote, outside_identifiers=outside
            )
            if call.method == "PUT" and call.resource_id:
                result = await client.update(call.resource_type, call.resource_id, call.resource)
            else:
                result = await client.create(
                    call.resource_type, call.resource, if_none_exist=call.if_none_exist
                )
            remote_id = result.remote_id
            if remote_id is None and call.if_none_exist:
                found = await client.search_ids(call.resource_type, call.if_none_exist)
                remote_id = found[0] if len(found) == 1 else None
            if remote_id is None:
                raise EhrUnavailableError(
                    f"the EHR answered {result.status} without the id of the {call.resource_type}",
                    status_code=result.status,
                )
            progress.learn(stored[0], remote_id, result.remote_version)

    async def _review(
        self,
        delivery: Delivery,
        client: EhrClient,
        target: EhrTargetProfile,
        resources: list[dict[str, Any]],
        progress: _Progress,
        exc: EhrRejectedError,
    ) -> Outcome:
        """412: find which conditional create matched several resources, for review."""
        matches: list[dict[str, Any]] = []
        lookup_error = None
        for resource in resources:
            ref = _ref(resource)
            search = if_none_exist(resource, self._provenance)
            if ref in progress.remote or search is None:
                continue
            try:
                found = await client.search_ids(resource["resourceType"], search)
            except EhrError as search_exc:
                lookup_error = f"looking up the matches failed ({search_exc.status_code})"
                break
            if len(found) > 1:
                matches.append(
                    {
                        "resource": ref,
                        "remote_ids": [f"{resource['resourceType']}/{i}" for i in found],
                    }
                )
        review: dict[str, Any] = {"reason": "multiple_matches", "matches": matches}
        if lookup_error:
            review["lookup_error"] = lookup_error
        save = self._save(target, progress)
        message = (
            f"delivery {delivery.id}: the EHR has several resources matching a conditional "
            "create: "
            + (
                "; ".join(f"{m['resource']} matches {', '.join(m['remote_ids'])}" for m in matches)
                or "matches not found"
            )
        )

        async def effects(session: AsyncSession) -> None:
            if save is not None:
                await save.write(session, list(save.rows))
            session.add(
                new_exception(
                    kind="duplicate_match",
                    channel="delivery",
                    sender=delivery.target,
                    message_id=delivery.inbound_message_id,
                    problems=[Problem("delivery", "multiple_matches", message)],
                )
            )

        log.warning(
            "delivery.needs_review",
            delivery_id=delivery.id,
            target=target.name,
            matches=len(matches),
            outcome=outcome_summary(exc.operation_outcome),
        )
        return NeedsReview(str(exc), review, 412, exc.operation_outcome, effects)

    def _save(self, target: EhrTargetProfile, progress: _Progress) -> BatchedRows | None:
        """The EHR's ids learnt, written with those of the other deliveries to the same
        target recorded together (one statement)."""
        if not progress.learned:
            return None
        now = self._clock.now()
        name = target.name

        async def write(session: AsyncSession, rows: list[repo.RemoteIdRow]) -> None:
            await repo.save_remote_ids(session, target=name, rows=rows, now=now)

        return BatchedRows(("remote_ids", name), list(progress.learned), write)

    def _delivered(
        self, delivery: Delivery, target: EhrTargetProfile, progress: _Progress
    ) -> Delivered:
        """The outcome of a delivery the EHR took: its ids to store, and that the message
        reached the target (its case records ``ehr_delivered``)."""
        reached = None
        if delivery.inbound_message_id:
            reached = Reached(
                target=target.name,
                message_id=delivery.inbound_message_id,
                patient_id=delivery.ordering_key,
                at=self._clock.now(),
            )
        return Delivered(200, self._save(target, progress), reached)


async def _find_one(client: EhrClient, resource_type: str, search: str) -> str | None:
    """The id of the one resource ``search`` finds, else None (a failed search too: the
    write itself succeeded)."""
    try:
        found = await client.search_ids(resource_type, search)
    except EhrError as exc:
        log.info(
            "delivery.id_lookup_failed", resource_type=resource_type, status_code=exc.status_code
        )
        return None
    return found[0] if len(found) == 1 else None
