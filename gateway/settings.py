"""Gateway settings, read once at start-up from ``GATEWAY_*`` environment variables.

Built once (:func:`load_settings`) and passed down; nothing reads configuration at import
time. Secrets are ``SecretStr`` and have no defaults. Durations are ``timedelta``
(pydantic accepts seconds as a number, or ISO 8601 such as ``PT30S``).
"""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from gateway.egress import EgressPolicy


def _bundled_profiles_dir() -> Path:
    """``<repo>/profiles`` of a source checkout (editable install), else ``./profiles``
    (a non-editable install, such as the Docker image, run from the project directory)."""
    beside_source = Path(__file__).resolve().parent.parent / "profiles"
    return beside_source if beside_source.is_dir() else Path.cwd() / "profiles"


#: The profiles shipped with the source tree (``<repo>/profiles``).
BUNDLED_PROFILES_DIR = _bundled_profiles_dir()


def normalize_database_url(url: str) -> str:
    """Return ``url`` with an async driver: ``sqlite:`` -> ``sqlite+aiosqlite:``,
    ``postgresql:``/``postgres:`` -> ``postgresql+psycopg:``. Other URLs are returned as is."""
    if url.startswith("sqlite:"):
        return "sqlite+aiosqlite:" + url[len("sqlite:") :]
    for prefix in ("postgresql:", "postgres:"):
        if url.startswith(prefix):
            return "postgresql+psycopg:" + url[len(prefix) :]
    return url


#: The dotenv file settings are read from (working directory); secrets are read from it too
#: (:class:`gateway.secrets.SecretStore`).
SETTINGS_DOTENV = Path(".env")


