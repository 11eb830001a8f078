"""Provenance for every set of resources the gateway writes from one inbound message."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, Literal

from mappers import normalize
from mappers.errors import Problem
from mappers.identifiers import IdentifierSystems

US_CORE_PROVENANCE = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-provenance"
PARTICIPANT_TYPE = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
US_CORE_PARTICIPANT_TYPE = (
    "http://hl7.org/fhir/us/core/CodeSystem/us-core-provenance-participant-type"
)
DATA_OPERATION = "http://terminology.hl7.org/CodeSystem/v3-DataOperation"
#: Extension on Provenance (``<identifier base>/normalization-note``) naming an input value
#: accepted with a change the recipient should know of, such as a time of day dropped from
#: a birth date: sub-extensions ``input`` (where in the message), ``code`` and ``text``;
#: never the value.
NORMALIZATION_NOTE = "normalization-note"


def provenance_for(
    *,
    provenance_id: str,
    targets: list[str],
    recorded: datetime,
    message_id: str,
    message_kind: str,
    systems: IdentifierSystems,
    author: str | None,
    organization: str,
    activity: Literal["CREATE", "UPDATE"] = "CREATE",
    profile: str | None = None,
    notes: Sequence[Problem] = (),
) -> dict[str, Any]:
    """A US Core Provenance (7.0.0) for the resources mapped from one inbound message.

    Args:
        provenance_id: local id of the Provenance.
        targets: local references (``Patient/<id>``...) of the resources written.
        recorded: when the gateway recorded them (timezone-aware).
        message_id: the inbound message's id; becomes ``entity[0].what.identifier``
            (role ``source``) and the ``meta.tag`` that makes the Provenance
            conditionally creatable (R4 Provenance has no ``identifier`` element).
        message_kind: what the message was (``intake submission``, ``Stripe event``...),
            for ``entity[0].what.display``.
        systems: identifier systems.
        author: the reference of who authored the content (the Patient for intake and
            checkout), or None.
        organization: the operator the gateway transmits for (``onBehalfOf``: US Core
            provenance-1 requires it when the agent is a Device).
        activity: v3-DataOperation ``CREATE`` or ``UPDATE``.
        profile: ``<kind>/<id>/<version>#sha256=<hash>`` of the mapping profile used,
            recorded in ``policy``.
        notes: values accepted with a change (a date-time's time dropped), each recorded
            as a :data:`NORMALIZATION_NOTE` extension (location and code, no value).

    Agents follow US Core: ``author`` (THO provenance-participant-type) and
    ``transmitter`` (US Core's own code system, not the THO one).
    """
    agents: list[dict[str, Any]] = []
    if author:
        agents.append(
            {
                "type": {
                    "coding": [{"system": PARTICIPANT_TYPE, "code": "author", "display": "Author"}]
                },
                "who": {"reference": author},
            }
        )
    agents.append(
        {
            "type": {
                "coding": [
                    {
                        "system": US_CORE_PARTICIPANT_TYPE,
                        "code": "transmitter",
                        "display": "Transmitter",
                    }
                ]
            },
            "who": {
                "type": "Device",
                "identifier": {"system": systems.device, "value": "fhir-gateway"},
                "display": "fhir-gateway",
            },
            "onBehalfOf": {"type": "Organization", "display": organization},
        }
    )
    prov: dict[str, Any] = {
        "resourceType": "Provenance",
        "id": provenance_id,
        "meta": {
            "profile": [US_CORE_PROVENANCE],
            "tag": [{"system": systems.provenance, "code": provenance_id}],
        },
        "target": [{"reference": t} for t in targets],
        "recorded": normalize.to_fhir_instant(recorded),
        "activity": {"coding": [{"system": DATA_OPERATION, "code": activity}]},
        "agent": agents,
        "entity": [
            {
                "role": "source",
                "what": {
                    "identifier": {"system": systems.inbound_message, "value": message_id},
                    "display": message_kind,
                },
            }
        ],
    }
    if profile:
        prov["policy"] = [f"urn:fhir-gateway:profile:{profile}"]
    if notes:
        prov["extension"] = [normalization_note(note, systems) for note in notes]
    return prov


def normalization_note(note: Problem, systems: IdentifierSystems) -> dict[str, Any]:
    """The Provenance extension (:data:`NORMALIZATION_NOTE`) for one note."""
    return {
        "url": f"{systems.base}/{NORMALIZATION_NOTE}",
        "extension": [
            {"url": "input", "valueString": note.location},
            {"url": "code", "valueCode": note.code},
            {"url": "text", "valueString": note.message},
        ],
    }


#: ``meta.tag`` code (system ``<identifier base>/migration``) of the Provenance of a record
#: brought in by a bulk import.
MIGRATED = "migrated"


def mark_migrated(
    provenance: dict[str, Any],
    *,
    source: str,
    occurred_at: datetime | None,
    systems: IdentifierSystems,
) -> dict[str, Any]:
    """The Provenance of a record migrated from another system (a bulk import, issue 16).

    Adds, to a copy:

    * ``occurredDateTime``: when the original record happened (its submission, payment
      or event time), while ``recorded`` stays when the gateway recorded it;
    * ``meta.tag`` ``<base>/migration#migrated``, so migrated records can be searched;
    * an ``entity`` with role ``source`` naming the legacy system
      (``what.identifier`` ``<base>/migration-source|<source>``);
    * ``policy`` ``urn:fhir-gateway:migration:<source>``.

    Spec: https://hl7.org/fhir/R4/provenance.html (occurred[x], entity.role).

    Args:
        provenance: a Provenance from :func:`provenance_for`.
        source: the legacy system's name (``--source``).
        occurred_at: the original time (timezone-aware), or None when the record has none.
        systems: identifier systems.
    """
    out = dict(provenance)
    meta = dict(out.get("meta") or {})
    meta["tag"] = [*meta.get("tag", []), {"system": f"{systems.base}/migration", "code": MIGRATED}]
    out["meta"] = meta
    if occurred_at is not None:
        out["occurredDateTime"] = normalize.to_fhir_instant(occurred_at)
    out["entity"] = [
        *out.get("entity", []),
        {
            "role": "source",
            "what": {
                "identifier": {"system": f"{systems.base}/migration-source", "value": source},
                "display": f"migrated from {source}",
            },
        },
    ]
    out["policy"] = [*out.get("policy", []), f"urn:fhir-gateway:migration:{source}"]
    return out
