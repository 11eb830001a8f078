"""Request and response bodies of the profiles routes."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class PreviewRequest(BaseModel):
    """``POST /v1/profiles/preview``: a payload, and optionally a draft profile."""

    model_config = ConfigDict(extra="forbid")

    input: dict[str, Any] = Field(
        description="An intake submission, a Stripe checkout event or a canonical checkout."
    )
    profile: str | None = Field(
        default=None,
        max_length=512_000,
        description="A draft profile (YAML text) to preview with instead of the deployed one "
        "with the same key; it is not saved.",
    )
    kind: Literal["intake", "stripe", "checkout"] | None = Field(
        default=None, description="What `input` is (guessed when absent)."
    )


class PreviewIssue(BaseModel):
    """One problem: where, a stable code, and a message without the input value."""

    location: str
    code: str
    message: str


class PreviewResponse(BaseModel):
    """What the gateway would produce: a ``collection`` Bundle and every issue."""

    kind: str
    profile: str | None = Field(description="<kind>/<id>/<version>#sha256=<hash> of the profile")
    valid: bool
    issues: list[PreviewIssue]
    bundle: dict[str, Any]


class ReloadResponse(BaseModel):
    """The outcome of a reload: which profiles were added, removed or changed."""

    status: Literal["reloaded"]
    content_hash: str
    added: list[str]
    removed: list[str]
    changed: list[str]
