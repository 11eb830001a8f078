"""Identifier systems (``Identifier.system``) the gateway mints, under one base URI.

Each kind of id gets its own stable system so ``If-None-Exist: identifier=<system>|<value>``
deduplicates exactly (https://hl7.org/fhir/R4/datatypes.html#Identifier: "the namespace for
the value"). The base comes from ``GATEWAY_IDENTIFIER_BASE``; an EHR's own systems (MRNs)
are copied exactly, never minted.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class IdentifierSystems:
    """The identifier systems derived from ``base`` (no trailing slash)."""

    base: str

    @property
    def patient(self) -> str:
        """The gateway's canonical patient id (value: the local Patient id)."""
        return f"{self.base}/patient-id"

    @property
    def external_patient(self) -> str:
        """The intake app's / checkout metadata's patient id (``patient.external_id``)."""
        return f"{self.base}/external-patient-id"

    @property
    def intake_submission(self) -> str:
        """An intake submission (``submission_id``): QuestionnaireResponse.identifier."""
        return f"{self.base}/intake-submission"

    @property
    def checkout(self) -> str:
        """A checkout (Stripe Checkout Session id or canonical ``checkout_id``)."""
        return f"{self.base}/checkout-session"

    @property
    def stripe_customer(self) -> str:
        """A Stripe customer id (``cus_...``)."""
        return f"{self.base}/stripe-customer"

    @property
    def inbound_message(self) -> str:
        """A message the gateway received (Provenance.entity.what.identifier)."""
        return f"{self.base}/inbound-message"

    @property
    def provenance(self) -> str:
        """``meta.tag`` system that makes Provenance conditionally creatable (it has no
        ``identifier`` element in R4)."""
        return f"{self.base}/provenance"

    @property
    def device(self) -> str:
        """The gateway itself as a Provenance agent."""
        return f"{self.base}/device"