class Settings(BaseSettings):
    """Every setting of the gateway. Environment variables are ``GATEWAY_<NAME>``.

    A ``.env`` file in the working directory is read too (``make run`` writes one with a
    generated development Stripe secret).
    """

    model_config = SettingsConfigDict(
        env_prefix="GATEWAY_", env_file=SETTINGS_DOTENV, env_file_encoding="utf-8", extra="ignore"
    )

    database_url: str = Field(
        default="sqlite+aiosqlite:///./gateway.db",
        description="SQLAlchemy URL. SQLite (embedded default) or postgresql+psycopg://...",
    )
    database_pool_pre_ping: bool = Field(
        default=False,
        description=(
            "PostgreSQL: test each pooled connection with a round trip before use. Off, a "
            "connection the server dropped (a restart, a failover) fails one request with a "
            "500, rolled back, and the pool is rebuilt; on, that request is served, at one "
            "extra round trip per request."
        ),
    )
    profiles_dir: Path = Field(default=BUNDLED_PROFILES_DIR, description="Mapping profiles root.")
    identifier_base: str = Field(
        default="https://fhir-gateway.example.org/sid",
        description=(
            "Base URI of the gateway's identifier systems (Identifier.system), e.g. "
            "<base>/patient-id. Set it to a URI under a domain you own before production."
        ),
    )
    public_base_url: str = Field(
        default="http://127.0.0.1:8000",
        description="How clients reach the gateway; used for status URLs and Location headers.",
    )
    organization_name: str = Field(
        default="Telehealth operator",
        description="The operator the gateway transmits for (Provenance.agent.onBehalfOf).",
    )
    stripe_webhook_secret: SecretStr | None = Field(
        default=None, description="Stripe endpoint signing secret (whsec_...)."
    )
    stripe_tolerance: timedelta = Field(default=timedelta(seconds=300))
    host: str = "127.0.0.1"
    port: int = 8000
    run_worker: bool = Field(
        default=True, description="Run the delivery worker inside `serve` (embedded mode)."
    )
    max_body_bytes: int = Field(default=1_048_576, description="Largest accepted request body.")
    max_import_bytes: int = Field(
        default=256 * 1_048_576,
        description="Largest bulk import upload (POST /v1/imports); kept in the database "
        "until its job completes.",
    )
    apply_events_after_ack: bool = Field(
        default=True,
        description=(
            "Apply clinical events in the process that received them, right after the "
            "acknowledgement; false: only store and acknowledge, the worker applies them."
        ),
    )
    mllp_host: str = Field(default="127.0.0.1", description="Bind address of `fhir-gateway mllp`.")
    mllp_port: int = Field(
        default=2575, ge=0, le=65535, description="TCP port of `fhir-gateway mllp`."
    )
    mllp_max_message_bytes: int | None = Field(
        default=None,
        ge=1,
        description="Largest HL7 v2 message `fhir-gateway mllp` accepts (default: max_body_bytes).",
    )
    mllp_read_timeout: timedelta = Field(
        default=timedelta(seconds=60),
        description="How long a half-received MLLP frame may stall before the connection is closed.",
    )
    mllp_idle_timeout: timedelta = Field(
        default=timedelta(minutes=5),
        description="How long an MLLP connection may stay idle between messages before it is "
        "closed.",
    )
    mllp_max_connections: int = Field(
        default=256, ge=1, description="MLLP connections open at once; more are closed on accept."
    )
    mllp_max_connections_per_peer: int = Field(
        default=16, ge=1, description="MLLP connections open at once from one IP address."
    )
    mllp_tls_cert_file: Path | None = Field(
        default=None,
        description="MLLP over TLS: the listener's certificate chain (PEM). With the key and "
        "the client CA, every connection must present a client certificate (mutual TLS).",
    )
    mllp_tls_key_file: Path | None = Field(
        default=None, description="MLLP over TLS: the listener's private key (PEM)."
    )
    mllp_tls_client_ca_file: Path | None = Field(
        default=None,
        description="MLLP over TLS: the CA certificates (PEM) that issue partners' client "
        "certificates; partner profiles map each certificate (hl7.certificates).",
    )
    mllp_allow_plaintext: bool = Field(
        default=False,
        description="Let `fhir-gateway mllp` listen without TLS (loopback and development "
        "only): any peer may then send as a partner whose `peers` allow its address.",
    )
    egress_allow_loopback: bool = Field(
        default=False,
        description="Allow outbound requests (EHRs, token endpoints, subscribers) to loopback "
        "addresses, and http to a loopback host: development and tests only.",
    )
    egress_allowlist: list[str] = Field(
        default_factory=list,
        description="Networks (CIDR) and host names outbound requests may reach although they "
        'are private, link-local or reserved, e.g. ["10.20.0.0/16", "ehr.internal"] '
        "(a JSON list in the environment).",
    )
    worker_poll_interval: timedelta = Field(default=timedelta(milliseconds=500))
    worker_batch_size: int = 20
    worker_lease: timedelta = Field(
        default=timedelta(seconds=60),
        description="How long a claimed delivery stays locked before another worker may retry it.",
    )
    metrics_auth: bool = Field(
        default=False,
        description="`GET /metrics` needs an API key with ops:read (else it is open: bind "
        "the API to a private address or keep /metrics off the public proxy).",
    )
    docs: Literal["public", "authenticated", "off"] = Field(
        default="public",
        description="`/docs`, `/redoc` and `/openapi.json`: open, behind any valid API key, "
        "or not served.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_json: bool = True
    secret_env_file: Path | None = Field(
        default=None,
        description="Optional dotenv file with target secrets (client_secret_env variables).",
    )
    env: Literal["development", "production"] = Field(
        default="development",
        description=(
            "GATEWAY_ENV. production: start-up refuses a missing key encryption key, "
            "secrets stored in plaintext, and secret files (database, .env, secret env "
            "file) that group or others may read."
        ),
    )
    key_encryption_key: SecretStr | None = Field(
        default=None,
        description=(
            "Key encryption key (32 bytes, base64url; `fhir-gateway keys encryption-key`): "
            "envelope-encrypts stored EHR access tokens, subscriber secrets and private "
            "signing keys (AES-256-GCM). Without it they are stored in plaintext "
            "(development only)."
        ),
    )
    key_encryption_key_previous: SecretStr | None = Field(
        default=None,
        description=(
            "Earlier key encryption keys, comma-separated, still accepted for reading "
            "during a rotation until `fhir-gateway keys rotate-kek` has re-encrypted "
            "everything under the current one."
        ),
    )
    audit_retention: timedelta = Field(
        default=timedelta(days=6 * 366),
        description=(
            "How long audit entries are kept; `fhir-gateway audit purge` (and the worker, "
            "hourly) deletes older ones, keeping the hash chain verifiable."
        ),
    )
    shadow_retention: timedelta = Field(
        default=timedelta(days=30),
        description=(
            "How long shadow-mode results (what a shadow target would have written, with "
            "the diffs) and the items of finished reconciliation reports are kept; the "
            "worker deletes older ones, hourly."
        ),
    )
    audit_seal_interval: timedelta = Field(
        default=timedelta(seconds=1),
        description="How often the worker chains new audit entries into the hash chain.",
    )
    console: bool = Field(
        default=True,
        description="Serve the ops console at /console (staff sign-in; docs/CONSOLE.md).",
    )
    console_idle_timeout: timedelta = Field(
        default=timedelta(minutes=30),
        description="A console session ends after this long without a request.",
    )
    console_cookie_secure: bool | None = Field(
        default=None,
        description="The console's session cookie is Secure (sent over HTTPS only); "
        "unset: Secure unless the request came over http to a loopback address.",
    )
    console_oidc_issuer: str | None = Field(
        default=None,
        description="OpenID Connect sign-in for the console: the provider's issuer URL "
        "(its /.well-known/openid-configuration is read); unset: passwords only.",
    )
    console_oidc_client_id: str | None = Field(
        default=None, description="The console's client id at the OpenID provider."
    )
    console_oidc_client_secret: SecretStr | None = Field(
        default=None, description="The console's client secret at the OpenID provider."
    )
    console_oidc_username_claim: str = Field(
        default="preferred_username",
        description="The ID token claim that names the staff account (created with "
        "`fhir-gateway staff create`; its role applies).",
    )
    jwks_max_age: timedelta = Field(
        default=timedelta(minutes=5),
        description="Cache-Control max-age of /.well-known/jwks.json; keep it below the "
        "publish lead of `fhir-gateway keys rotate`.",
    )

    @field_validator(
        "stripe_tolerance",
        "mllp_read_timeout",
        "mllp_idle_timeout",
        "worker_poll_interval",
        "worker_lease",
        "jwks_max_age",
        "audit_retention",
        "shadow_retention",
        "audit_seal_interval",
        "console_idle_timeout",
        mode="before",
    )
    @classmethod
    def _seconds(cls, value: object) -> object:
        # Environment variables are strings: "2" or "0.5" mean seconds, as a JSON number
        # would; ISO 8601 durations ("PT2S") and "HH:MM:SS" still work.
        if isinstance(value, str) and re.fullmatch(r"\s*\d+(\.\d+)?\s*", value):
            return timedelta(seconds=float(value))
        return value

    @field_validator("database_url")
    @classmethod
    def _async_driver(cls, value: str) -> str:
        return normalize_database_url(value)

    @field_validator("identifier_base", "public_base_url")
    @classmethod
    def _absolute_uri(cls, value: str) -> str:
        if not re.match(r"^(https?://[^/\s]+|urn:[a-z0-9][a-z0-9-]*:\S+)", value, re.IGNORECASE):
            raise ValueError("must be an absolute http(s) URL or a urn: URI")
        return value.rstrip("/")

    @field_validator("egress_allowlist")
    @classmethod
    def _egress_entries(cls, value: list[str]) -> list[str]:
        EgressPolicy.from_allowlist(value, allow_loopback=False)  # raises on a bad entry
        return value

    def egress_policy(self) -> EgressPolicy:
        """The egress policy of these settings (:mod:`gateway.egress`)."""
        return EgressPolicy.from_allowlist(
            self.egress_allowlist, allow_loopback=self.egress_allow_loopback
        )

    @property
    def is_sqlite(self) -> bool:
        """True for the embedded SQLite database."""
        return self.database_url.startswith("sqlite")


def load_settings(**overrides: object) -> Settings:
    """Build the settings from the environment, with keyword overrides (tests, CLI flags)."""
    return Settings(**overrides)  # type: ignore[arg-type]
