"""EHR target profiles (``profiles/ehr/*.yaml``): where and how FHIR is delivered."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, model_validator

from mappers.profiles.common import SLUG, Strict
from mappers.profiles.events import EhrEventsSpec
from mappers.profiles.overrides import EhrOverrides

ResourceType = Literal[
    "Patient",
    "QuestionnaireResponse",
    "MedicationRequest",
    "Provenance",
    "Observation",
    "Flag",
    "Consent",
    "Questionnaire",
]


class EhrAuth(Strict):
    """OAuth 2.0 client credentials for one EHR (RFC 6749 section 4.4)."""

    method: Literal["client_secret_basic", "client_secret_post", "none"] = "client_secret_basic"
    token_url: str | None = None
    client_id: str | None = None
    client_secret_env: str | None = Field(
        default=None, description="Name of the environment variable holding the secret."
    )
    scopes: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _complete(self) -> EhrAuth:
        if self.method != "none":
            missing = [
                name
                for name in ("token_url", "client_id", "client_secret_env")
                if getattr(self, name) in (None, "")
            ]
            if missing:
                raise ValueError(f"auth method {self.method} needs {', '.join(missing)}")
        return self


class RetryPolicy(Strict):
    """Exponential backoff with full jitter (delays in seconds)."""

    base_delay_s: float = Field(default=2.0, gt=0)
    max_delay_s: float = Field(default=300.0, gt=0)
    max_attempts: int = Field(default=12, ge=1)
    max_age_s: float = Field(default=72 * 3600.0, gt=0)


class EhrTargetProfile(Strict):
    """One EHR the gateway delivers FHIR to."""

    kind: Literal["ehr"] = "ehr"
    name: Annotated[str, Field(pattern=SLUG)]
    enabled: bool = True
    base_url: str
    auth: EhrAuth = Field(default_factory=lambda: EhrAuth(method="none"))
    send: list[ResourceType] = Field(
        default_factory=lambda: [  # type: ignore[arg-type]
            "Patient",
            "QuestionnaireResponse",
            "MedicationRequest",
            "Provenance",
        ]
    )
    timeout_s: float = Field(default=20.0, gt=0)
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    overrides: EhrOverrides = Field(
        default_factory=EhrOverrides,
        description="Per-EHR rewrites of outgoing FHIR (issue 3): identifier systems, "
        "extensions, resource types to skip, code translations.",
    )
    events: EhrEventsSpec | None = Field(
        default=None,
        description="FHIR Subscription notifications from this EHR into clinical events.",
    )

    @model_validator(mode="after")
    def _base_url(self) -> EhrTargetProfile:
        if not re.match(r"^https?://", self.base_url):
            raise ValueError("base_url must be an http(s) URL")
        return self
