"""Event sender profiles: how partners, HL7 v2 feeds and EHR subscriptions speak.

Two kinds of data live here:

* :class:`PartnerProfile` (``profiles/events/*.yaml``): one sender of clinical events (a
  provider network, a pharmacy, an EHR's HL7 interface): its role in the workflow's
  ownership matrix (``source``), how its JSON webhooks are signed and where their fields
  live (:class:`WebhookSpec`), and how its HL7 v2 messages map (:class:`Hl7Spec`).
* :class:`EhrEventsSpec`: the ``events`` block of an EHR target profile
  (``profiles/ehr/*.yaml``): how FHIR Subscription notifications from that EHR are
  authenticated and which focus resources (Task, MedicationRequest, Encounter,
  CommunicationRequest, ServiceRequest) mean which clinical event.

Event references are written ``type`` or ``type:detail`` (``decision:approved``), as in the
workflow profile. :func:`check_event_profiles` checks them against the workflow.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from datetime import timedelta
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import jmespath
from jmespath.exceptions import JMESPathError
from pydantic import Field, field_validator, model_validator

from mappers.errors import Problem
from mappers.profiles.common import KEY, SLUG, Strict
from mappers.profiles.workflow import WorkflowProfile

#: ``type`` or ``type:detail`` with workflow keys.
EVENT_REF = r"^[a-z][a-z0-9_]*(:[a-z][a-z0-9_]*)?$"
#: ``ORM^O01``: MSH-9.1 message code and MSH-9.2 trigger event (HL7 tables 0076 / 0003).
MESSAGE_TYPE = r"^[A-Z0-9]{3}\^[A-Z0-9]{3}$"
#: The message types the HL7 v2 mapper understands.
SUPPORTED_HL7_MESSAGES = frozenset(
    {"ORM^O01", "RDE^O11", "RDS^O13", "ORU^R01", "ADT^A08", "SIU^S12"}
)
#: Focus resource types that carry workflow meaning.
FocusResourceType = Literal[
    "Task", "MedicationRequest", "Encounter", "CommunicationRequest", "ServiceRequest"
]


class PatientIdentifierRule(Strict):
    """How one kind of patient identifier finds our patient.

    Exactly one of ``system`` (match ``system|value`` against the patient keys; ``{base}``
    expands to ``GATEWAY_IDENTIFIER_BASE``, e.g. ``{base}/external-patient-id``) or
    ``remote_id_of`` (the value is the Patient id in that EHR target, matched through
    ``remote_ids``).
    """

    system: str | None = None
    remote_id_of: Annotated[str | None, Field(pattern=SLUG)] = None

    @model_validator(mode="after")
    def _one_way(self) -> PatientIdentifierRule:
        if (self.system is None) == (self.remote_id_of is None):
            raise ValueError("give exactly one of system or remote_id_of")
        return self


class Hl7IdentifierRule(PatientIdentifierRule):
    """A PID-3 repetition (CX) this sender uses, chosen by CX-4.1 assigning authority and/or
    CX-5 identifier type code (HL7 table 0203: ``MR`` medical record number, ``PI`` patient
    internal identifier...). Empty ``authority`` and ``type`` match any repetition."""

    authority: str | None = None
    type: str | None = None


class Hl7MessageRule(Strict):
    """One row of the sender's HL7 v2 mapping table; the first matching row wins.

    ``orc_1`` are ORC-1 order control codes (HL7 table 0119: ``NW`` new order, ``OK``
    accepted, ``RF`` refill request, ``CA`` cancel...), ``orc_5`` ORC-5 order status codes
    (HL7 table 0038: ``IP`` in process, ``CM`` completed, ``SC`` scheduled...); empty lists
    match anything. ``event`` is the clinical event; ``ignore: true`` acknowledges the
    message and records it without an event.
    """

    message: Annotated[str, Field(pattern=MESSAGE_TYPE)]
    orc_1: list[str] = Field(default_factory=list)
    orc_5: list[str] = Field(default_factory=list)
    event: Annotated[str | None, Field(pattern=EVENT_REF)] = None
    ignore: bool = False

    @field_validator("message")
    @classmethod
    def _supported(cls, value: str) -> str:
        if value not in SUPPORTED_HL7_MESSAGES:
            raise ValueError(
                f"unsupported message type; supported: {', '.join(sorted(SUPPORTED_HL7_MESSAGES))}"
            )
        return value

    @model_validator(mode="after")
    def _event_or_ignore(self) -> Hl7MessageRule:
        if (self.event is None) == (not self.ignore):
            raise ValueError("give either event or ignore: true")
        return self


class Hl7Spec(Strict):
    """An HL7 v2 sender: who it is (MSH-4 sending facility, optionally MSH-3 application,
    the networks its MLLP connections come from and the client certificates it presents
    over MLLP with TLS), how its PID-3 identifiers match, and its message table.
    Timestamps without an offset are read in ``timezone`` (IANA name)."""

    facilities: Annotated[list[str], Field(min_length=1)]
    applications: list[str] = Field(default_factory=list)
    peers: list[str] = Field(
        default_factory=list,
        description="MLLP source networks (CIDR); empty: any peer.",
    )
    certificates: list[str] = Field(
        default_factory=list,
        description="MLLP over TLS: the client certificates that speak for this sender, "
        "each 'sha256:<hex>' (SHA-256 of the DER certificate, colons allowed) or "
        "'CN=<subject common name>' (a certificate the listener's client CA issued); a "
        "certificate no partner names may send nothing.",
    )
    timezone: str = "UTC"
    patient_identifiers: Annotated[list[Hl7IdentifierRule], Field(min_length=1)]
    messages: Annotated[list[Hl7MessageRule], Field(min_length=1)]
    unmatched: Literal["exception", "ignore"] = Field(
        default="exception",
        description="A supported message no row matches: an exception (AE) or ignored (AA).",
    )
    batch_refusal_msa_2: Literal["MSH-10", "BHS-11"] = Field(
        default="MSH-10",
        description="What MSA-2 of the AR refusing an HL7 batch (FHS/BHS) echoes, so this "
        "sender can match the refusal: MSH-10 of the batch's first message, or BHS-11 "
        "(batch control id; FHS-11 without a BHS). Either falls back to the other when "
        "empty.",
    )

    @field_validator("peers")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for net in value:
            ipaddress.ip_network(net, strict=False)
        return value

    @field_validator("certificates")
    @classmethod
    def _certificates(cls, value: list[str]) -> list[str]:
        out = []
        for item in value:
            if item.lower().startswith("sha256:"):
                digest = item[7:].replace(":", "").lower()
                if not re.fullmatch(r"[0-9a-f]{64}", digest):
                    raise ValueError(f"{item!r}: sha256: needs 64 hex digits")
                out.append(f"sha256:{digest}")
            elif item.startswith("CN=") and item[3:].strip():
                out.append(f"CN={item[3:].strip()}")
            else:
                raise ValueError(f"{item!r}: expected 'sha256:<hex>' or 'CN=<common name>'")
        return out

    def accepts_certificate(self, *, sha256: str, common_name: str | None) -> bool:
        """True if a client certificate with SHA-256 fingerprint ``sha256`` (lowercase
        hex of the DER bytes) and subject ``common_name`` is one of :attr:`certificates`."""
        return f"sha256:{sha256}" in self.certificates or (
            common_name is not None and f"CN={common_name}" in self.certificates
        )

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {value!r}") from exc
        return value

    def message_types(self) -> set[str]:
        """The ``CODE^TRIGGER`` message types this sender may send."""
        return {rule.message for rule in self.messages}


class SignatureSpec(Strict):
    """How a partner signs its webhooks.

    * ``standard-webhooks`` (https://www.standardwebhooks.com): headers ``webhook-id``,
      ``webhook-timestamp``, ``webhook-signature``; the secret is ``whsec_`` + base64 and
      the HMAC key is its base64-decoded bytes. ``tolerance`` can only narrow the reference
      library's 5 minutes.
    * ``hmac-sha256``: HMAC-SHA256 with the UTF-8 secret over the raw body (or over
      ``<timestamp>.<body>`` when ``timestamp_header`` is set), sent in ``header`` as hex or
      base64, after ``prefix`` (e.g. ``sha256=``). The timestamp (Unix seconds) must be
      within ``tolerance`` of now; without a timestamp header there is no replay window,
      and only the dedupe on the partner's event id stops a replayed body.
    """

    scheme: Literal["standard-webhooks", "hmac-sha256"]
    secret_env: Annotated[str, Field(pattern=r"^[A-Z_][A-Z0-9_]*$")]
    tolerance: timedelta = timedelta(minutes=5)
    header: str | None = None
    encoding: Literal["hex", "base64"] = "hex"
    prefix: str = ""
    timestamp_header: str | None = None

    @model_validator(mode="after")
    def _complete(self) -> SignatureSpec:
        if self.tolerance <= timedelta(0):
            raise ValueError("tolerance must be positive")
        if self.scheme == "hmac-sha256" and not self.header:
            raise ValueError("hmac-sha256 needs header (the signature header name)")
        if self.scheme == "standard-webhooks":
            if self.tolerance > timedelta(minutes=5):
                raise ValueError("standard-webhooks tolerance cannot exceed 5 minutes")
            if self.header or self.timestamp_header or self.prefix:
                raise ValueError("standard-webhooks uses its own headers")
        return self


class PartnerPatientPath(PatientIdentifierRule):
    """Where one patient identifier lives in the partner's JSON (a JMESPath expression)."""

    path: str


class WebhookFields(Strict):
    """JMESPath expressions (https://jmespath.org/specification.html) into the partner's
    JSON. ``occurred_at`` is ISO 8601 with an offset, or Unix seconds / milliseconds
    (``time_format``)."""

    event_id: str
    type: str | None = None
    status: str | None = None
    occurred_at: str
    time_format: Literal["iso8601", "unix_s", "unix_ms"] = "iso8601"
    patient: Annotated[list[PartnerPatientPath], Field(min_length=1)]
    case_id: str | None = None
    reference: str | None = None

    @model_validator(mode="after")
    def _type_or_status(self) -> WebhookFields:
        if self.type is None and self.status is None:
            raise ValueError("give type and/or status: the status table is looked up with them")
        for name in ("event_id", "type", "status", "occurred_at", "case_id", "reference"):
            _check_jmespath(getattr(self, name))
        for p in self.patient:
            _check_jmespath(p.path)
        return self


def _check_jmespath(expression: str | None) -> None:
    if expression is None:
        return
    try:
        jmespath.compile(expression)
    except JMESPathError as exc:
        raise ValueError(f"invalid JMESPath {expression!r}") from exc


class WebhookSpec(Strict):
    """A partner's JSON webhooks: signature, field paths and the status table.

    The table is looked up with ``<type>:<status>``, then ``<status>``, then ``<type>``;
    values are event references (``dispensed``, ``decision:approved``). Keys listed in
    ``ignore`` are acknowledged and recorded without an event; anything else is kept in the
    exceptions queue.
    """

    signature: SignatureSpec
    fields: WebhookFields
    statuses: Annotated[dict[str, Annotated[str, Field(pattern=EVENT_REF)]], Field(min_length=1)]
    ignore: list[str] = Field(default_factory=list)


class PartnerProfile(Strict):
    """One sender of clinical events (``profiles/events/<name>.yaml``).

    ``source`` is its role in the workflow's ownership matrix (``pharmacy``,
    ``provider_network``, ``ehr``...): an event type it does not own is refused.
    """

    kind: Literal["partner"] = "partner"
    name: Annotated[str, Field(pattern=SLUG)]
    description: str | None = None
    source: Annotated[str, Field(pattern=KEY)]
    webhook: WebhookSpec | None = None
    hl7: Hl7Spec | None = None
    max_future: timedelta = Field(
        default=timedelta(minutes=5),
        ge=timedelta(0),
        description="How far ahead of its receipt an event's time (HL7 EVN/ORC/OBR times or "
        "MSH-7, the webhook's occurred_at) may be: later ones are refused as "
        "future_timestamp (HL7: AE 102) and kept in the exceptions queue, since a time read "
        "in the wrong zone would make correct later events count as late.",
    )

    @model_validator(mode="after")
    def _some_channel(self) -> PartnerProfile:
        if self.webhook is None and self.hl7 is None:
            raise ValueError("a partner needs webhook and/or hl7")
        return self


class FocusRule(Strict):
    """One row of an EHR's focus-resource table; the first matching row wins.

    Conditions (all given ones must hold; lists match any of their values):
    ``status`` (``Task.status``, ``MedicationRequest.status``, ``Encounter.status``...),
    ``intent`` (``MedicationRequest``/``ServiceRequest``/``CommunicationRequest`` intent,
    ``Task.intent``), ``code`` (a code of ``Task.code``, ``ServiceRequest.code``,
    ``CommunicationRequest.category``, ``Encounter.type``), ``business_status`` (a code or
    the text of ``Task.businessStatus``). ``event`` is the clinical event; ``ignore: true``
    records the notification without one.
    """

    resource: FocusResourceType
    status: list[str] = Field(default_factory=list)
    intent: list[str] = Field(default_factory=list)
    code: list[str] = Field(default_factory=list)
    business_status: list[str] = Field(default_factory=list)
    event: Annotated[str | None, Field(pattern=EVENT_REF)] = None
    ignore: bool = False

    @model_validator(mode="after")
    def _event_or_ignore(self) -> FocusRule:
        if (self.event is None) == (not self.ignore):
            raise ValueError("give either event or ignore: true")
        return self


class NotificationAuth(Strict):
    """How the EHR authenticates its notification POSTs: the header set in
    ``Subscription.channel.header`` and the environment variable with its secret value
    (compared in constant time as ``<prefix><secret>``)."""

    header: str = "Authorization"
    prefix: str = "Bearer "
    secret_env: Annotated[str, Field(pattern=r"^[A-Z_][A-Z0-9_]*$")]


class EhrEventsSpec(Strict):
    """The ``events`` block of an EHR target: FHIR Subscription notifications (R5 Backport
    IG, https://hl7.org/fhir/uv/subscriptions-backport/) into clinical events."""

    source: Annotated[str, Field(pattern=KEY)] = "ehr"
    notifications: NotificationAuth
    resources: Annotated[list[FocusRule], Field(min_length=1)]
    unmatched: Literal["ignore", "exception"] = Field(
        default="ignore",
        description="A focus resource no row matches (topics fire on any change): ignored.",
    )
    max_future: timedelta = Field(
        default=timedelta(minutes=5),
        ge=timedelta(0),
        description="How far ahead of its receipt an event's time may be: later ones are "
        "refused as future_timestamp and kept in the exceptions queue.",
    )


def _event_problems(
    workflow: WorkflowProfile, where: str, ref: str | None, source: str
) -> list[Problem]:
    if ref is None:
        return []
    event_type, _, detail = ref.partition(":")
    spec = workflow.events.get(event_type)
    if spec is None:
        return [Problem(where, "unknown_event", f"event {event_type!r} is not in the workflow")]
    problems = []
    if detail and detail not in spec.details:
        problems.append(
            Problem(where, "unknown_detail", f"event {event_type!r} has no detail {detail!r}")
        )
    if spec.details and not detail:
        problems.append(
            Problem(where, "missing_detail", f"event {event_type!r} needs a detail (type:detail)")
        )
    if source not in spec.owners:
        problems.append(
            Problem(
                where,
                "not_owner",
                f"{source!r} does not own {event_type!r} in the workflow "
                f"(owners: {', '.join(spec.owners)})",
            )
        )
    return problems


Locate = Callable[[tuple[Any, ...]], str]


def check_event_profiles(
    workflow: WorkflowProfile,
    partners: dict[str, tuple[Locate, PartnerProfile]],
    targets: dict[str, tuple[Locate, EhrEventsSpec | None]],
) -> list[Problem]:
    """Cross-check partner profiles and EHR ``events`` blocks against the workflow.

    Args:
        workflow: the workflow profile.
        partners: partner name -> (locator, profile); the locator turns a path in the
            profile into ``file:line: path`` (``LoadedProfile.where``).
        targets: EHR target name -> (locator, its events block).

    Returns:
        Problems: events unknown to the workflow, details missing or unknown, mappings to
        events the sender's role does not own, an HL7 facility claimed by two partners,
        ``remote_id_of`` naming an unknown target.
    """
    problems: list[Problem] = []
    facilities: dict[str, str] = {}
    for name, (where, partner) in sorted(partners.items()):
        rules: list[tuple[tuple[Any, ...], PatientIdentifierRule]] = []
        if partner.webhook is not None:
            for key, ref in partner.webhook.statuses.items():
                problems += _event_problems(
                    workflow, where(("webhook", "statuses", key)), ref, partner.source
                )
            rules += [
                (("webhook", "fields", "patient", i), r)
                for i, r in enumerate(partner.webhook.fields.patient)
            ]
        if partner.hl7 is not None:
            for i, message_rule in enumerate(partner.hl7.messages):
                problems += _event_problems(
                    workflow, where(("hl7", "messages", i)), message_rule.event, partner.source
                )
            for facility in partner.hl7.facilities:
                other = facilities.get(facility)
                if other is not None:
                    problems.append(
                        Problem(
                            where(("hl7", "facilities")),
                            "duplicate",
                            f"facility {facility!r} is also claimed by partner {other!r}",
                        )
                    )
                facilities[facility] = name
            rules += [
                (("hl7", "patient_identifiers", i), r)
                for i, r in enumerate(partner.hl7.patient_identifiers)
            ]
        for path, rule in rules:
            if rule.remote_id_of is not None and rule.remote_id_of not in targets:
                problems.append(
                    Problem(
                        where((*path, "remote_id_of")),
                        "unknown_target",
                        f"no EHR target named {rule.remote_id_of!r}",
                    )
                )
    for _name, (where, spec) in sorted(targets.items()):
        if spec is None:
            continue
        for i, focus in enumerate(spec.resources):
            problems += _event_problems(
                workflow, where(("events", "resources", i)), focus.event, spec.source
            )
    return problems


def expand_system(system: str, base: str) -> str:
    """``{base}/external-patient-id`` -> ``<GATEWAY_IDENTIFIER_BASE>/external-patient-id``."""
    return re.sub(r"\{base\}", base, system)
