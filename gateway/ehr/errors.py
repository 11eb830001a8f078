"""Errors of talking to an EHR (FHIR endpoint or token endpoint).

Error tree::

    EhrError
      EhrUnavailableError   retryable: transport failure, timeout, 408, 425, 429, 5xx;
                            carries ``retry_after_s`` when the server sent ``Retry-After``
        TokenUnavailableError   the token endpoint is failing or backed off: nothing was
                                sent to the FHIR server, so no delivery attempt counts
      EhrRejectedError      permanent: any other 4xx; carries the EHR's OperationOutcome
      EhrConfigError        the target cannot work as configured (bad client credentials,
                            missing secret or key, a fresh token refused): deliveries wait
                            without spending attempts, the target shows the error

Messages never contain URLs with query strings, bodies or PHI.
"""

from __future__ import annotations

import email.utils
import time
from typing import Any


class EhrError(Exception):
    """Something went wrong talking to an EHR."""

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class EhrUnavailableError(EhrError):
    """Retryable: the EHR (or its token endpoint) is down, slow or throttling."""

    def __init__(
        self, message: str, *, status_code: int | None = None, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message, status_code=status_code)
        self.retry_after_s = retry_after_s


class TokenUnavailableError(EhrUnavailableError):
    """The token endpoint is failing or being backed off; the FHIR server was not called."""


class EhrRejectedError(EhrError):
    """Permanent: the EHR refused the content (4xx); retrying would fail again."""

    def __init__(
        self, message: str, *, status_code: int, operation_outcome: dict[str, Any] | None
    ) -> None:
        super().__init__(message, status_code=status_code)
        self.operation_outcome = operation_outcome


class EhrConfigError(EhrError):
    """The target is misconfigured (e.g. the token endpoint refuses our credentials)."""

    def __init__(
        self, message: str, *, status_code: int | None = None, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message, status_code=status_code)
        self.retry_after_s = retry_after_s


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """``Retry-After`` (RFC 9110 section 10.2.3: seconds or an HTTP-date) -> seconds, or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (now if now is not None else time.time()))
