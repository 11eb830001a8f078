"""Mapping profiles: the YAML data that clinical informatics teams own.

Profile kinds (each a pydantic model; unknown keys are errors so typos surface):

* :class:`IntakeProfile` (``profiles/intake/*.yaml``): one version of one intake form:
  its Questionnaire canonical URL, the questions (answer keys, linkIds, types, codes)
  and the required consents.
* :class:`CheckoutProfile` (``profiles/checkout/*.yaml``): plan id -> requested
  medication (RxNorm coding, dosage instruction, quantity, refills).
* :class:`EhrTargetProfile` (``profiles/ehr/*.yaml``): one EHR's FHIR base URL, OAuth
  client and which resource types it receives.
* :class:`WorkflowProfile` (``profiles/workflow.yaml``): case states, transitions and the
  ownership matrix (which sender may emit which event).
* :class:`PartnerProfile` (``profiles/events/*.yaml``): a sender of clinical events
  (webhook signature and field paths, HL7 v2 message table).

:func:`load_profiles` reads a profiles directory into a :class:`ProfileSet`, or raises
:class:`ProfileLoadError` naming the file and path of every problem, so the gateway never
starts half-configured.
"""

from mappers.profiles.checkout import CheckoutProfile, DosageSpec, Plan
from mappers.profiles.common import Coding, Quantity
from mappers.profiles.ehr import EhrAuth, EhrTargetProfile, RetryPolicy
from mappers.profiles.events import (
    EhrEventsSpec,
    FocusRule,
    Hl7Spec,
    PartnerProfile,
    SignatureSpec,
    WebhookSpec,
)
from mappers.profiles.intake import AnswerOption, IntakeItem, IntakeProfile, UnitSpec
from mappers.profiles.loader import LoadedProfile, ProfileLoadError, ProfileSet, load_profiles
from mappers.profiles.workflow import EventType, SlaTimer, Transition, WorkflowProfile

__all__ = [
    "AnswerOption",
    "CheckoutProfile",
    "Coding",
    "DosageSpec",
    "EhrAuth",
    "EhrEventsSpec",
    "EhrTargetProfile",
    "EventType",
    "FocusRule",
    "Hl7Spec",
    "IntakeItem",
    "IntakeProfile",
    "LoadedProfile",
    "PartnerProfile",
    "Plan",
    "ProfileLoadError",
    "ProfileSet",
    "Quantity",
    "RetryPolicy",
    "SignatureSpec",
    "SlaTimer",
    "Transition",
    "UnitSpec",
    "WebhookSpec",
    "WorkflowProfile",
    "load_profiles",
]
