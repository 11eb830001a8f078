"""EHR target profiles (``profiles/ehr/*.yaml``): where and how FHIR is delivered.

A target names the EHR's FHIR base URL, how the gateway gets its OAuth token, which
resource types it receives, and how delivery behaves when the EHR is slow, down or picky:
the retry policy, the write strategy (transaction Bundles, optionally split, or one
conditional create per resource), request limits shared by every worker, and the circuit
breaker. Every field has a default that suits a production EHR; see ``docs/DELIVERY.md``.
"""

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

AuthMethod = Literal["client_secret_basic", "client_secret_post", "private_key_jwt", "none"]


class TokenRetryPolicy(Strict):
    """Backoff of a failing token endpoint (seconds), one schedule per target.

    The n-th consecutive failure waits a random time in ``[c/2, c]`` with
    ``c = min(max_delay_s, base_delay_s * 2**(n-1))`` ("equal jitter": the floor bounds how
    often a failing endpoint is called), at least the ``Retry-After`` it sent.
    """

    base_delay_s: float = Field(default=1.0, gt=0)
    max_delay_s: float = Field(default=120.0, gt=0)
    config_error_delay_s: float = Field(
        default=30.0,
        gt=0,
        description="Longest first wait after a configuration error (credentials refused; "
        "the wait is 1/2 to 1 times this, doubling): people fix those, not seconds.",
    )


class EhrAuth(Strict):
    """How the gateway authenticates to one EHR (OAuth 2.0 client credentials, RFC 6749
    section 4.4; SMART Backend Services for ``private_key_jwt``,
    https://hl7.org/fhir/smart-app-launch/backend-services.html).

    ``client_secret_basic``/``client_secret_post`` read the secret from the environment
    variable named by ``client_secret_env``. ``private_key_jwt`` signs a client assertion
    (``alg`` RS384 or ES384, ``kid`` in the header, a fresh ``jti``, ``exp`` 5 minutes
    ahead) with the key in ``private_key_file`` (PEM or JWK JSON; a relative path is
    resolved against the profiles directory) or, when no file is given, with the gateway's
    own rotating key of that ``alg`` (``fhir-gateway keys rotate``), published at
    ``/.well-known/jwks.json``.
    """

    method: AuthMethod = "client_secret_basic"
    token_url: str | None = None
    client_id: str | None = None
    client_secret_env: str | None = Field(
        default=None, description="Name of the environment variable holding the secret."
    )
    scopes: list[str] = Field(default_factory=list)
    private_key_file: str | None = Field(
        default=None, description="private_key_jwt: PEM or JWK file of the signing key."
    )
    kid: str | None = Field(
        default=None,
        description="private_key_jwt with a key file: the kid registered with the EHR "
        "(default: the JWK's kid, else its RFC 7638 thumbprint).",
    )
    alg: Literal["RS384", "ES384"] = "RS384"
    refresh_ahead_s: float = Field(
        default=60.0,
        ge=0,
        description="Refresh this long before expiry (at most half the token's lifetime).",
    )
    token_timeout_s: float = Field(default=10.0, gt=0)
    retry: TokenRetryPolicy = Field(default_factory=TokenRetryPolicy)

    @model_validator(mode="after")
    def _complete(self) -> EhrAuth:
        if self.method == "none":
            return self
        needed = ["token_url", "client_id"]
        if self.method in ("client_secret_basic", "client_secret_post"):
            needed.append("client_secret_env")
        missing = [name for name in needed if getattr(self, name) in (None, "")]
        if missing:
            raise ValueError(f"auth method {self.method} needs {', '.join(missing)}")
        if self.method != "private_key_jwt" and (self.private_key_file or self.kid):
            raise ValueError("private_key_file and kid are for auth method private_key_jwt")
        return self


class RetryPolicy(Strict):
    """Exponential backoff with full jitter (delays in seconds) for one delivery."""

    base_delay_s: float = Field(default=2.0, gt=0)
    max_delay_s: float = Field(default=300.0, gt=0)
    max_attempts: int = Field(default=12, ge=1)
    max_age_s: float = Field(default=72 * 3600.0, gt=0)


