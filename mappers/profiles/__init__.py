"""Mapping profiles: the YAML data that clinical informatics teams own.

Profile kinds (each a pydantic model; unknown keys are errors so typos surface):

* :class:`IntakeProfile` (``profiles/intake/*.yaml``): one version of one intake form:
  its Questionnaire canonical URL, the questions (answer keys, linkIds, types, codes)
  and the required consents.
* :class:`CheckoutProfile` (``profiles/checkout/*.yaml``): processor field paths
  (Stripe) and plan id -> requested medication (RxNorm coding, dose form, dosage
  instruction, quantity, refills).
* :class:`EhrTargetProfile` (``profiles/ehr/*.yaml``): one EHR's FHIR base URL, OAuth
  client and which resource types it receives.
* :class:`WorkflowProfile` (``profiles/workflow.yaml``): case states, transitions and the
  ownership matrix (which sender may emit which event), SLA timers.
* :class:`PartnerProfile` (``profiles/events/*.yaml``): a sender of clinical events
  (webhook signature and field paths, HL7 v2 message table).

:func:`load_profiles` reads a profiles directory (and its ConceptMaps) into a
:class:`ProfileSet`, or raises :class:`ProfileLoadError` naming ``file:line: path`` of every
problem (schema and lint), so the gateway never starts half-configured. Kinds are
registered in :data:`PROFILE_KINDS`.
"""

from mappers.profiles.checkout import CheckoutProfile, DosageSpec, FieldPath, Plan, Processor
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
from mappers.profiles.intake import (
    AnswerOption,
    Condition,
    ConsentSpec,
    FlagSpec,
    IntakeItem,
    IntakeProfile,
    ObservationSpec,
)
from mappers.profiles.loader import (
    PROFILE_KINDS,
    LoadedProfile,
    ProfileKind,
    ProfileLoadError,
    ProfileSet,
    load_profiles,
)
from mappers.profiles.overrides import EhrOverrides
from mappers.profiles.workflow import EventType, SlaTimer, Transition, WorkflowProfile

__all__ = [
    "PROFILE_KINDS",
    "AnswerOption",
    "CheckoutProfile",
    "Coding",
    "Condition",
    "ConsentSpec",
    "DosageSpec",
    "EhrAuth",
    "EhrEventsSpec",
    "EhrOverrides",
    "EhrTargetProfile",
    "EventType",
    "FieldPath",
    "FlagSpec",
    "FocusRule",
    "Hl7Spec",
    "IntakeItem",
    "IntakeProfile",
    "LoadedProfile",
    "ObservationSpec",
    "PartnerProfile",
    "Plan",
    "Processor",
    "ProfileKind",
    "ProfileLoadError",
    "ProfileSet",
    "Quantity",
    "RetryPolicy",
    "SignatureSpec",
    "SlaTimer",
    "Transition",
    "WebhookSpec",
    "WorkflowProfile",
    "load_profiles",
]
