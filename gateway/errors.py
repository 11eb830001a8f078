"""Errors of the service, rendered from one table as RFC 9457 problem details on ``/v1``
and as FHIR OperationOutcomes on ``/fhir``.

Error tree::

    GatewayError                 an HTTP status + title + the problems found
      BadRequestError            400 malformed JSON / not an object
      UnauthorizedError          401 missing or wrong credential
      ForbiddenError             403 credential lacks the scope
      NotFoundError              404
      NotAcceptableError         406 no representation the client accepts (FHIR: JSON only)
      ConflictError              409
      PayloadTooLargeError       413
      UnsupportedMediaTypeError  415
      UnprocessableError         422 valid JSON that breaks the contract or a profile
      ServiceUnavailableError    503 not configured / dependency down

Problem bodies never carry input values (PHI); each problem names a field path and a code.
"""

from __future__ import annotations

from typing import Any, ClassVar

from starlette.responses import JSONResponse

from mappers.errors import Problem

PROBLEM_TYPE_BASE = "urn:fhir-gateway:problem:"

#: HTTP status -> FHIR OperationOutcome issue code (http://hl7.org/fhir/R4/valueset-issue-type.html).
OUTCOME_CODE = {
    400: "structure",
    401: "login",
    403: "forbidden",
    404: "not-found",
    405: "not-supported",
    406: "not-supported",
    409: "conflict",
    412: "conflict",
    413: "too-costly",
    415: "not-supported",
    422: "invalid",
    429: "throttled",
    500: "exception",
    503: "transient",
}


class GatewayError(Exception):
    """An error answered with an HTTP status and the list of problems found."""

    status: ClassVar[int] = 500
    slug: ClassVar[str] = "internal-error"
    title: ClassVar[str] = "Internal error"

    def __init__(
        self,
        detail: str,
        problems: list[Problem] | None = None,
        *,
        headers: dict[str, str] | None = None,
        pointer: str | None = None,
        in_body: bool = True,
        header: str | None = None,
    ) -> None:
        """``pointer``: the JSON pointer of every problem (their locations are not paths
        in the request body, e.g. ``file:line: path`` of a draft profile sent as one
        member); ``in_body=False``: the problems are not in the request body at all (a
        reload reads files), so they carry no ``pointer``; ``header``: the problems are
        about this request header (``Stripe-Signature``), named in each error's
        ``header`` member instead of a body ``pointer``."""
        super().__init__(detail)
        self.detail = detail
        self.problems = problems or []
        self.headers = headers or {}
        self.pointer = pointer
        self.in_body = in_body and header is None
        self.header = header


class BadRequestError(GatewayError):
    """The body could not be read as the expected JSON."""

    status, slug, title = 400, "malformed-request", "Malformed request"


class UnauthorizedError(GatewayError):
    """No credential, or one we do not know."""

    status, slug, title = 401, "unauthorized", "Unauthorized"


class ForbiddenError(GatewayError):
    """The credential does not carry the scope this route needs."""

    status, slug, title = 403, "forbidden", "Forbidden"


class NotFoundError(GatewayError):
    """No such resource."""

    status, slug, title = 404, "not-found", "Not found"


class NotAcceptableError(GatewayError):
    """The client accepts no format the route answers in (``Accept``, ``_format``)."""

    status, slug, title = 406, "not-acceptable", "Not acceptable"


class ConflictError(GatewayError):
    """The request conflicts with the current state."""

    status, slug, title = 409, "conflict", "Conflict"


class PayloadTooLargeError(GatewayError):
    """The body is larger than ``GATEWAY_MAX_BODY_BYTES``."""

    status, slug, title = 413, "payload-too-large", "Payload too large"


class UnsupportedMediaTypeError(GatewayError):
    """The body is not JSON."""

    status, slug, title = 415, "unsupported-media-type", "Unsupported media type"


class UnprocessableError(GatewayError):
    """Well-formed JSON that breaks the contract or the profile: every problem listed."""

    status, slug, title = 422, "validation-error", "Validation failed"


class ServiceUnavailableError(GatewayError):
    """A part the request needs is not configured or not reachable."""

    status, slug, title = 503, "unavailable", "Service unavailable"


def json_pointer(location: str) -> str:
    """``patient.address.state`` / ``consents[0].type`` -> ``#/patient/address/state``."""
    if not location:
        return "#"
    parts: list[str] = []
    for segment in location.replace("[", ".").replace("]", "").split("."):
        if segment:
            parts.append(segment.replace("~", "~0").replace("/", "~1"))
    return "#/" + "/".join(parts)


def problem_body(exc: GatewayError, instance: str | None = None) -> dict[str, Any]:
    """The RFC 9457 problem details object for ``exc``.

    Members: ``type`` (a URN per kind), ``title``, ``status``, ``detail``, ``instance``,
    and the extension ``errors``: ``[{field, pointer, code, detail}]``, one per problem
    (RFC 9457 section 3, "errors" example). ``pointer`` (RFC 6901, in the request body)
    only for problems in the body; a problem with a request header names it in
    ``header`` instead (the same member name as the problem type registry's
    ``header`` extensions use), and problems elsewhere carry neither.
    """
    body: dict[str, Any] = {
        "type": PROBLEM_TYPE_BASE + exc.slug,
        "title": exc.title,
        "status": exc.status,
        "detail": exc.detail,
    }
    if instance:
        body["instance"] = instance
    if exc.problems:
        errors: list[dict[str, str]] = []
        for p in exc.problems:
            error = {"field": p.location}
            if exc.header is not None:
                error["header"] = exc.header
            elif exc.in_body:
                error["pointer"] = exc.pointer or json_pointer(p.location)
            errors.append(error | {"code": p.code, "detail": p.message})
        body["errors"] = errors
    return body


def problem_response(exc: GatewayError, instance: str | None = None) -> JSONResponse:
    """``application/problem+json`` response for ``exc``."""
    return JSONResponse(
        problem_body(exc, instance),
        status_code=exc.status,
        media_type="application/problem+json",
        headers=exc.headers,
    )


def operation_outcome(exc: GatewayError) -> dict[str, Any]:
    """An OperationOutcome (R4) for ``exc``: one issue per problem, or one for the error."""
    code = OUTCOME_CODE.get(exc.status, "processing")
    issues: list[dict[str, Any]] = []
    for p in exc.problems:
        issue: dict[str, Any] = {
            "severity": "error",
            "code": code,
            "details": {"text": p.message},
            "diagnostics": p.code,
        }
        if p.location:
            issue["expression"] = [p.location]
        issues.append(issue)
    if not issues:
        issues.append({"severity": "error", "code": code, "diagnostics": exc.detail})
    return {"resourceType": "OperationOutcome", "issue": issues}


def operation_outcome_response(exc: GatewayError) -> JSONResponse:
    """``application/fhir+json`` OperationOutcome response for ``exc``."""
    return JSONResponse(
        operation_outcome(exc),
        status_code=exc.status,
        media_type="application/fhir+json",
        headers=exc.headers,
    )