class CircuitBreakerPolicy(Strict):
    """When to stop sending to a failing target, how it is tried again (seconds).

    Modelled on resilience4j's CircuitBreaker
    (https://resilience4j.readme.io/docs/circuitbreaker) and Polly's advanced circuit
    breaker. The circuit opens when, across all workers, the share of transient failures
    among the calls of the last ``window_s`` seconds reaches ``failure_rate`` (with at
    least ``minimum_calls`` calls in the window), or after ``failure_threshold`` transient
    failures in a row (a target with little traffic). While it is open nothing is
    claimed, so waiting deliveries keep their attempts. The next trial comes after the
    EHR's ``Retry-After`` when it sent one (at most ``max_retry_after_s``), else after
    ``open_s`` (equal jitter, doubling per failed trial round up to ``max_open_s``; a
    success resets the doubling): one worker probes ``GET [base]/metadata``; if it answers,
    the circuit is half-open and ``half_open_trials`` deliveries are tried; it closes as
    soon as enough of them succeed to keep their failure rate under ``failure_rate``, and
    opens again once enough fail to reach it.

    ``max_open_s`` is the longest a recovered EHR can wait for its next trial: 30 s by
    default, so the worst delay added after a recovery stays well under a minute, for one
    ``GET [base]/metadata`` every 15-30 s per target while the EHR is down.
    """

    failure_threshold: int = Field(default=5, ge=1)
    failure_rate: float = Field(default=0.5, gt=0, le=1)
    minimum_calls: int = Field(default=10, ge=1)
    window_s: float = Field(default=30.0, gt=0)
    half_open_trials: int = Field(default=3, ge=1)
    open_s: float = Field(default=5.0, gt=0)
    max_open_s: float = Field(default=30.0, gt=0)
    max_retry_after_s: float = Field(default=120.0, gt=0)


class CutoverGuards(Strict):
    """The rollback rules of a cutover (issue 16), decided before launch day: thresholds
    over the last ``window_s`` seconds, checked by the worker every ``check_every_s``.
    A breach alerts the ops subscribers (``target.guard_breached``, Standard Webhooks)
    and shows on ``GET /v1/ops/targets``; with ``auto_pause`` the target's deliveries
    stop (its circuit is held open) until the breach clears.
    """

    window_s: float = Field(default=3600.0, gt=0)
    check_every_s: float = Field(default=60.0, gt=0)
    min_samples: int = Field(
        default=20, ge=1, description="Rates are judged over at least this many records."
    )
    max_paid_without_medication_request_pct: float | None = Field(
        default=None,
        ge=0,
        le=100,
        description="Paid checkouts whose MedicationRequest was not delivered to this "
        "target within medication_request_within_s, in percent.",
    )
    medication_request_within_s: float = Field(default=900.0, gt=0)
    max_exceptions_per_hour: int | None = Field(
        default=None, ge=0, description="New exceptions-queue entries per hour."
    )
    min_intake_acceptance_pct: float | None = Field(
        default=None,
        ge=0,
        le=100,
        description="Intake submissions accepted among those received, in percent.",
    )
    auto_pause: bool = False


class EhrTargetProfile(Strict):
    """One EHR the gateway delivers FHIR to."""

    kind: Literal["ehr"] = "ehr"
    name: Annotated[str, Field(pattern=SLUG)]
    enabled: bool = True
    mode: Literal["live", "shadow"] = Field(
        default="live",
        description="live: write to the EHR. shadow (a cutover rehearsal): map, validate, "
        "read the EHR by business identifier with the target's token and record what "
        "would have been written (create, no change, update with the diff); write nothing.",
    )
    guards: CutoverGuards | None = Field(
        default=None, description="Cutover guards: thresholds that alert (and may pause)."
    )
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
    write_strategy: Literal["transaction", "individual"] = Field(
        default="transaction",
        description="transaction: one Bundle per message (split by max_bundle_entries); "
        "individual: one conditional create/update per resource, in dependency order.",
    )
    max_bundle_entries: int | None = Field(
        default=None, ge=1, description="Largest transaction Bundle the EHR accepts."
    )
    max_concurrent_requests: int = Field(
        default=8, ge=1, description="Requests in flight to this EHR, across all workers."
    )
    rate_limit_per_s: float | None = Field(
        default=None, gt=0, description="Requests per second to this EHR, across all workers."
    )
    rate_burst: int | None = Field(
        default=None, ge=1, description="Token-bucket size (default: one second's worth)."
    )
    circuit_breaker: CircuitBreakerPolicy = Field(default_factory=CircuitBreakerPolicy)
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
